"""`evocomp synth` and `evocomp prepare`: the built-in benchmarks and the prepared samples table.

evocomp synth --n 1000 --seed 1 --out data/raw/shapes-vqa
evocomp synth --benchmark scenes --grid 12 --out data/raw/scenes-vqa
evocomp synth --benchmark scenes --objects 2-5 --background plain --seed 7 --out held-out
evocomp prepare --source my_data.json
"""

from __future__ import annotations

from pathlib import Path

import typer

from evocomp.cli.common import USER_ERRORS, ParamsOpt, fail, params_or_exit, writable_or_exit


def synth(
    out: Path = typer.Option(
        None, help="output folder, LLaVA format (default: data/raw/<benchmark>-vqa)"
    ),
    n: int = typer.Option(None, help="images (default: prepare.n_images)"),
    seed: int = typer.Option(None, help="seed (default: prepare.seed)"),
    questions: int = typer.Option(
        None, help="questions per image (default: prepare.questions_per_image)"
    ),
    benchmark: str = typer.Option("shapes", help="shapes (shapes-vqa) or scenes (scenes-vqa)"),
    grid: int = typer.Option(
        None, help="scenes-vqa patches per side (default: mllm.grid, 12; 24: 576 tokens)"
    ),
    objects: str = typer.Option(
        None,
        metavar="MIN-MAX",
        help="objects per image, a held-out variant (default: prepare.objects, else shapes "
        "3-6, scenes 6-16)",
    ),
    background: str = typer.Option(
        None,
        metavar="STYLE",
        help="plain, noise or texture, a held-out variant (default: prepare.background, else "
        "shapes plain, scenes texture)",
    ),
    params_path: Path = ParamsOpt,
) -> None:
    """Write a built-in benchmark (images + dataset.json), deterministic by seed."""
    from evocomp.data.synth import Variant, check_benchmark, check_variant, write_dataset
    from evocomp.data.variants import parse_objects

    params = params_or_exit(params_path)
    p = params.prepare
    if grid is None and benchmark == "scenes":  # the grid its reference model is built for
        grid = params.mllm.grid
    try:
        grid = check_benchmark(benchmark, grid)
        variant = Variant(
            parse_objects(objects) if objects is not None else p.objects,
            background if background is not None else p.background,
        )
        check_variant(benchmark, variant)
    except ValueError as err:  # a bad benchmark, grid or variant, before anything is written
        fail(str(err))
    out = out or Path(f"data/raw/{benchmark}-vqa")
    writable_or_exit(out)
    path = write_dataset(
        out,
        n or p.n_images,
        p.seed if seed is None else seed,
        questions or p.questions_per_image,
        benchmark=benchmark,
        grid=grid,
        variant=variant,
    )
    typer.echo(f"wrote {path}")


def prepare(
    source: str = typer.Option(
        None, help="LLaVA .json / .jsonl or a folder with dataset.json (default: prepare.source)"
    ),
    images_dir: Path = typer.Option(None, help="image folder (default: next to the dataset file)"),
    out: Path = typer.Option(Path("data/prepared"), help="output folder"),
    params_path: Path = ParamsOpt,
) -> None:
    """Read a dataset, hash and split its samples, write data/prepared/samples.parquet."""
    from evocomp.data.prepared import write_prepared
    from evocomp.data.readers import read_dataset

    p = params_or_exit(params_path).prepare
    writable_or_exit(out)
    src = source or p.source
    if src == "synth":
        src = "data/raw/shapes-vqa"
    try:
        samples = read_dataset(src, images_dir or p.images_dir, p.val_fraction, p.test_fraction)
    except USER_ERRORS as err:
        fail(str(err))
    path = write_prepared(samples, out, str(src))
    splits = {s: sum(1 for x in samples if x.split == s) for s in ("train", "val", "test")}
    typer.echo(f"wrote {path}: {len(samples)} samples {splits}")
