"""`evocomp mllm train|eval`: the reference tiny LLaVA and how well it separates selections.

evocomp mllm train --out models/mllm
evocomp mllm eval --model models/mllm --out metrics/mllm.json
"""

from __future__ import annotations

from pathlib import Path

import typer

from evocomp.cli.common import (
    USER_ERRORS,
    DeviceOpt,
    DtypeOpt,
    ParamsOpt,
    fail,
    model_options,
    params_or_exit,
    writable_or_exit,
)

app = typer.Typer(no_args_is_help=True, help="The reference MLLM: train and evaluate.")


@app.command("train")
def train(
    out: Path = typer.Option(Path("models/mllm"), help="checkpoint folder to write"),
    seed: int = typer.Option(None, help="override mllm.seed"),
    backgrounds: str = typer.Option(
        None,
        metavar="STYLES",
        help="override mllm.backgrounds: the training images' backgrounds, e.g. plain,noise,texture",
    ),
    compile_lm: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help="override mllm.compile: torch.compile the scenes-vqa LM's training steps "
        "(faster on CPU after a minute of compiling)",
    ),
    params_path: Path = ParamsOpt,
) -> None:
    """Train the reference tiny LLaVA on its benchmark (mllm.benchmark) and save it in HF format."""
    from evocomp.data.variants import check_style

    p = params_or_exit(params_path).mllm
    writable_or_exit(out)
    if seed is not None:
        p = p.model_copy(update={"seed": seed})
    if compile_lm is not None:
        if compile_lm and p.benchmark != "scenes":
            fail("--compile: only the scenes-vqa recipe (mllm.benchmark: scenes) compiles its LM")
        p = p.model_copy(update={"compile": compile_lm})
    if backgrounds is not None:
        styles = [s.strip() for s in backgrounds.split(",") if s.strip()]
        try:
            if not styles:
                raise ValueError("--backgrounds: name at least one of plain, noise, texture")
            p = p.model_copy(update={"backgrounds": [check_style(s) for s in styles]})
        except ValueError as err:
            fail(str(err))
    if p.benchmark == "scenes":
        from evocomp.mllm.scenes_reference import train_scenes_reference as train_reference
    else:
        from evocomp.mllm.reference import train_reference
    train_reference(out, p, log=lambda m: typer.echo(m, err=True))


@app.command("eval")
def evaluate(
    data: Path = typer.Option(
        None, help="prepared built-in samples (default: a fresh held-out set of mllm.benchmark)"
    ),
    n: int = typer.Option(None, help="images of the fresh synth set (default: mllm.eval_images)"),
    synth_seed: int = typer.Option(
        None, help="seed of the fresh synth set (default: 10000 + mllm.seed)"
    ),
    objects: str = typer.Option(
        None, metavar="MIN-MAX", help="objects per image of the fresh set (a held-out variant)"
    ),
    background: str = typer.Option(
        None, metavar="STYLE", help="plain, noise or texture: the fresh set's background"
    ),
    model: Path = typer.Option(None, help="checkpoint folder (default: mllm.checkpoint)"),
    split: str = typer.Option("test", help="split of --data to evaluate"),
    limit: int = typer.Option(None, help="evaluate the first N samples only"),
    out: Path = typer.Option(Path("metrics/mllm.json")),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    params_path: Path = ParamsOpt,
) -> None:
    """Accuracy of the reference model: full tokens, and random/oracle/anti selections per ratio."""
    import tempfile

    from evocomp.data.prepared import load_prepared
    from evocomp.data.readers import read_dataset
    from evocomp.data.synth import Variant, write_dataset
    from evocomp.data.variants import parse_objects
    from evocomp.files import write_json_atomic
    from evocomp.mllm.checkpoint import checkpoint_info
    from evocomp.mllm.loader import load_mllm
    from evocomp.mllm.reference_eval import evaluate_reference
    from evocomp.tokens import check_sample_grid

    params = params_or_exit(params_path)
    writable_or_exit(out)
    if data is not None and (objects or background):
        fail("--objects / --background make a fresh set; they do not apply with --data")
    try:
        # not prepare.objects / background: those shape the pipeline's data, not this check
        variant = Variant(parse_objects(objects) if objects else None, background)
        with tempfile.TemporaryDirectory() as tmp:
            if data is None:  # images the model never saw: a seed outside the training range
                seed = 10000 + params.mllm.seed if synth_seed is None else synth_seed
                bench, grid = params.mllm.benchmark, params.mllm.grid
                samples = read_dataset(
                    write_dataset(
                        tmp,
                        n or params.mllm.eval_images,
                        seed,
                        benchmark=bench,
                        grid=grid if bench == "scenes" else None,
                        variant=variant,
                    )
                )
                samples = samples[:limit]
                departs = ", ".join(f"{k} {v}" for k, v in variant.meta(bench).items())
                where = f"a fresh {bench}-vqa set (seed {seed}{', ' + departs if departs else ''})"
            else:
                samples = load_prepared(data, split, limit)
                where = f"the {split} split of {data}"
            path, device, dtype = model_options(params, model, device, dtype)
            n_tokens = checkpoint_info(path)["n_tokens"]
            for s in samples:  # before the model loads: a wrong grid fails at once
                check_sample_grid(s.id, s.meta, n_tokens)
            mllm = load_mllm(path, device, dtype, prompt_template=params.mllm.prompt_template)
            metrics = evaluate_reference(mllm, samples)
    except USER_ERRORS as err:
        fail(str(err))
    metrics["evaluated_on"] = where
    write_json_atomic(out, metrics)
    typer.echo(f"full accuracy {metrics['full']:.3f} on {len(samples)} samples of {where}")
    typer.echo(
        "  by type: " + "  ".join(f"{q} {a:.3f}" for q, a in metrics["full_by_type"].items())
    )
    for r, row in metrics["ratios"].items():
        typer.echo(
            f"  keep {r}: "
            + "  ".join(f"{m} {row[m]:.3f}" for m in ("oracle", "objects", "random", "anti"))
        )
    typer.echo(
        f"median distinct nearest words per image: {metrics['median_distinct_words']}; "
        f"meaningful nearest word: {metrics['meaningful_nearest_word']:.3f}"
    )
    typer.echo(f"wrote {out}")
