"""`evocomp label`: label samples with the genetic search (the Prefect flow, or in-process).

    evocomp label --split test
    evocomp label --ids suspects.csv --generations 20 --seeds 2     # a deeper re-search
    evocomp label --task-runner dask --dask-address tcp://HOST:8786
    evocomp label --in-process                                      # no Prefect

Exit status: 0 when every selected sample is labelled, 1 when some failed (each listed
with its reason), 2 for a user error (one line naming it).

Which path runs: the Prefect flow (``flows/label.py``) when ``PREFECT_API_URL`` names a
server, or when there are at least ``SMALL_RUN`` samples to search; a smaller run without a
server is labelled in-process, since the temporary Prefect server would take longer to start
(~8 s idle, up to ~50 s on a loaded machine) than the search. ``--prefect`` / ``--in-process``
choose explicitly.
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
from evocomp.data.samples import SPLITS

SEARCH_OVERRIDES = (
    "generations", "population", "parents", "seeds", "mode", "keep_ratio", "soft_target",
    "objective", "warm_start",
)  # fmt: skip
SMALL_RUN = 64  # fewer samples to search, and no PREFECT_API_URL: label in-process


def _pydantic_msg(e: dict) -> str:
    where = ".".join(map(str, e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    return f"label.{where}: {msg}" if where else msg


def _print_summary(s: dict, out: Path, metrics: Path) -> None:
    echo = typer.echo
    where = f"Prefect flow run {s['flow_run_id']}" if s.get("flow_run_id") else "in-process"
    elsewhere = s.get("labelled_elsewhere")
    others = f", {elsewhere} by other workers" if elsewhere else ""
    echo(
        f"run {s['run_id']} ({s['model_id']}): {s['done']}/{s['selected']} samples labelled "
        f"({s['searched']} searched, {s['skipped']} already labelled{others}) in "
        f"{s['seconds']:.1f} s, {where}"
    )
    if s["mean_loss"] is not None:
        heur = "  ".join(
            f"{m} {v:.4f}" for m, v in s["mean_heuristic_loss"].items() if v is not None
        )
        echo(f"mean loss: label {s['mean_loss']:.4f}  full {s['mean_full_loss']:.4f}  |  {heur}")
    echo(f"wrote {out} ({s['exported']} labels) and {metrics}")
    if s["failures"]:
        typer.secho(f"{s['failed']} samples failed:", fg="red", err=True)
        for f in s["failures"]:
            typer.echo(f"  {f['sample_id']}: {(f['error'] or '').splitlines()[0]}", err=True)


def label(
    data: Path = typer.Option(Path("data/prepared"), help="prepared samples"),
    features: Path = typer.Option(Path("data/features"), help="feature cache root"),
    model: Path = typer.Option(None, help="checkpoint folder (default: mllm.checkpoint)"),
    split: list[str] = typer.Option(
        None, help="split to label, repeatable (default: label.splits)"
    ),
    ids: Path = typer.Option(
        None, help="only these sample ids: JSON list, CSV with sample_id, or lines"
    ),
    shard: str = typer.Option(None, help="i/n: only shard i of n (stable hash of the sample id)"),
    task_runner: str = typer.Option(None, help="thread or dask (default: label.task_runner)"),
    dask_address: str = typer.Option(None, help="tcp://HOST:PORT of a running Dask scheduler"),
    dask_workers: int = typer.Option(
        None, help="workers of a local Dask cluster (default: --workers)"
    ),
    workers: int = typer.Option(
        None, help="parallel tasks; label batches are planned per worker (default: label.workers)"
    ),
    batch_size: int = typer.Option(
        None, min=1, help="samples per task (default: ~4 tasks per worker, at most 128)"
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    out: Path = typer.Option(Path("data/labels/labels.parquet"), help="Parquet label set to write"),
    metrics: Path = typer.Option(Path("metrics/labels.json"), help="label metrics to write"),
    fitness_plot: Path = typer.Option(
        None, help="CSV of the mean fitness per generation (DVC plot)"
    ),
    db_url: str = typer.Option(None, help="store URL (default: EVOCOMP_DB_URL or data/evocomp.db)"),
    generations: int = typer.Option(None, help="override label.generations (a deeper re-search)"),
    population: int = typer.Option(None, help="override label.population"),
    parents: int = typer.Option(None, help="override label.parents"),
    seeds: int = typer.Option(None, help="override label.seeds (independent searches per sample)"),
    mode: str = typer.Option(None, help="override label.mode: paper or budget"),
    keep_ratio: float = typer.Option(
        None, help="override label.keep_ratio (budget mode: a label set at another keep ratio)"
    ),
    soft_target: str = typer.Option(
        None,
        help="override label.soft_target: elite (the final population's keep frequency) or "
        "elimination (each label token's worth rank)",
    ),
    objective: str = typer.Option(
        None,
        help="override label.objective: answer (the answer's cross-entropy) or distill (KL "
        "divergence from the all-token answer distribution)",
    ),
    warm_start: Path = typer.Option(
        None,
        help="override label.warm_start: a trained compressor (folder) whose top tokens seed "
        "each sample's search, e.g. the deployed one when labelling new data",
    ),
    in_process: bool = typer.Option(
        None,
        "--in-process/--prefect",
        help="without Prefect, or as the Prefect flow (default: the flow, unless a run of "
        f"fewer than {SMALL_RUN} samples has no PREFECT_API_URL server)",
        show_default=False,
    ),
    params_path: Path = ParamsOpt,
) -> None:
    """Label samples with the genetic search; skip those already labelled.

    A larger --generations/--population/--seeds makes a new run; its labels supersede the old
    ones in the export. Another --mode/--keep-ratio labels for another budget: the export holds
    only labels of this run's budget (one label set per keep ratio, for `train --labels` x N).
    """
    from pydantic import ValidationError

    from evocomp.config import LabelParams

    params = params_or_exit(params_path)
    writable_or_exit(out, metrics, fitness_plot)
    runner = task_runner or params.label.task_runner
    given = (
        workers, generations, population, parents, seeds, mode, keep_ratio, soft_target,
        objective, warm_start and str(warm_start),
    )  # fmt: skip
    names = ("workers", *SEARCH_OVERRIDES)
    overrides = {k: v for k, v in zip(names, given, strict=True) if v is not None}
    try:
        lp = LabelParams(**params.label.model_dump() | overrides)
    except ValidationError as err:
        fail("; ".join(_pydantic_msg(e) for e in err.errors()))
    if lp.warm_start is not None:  # absolute: a Dask worker's working directory may differ
        lp = lp.model_copy(update={"warm_start": str(Path(lp.warm_start).resolve())})
    if runner not in ("thread", "dask"):
        fail(f"--task-runner {runner!r}: expected thread or dask")
    from flows.label import api_url, run_label

    if runner == "dask" and dask_address and not in_process and not api_url():
        # A local cluster's workers share the flow's temporary server (flows/label.py); the
        # workers of a running cluster are not ours to configure, and each would start its own.
        fail(
            "--dask-address: the flow and the cluster's workers need one Prefect server: run "
            "`prefect server start` and set PREFECT_API_URL for both (README, Scaling out)"
        )
    splits = split or list(lp.splits)
    if unknown := [s for s in splits if s not in SPLITS]:
        fail(f"--split {unknown[0]!r}: expected one of {', '.join(SPLITS)}")
    from evocomp.labeling.run import LabelJob, pending
    from evocomp.labeling.selection import parse_shard, read_ids

    try:
        sample_ids = read_ids(ids) if ids else None
        checkpoint, device, dtype = model_options(params, model, device, dtype)
        job = LabelJob(
            data=str(data),
            model=checkpoint,
            params=lp,
            splits=tuple(splits),
            features_dir=str(features),
            db_url=db_url,
            shard=parse_shard(shard) if shard else None,
            ids=tuple(sample_ids) if sample_ids else None,
            labels_out=str(out),
            metrics_out=str(metrics),
            fitness_out=str(fitness_plot) if fitness_plot else None,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            prompt_template=params.mllm.prompt_template,
        )
        # Fail on user errors in a second, before any Prefect server starts.
        found = job.samples()
        if sample_ids and len(found) < len(sample_ids):
            typer.secho(f"warning: {len(sample_ids) - len(found)} of the {len(sample_ids)} ids in "
                        f"{ids} are not in {data} ({', '.join(splits)}); ignored",
                        fg="yellow", err=True)  # fmt: skip
        to_search = len(pending(job))  # also checks the checkpoint and the store
    except USER_ERRORS as err:
        fail(str(err))
    server = api_url()
    if in_process is None:
        in_process = not server and to_search < SMALL_RUN
        if in_process:
            typer.echo(
                f"{to_search} samples to search: labelling in-process (no PREFECT_API_URL; "
                "a temporary Prefect server would take longer to start; --prefect forces the flow)",
                err=True,
            )
    from evocomp.labeling.progress import progress_hook

    kwargs = {k: getattr(job, k) for k in job.__dataclass_fields__}
    try:
        with progress_bars() as bar, progress_hook(lambda d, t: bar("label", d, t)):
            summary = run_label(
                runner=runner,
                dask_address=dask_address,
                dask_workers=dask_workers,
                in_process=in_process,
                **kwargs,
            )
    except USER_ERRORS as err:
        fail(str(err))
    _print_summary(summary, out, metrics)
    raise typer.Exit(1 if summary["failed"] else 0)
