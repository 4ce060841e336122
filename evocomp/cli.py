"""The ``evocomp`` command line: one subcommand per pipeline stage.

    evocomp --help
    evocomp synth --n 1000 --seed 1 --out data/raw/shapes-vqa
    evocomp prepare
    evocomp mllm train
    evocomp mllm eval

Every command reads ``params.yaml`` (``--params`` to use another file) and
reports user errors (bad params, missing files, unusable checkpoints) as one
line naming the culprit, with exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from evocomp.config import Params, ParamsError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
mllm_app = typer.Typer(no_args_is_help=True, help="The reference MLLM: train and evaluate.")
app.add_typer(mllm_app, name="mllm")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read")


def fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code)


def params_or_exit(path: Path) -> Params:
    try:
        return load_params(path)
    except ParamsError as err:
        fail(str(err))
    raise AssertionError  # unreachable


def user_errors():
    """Exceptions a user can cause; shown as one line instead of a traceback."""
    from evocomp.datasets import DatasetError
    from evocomp.mllm.base import ModelError

    return (DatasetError, ModelError, ParamsError, FileNotFoundError, ValueError)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def device_for(params: Params, device: str | None) -> str:
    return device or os.environ.get("EVOCOMP_DEVICE") or params.runtime.device


def load_mllm(params: Params, model: Path | None, device: str | None, dtype: str | None):
    from evocomp.mllm.hf_llava import HFLlava

    return HFLlava(model or Path(params.mllm.checkpoint), device=device_for(params, device),
                   dtype=dtype or params.runtime.dtype)


@app.command()
def synth(
    out: Path = typer.Option(Path("data/raw/shapes-vqa"), help="output folder (LLaVA format)"),
    n: int = typer.Option(None, help="images (default: prepare.n_images)"),
    seed: int = typer.Option(None, help="seed (default: prepare.seed)"),
    questions: int = typer.Option(None, help="questions per image (default: prepare.questions_per_image)"),
    params_path: Path = ParamsOpt,
) -> None:
    """Write the built-in shapes-vqa benchmark (images + dataset.json), deterministic by seed."""
    from evocomp.synth import write_dataset

    p = params_or_exit(params_path).prepare
    path = write_dataset(out, n or p.n_images, p.seed if seed is None else seed, questions or p.questions_per_image)
    typer.echo(f"wrote {path}")


@app.command()
def prepare(
    source: str = typer.Option(None, help="LLaVA .json / .jsonl or a folder with dataset.json (default: prepare.source)"),
    images_dir: Path = typer.Option(None, help="image folder (default: next to the dataset file)"),
    out: Path = typer.Option(Path("data/prepared"), help="output folder"),
    params_path: Path = ParamsOpt,
) -> None:
    """Read a dataset, hash and split its samples, write data/prepared/samples.parquet."""
    from evocomp.datasets import read_dataset
    from evocomp.prepared import write_prepared

    p = params_or_exit(params_path).prepare
    src = source or p.source
    if src == "synth":
        src = "data/raw/shapes-vqa"
    try:
        samples = read_dataset(src, images_dir or p.images_dir, p.val_fraction, p.test_fraction)
    except user_errors() as err:
        fail(str(err))
    path = write_prepared(samples, out, str(src))
    splits = {s: sum(1 for x in samples if x.split == s) for s in ("train", "val", "test")}
    typer.echo(f"wrote {path}: {len(samples)} samples {splits}")


@mllm_app.command("train")
def mllm_train(
    out: Path = typer.Option(Path("models/mllm"), help="checkpoint folder to write"),
    seed: int = typer.Option(None, help="override mllm.seed"),
    params_path: Path = ParamsOpt,
) -> None:
    """Train the reference tiny LLaVA on shapes-vqa scenes and save it in HF format."""
    from evocomp.mllm.reference import train_reference

    p = params_or_exit(params_path).mllm
    if seed is not None:
        p = p.model_copy(update={"seed": seed})
    train_reference(out, p, log=lambda m: typer.echo(m, err=True))


@mllm_app.command("eval")
def mllm_eval(
    data: Path = typer.Option(Path("data/prepared"), help="prepared samples (shapes-vqa)"),
    model: Path = typer.Option(None, help="checkpoint folder (default: mllm.checkpoint)"),
    split: str = typer.Option("test"),
    limit: int = typer.Option(None, help="evaluate the first N samples only"),
    out: Path = typer.Option(Path("metrics/mllm.json")),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: EVOCOMP_DEVICE or runtime.device)"),
    dtype: str = typer.Option(None),
    params_path: Path = ParamsOpt,
) -> None:
    """Accuracy of the reference model: full tokens, and random/oracle/anti selections per ratio."""
    from evocomp.mllm.quality import evaluate_reference
    from evocomp.prepared import load_prepared

    params = params_or_exit(params_path)
    try:
        samples = load_prepared(data, split, limit)
        metrics = evaluate_reference(load_mllm(params, model, device, dtype), samples)
    except user_errors() as err:
        fail(str(err))
    write_json(out, metrics)
    typer.echo(f"full accuracy {metrics['full']:.3f} on {len(samples)} {split} samples")
    for r, row in metrics["ratios"].items():
        typer.echo(f"  keep {r}: " + "  ".join(f"{m} {row[m]:.3f}" for m in ("oracle", "random", "anti")))
    typer.echo(f"median distinct nearest words per image: {metrics['median_distinct_words']}")
    typer.echo(f"wrote {out}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="evocomp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
