"""`evocomp evaluate`: every method x keep ratio on the test split.

evocomp evaluate --out metrics/eval.json
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
    progress_bars,
    writable_or_exit,
)


def evaluate(
    data: Path = typer.Option(Path("data/prepared")),
    features_dir: Path = typer.Option(Path("data/features"), "--features"),
    labels: list[Path] = typer.Option(
        [Path("data/labels/labels.parquet")],
        help="label set (its test split is the GA oracle); repeat for other budgets: the "
        "oracle at a ratio uses the label searched at that ratio's k",
    ),
    compressor: list[Path] = typer.Option(
        [Path("models/compressor")],
        help="trained compressor; repeat for one per label budget: each ratio is ranked by "
        "the one whose labels' keep ratio is nearest, or (evaluate.choose) by the one whose "
        "top k answers the val split (val_answer_loss) or the train images every compressor "
        "left out (select_answer_loss, train.select_share) with the lowest loss",
    ),
    model: Path = typer.Option(None, help="checkpoint (default: mllm.checkpoint)"),
    out: Path = typer.Option(Path("metrics/eval.json")),
    plots: Path = typer.Option(
        Path("plots/retention.csv"), help="retention vs ratio for dvc plots"
    ),
    speed: Path = typer.Option(
        None,
        help="real-shape timings of bench/speedup.py (default: metrics/bench_speedup.json, "
        "when it exists)",
    ),
    route: Path = typer.Option(
        None,
        help="an earlier evaluation's eval.json: each keep ratio is served by the compressor "
        "it chose (its compressor_for_ratio; pass those --compressor folders), not chosen "
        "again by evaluate.choose: new data, the pipeline's routing",
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    params_path: Path = ParamsOpt,
) -> None:
    """Accuracy and retention of every method at every keep ratio on the test split."""
    from evocomp.evaluation.report import print_table, write_plot
    from evocomp.evaluation.run import run_evaluation
    from evocomp.files import write_json_atomic
    from evocomp.mllm.loader import load_mllm

    params = params_or_exit(params_path)
    writable_or_exit(out, plots)
    if speed is not None and not speed.is_file():
        fail(f"--speed {speed}: file not found (run bench/speedup.py, or leave --speed out)")
    speed = speed or Path("metrics/bench_speedup.json")
    try:
        if route is not None:  # an unreadable route fails before the model is loaded
            from evocomp.evaluation.routes import route_of_evaluation

            route_of_evaluation(route)
        mllm = load_mllm(
            *model_options(params, model, device, dtype),
            prompt_template=params.mllm.prompt_template,
        )
        with progress_bars() as bar:
            result = run_evaluation(
                params, data, features_dir, labels, compressor, mllm, speed, bar, route
            )
    except USER_ERRORS as err:
        fail(str(err))
    write_json_atomic(out, result)
    write_plot(plots, result)
    typer.echo(print_table(result))
    typer.echo(f"wrote {out}")
