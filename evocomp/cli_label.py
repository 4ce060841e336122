"""`evocomp label` (the Prefect label flow) and `evocomp serve` (the scheduled retraining).

    evocomp label --split test
    evocomp label --ids suspects.csv --generations 20 --seeds 2     # a deeper re-search
    evocomp label --task-runner dask --dask-address tcp://HOST:8786
    evocomp serve --cron "0 2 * * *"

Exit status of `label`: 0 when every selected sample is labelled, 1 when some
failed (each listed with its reason), 2 for a user error (one line naming it).
Prefect runs without a server unless PREFECT_API_URL is set (evocomp/prefect_env.py).
"""

from __future__ import annotations

import evocomp.prefect_env  # noqa: F401  (before anything imports prefect)

# isort: split
import csv
import json
import os
import sys
from pathlib import Path

import typer

from evocomp.datasets import SPLITS, DatasetError

SEARCH_OVERRIDES = ("generations", "population", "parents", "seeds")


def read_ids(path: Path) -> list[str]:
    """Sample ids from a file: a JSON list (of ids, or of objects with ``sample_id``),
    a CSV with a ``sample_id`` (or ``id``) column, or one id per line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise DatasetError(f"cannot read the ids file {path}: {err.strerror or err}") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a JSON list of sample ids")
        ids = [r.get("sample_id") if isinstance(r, dict) else r for r in rows]
    elif path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        col = next((c for c in ("sample_id", "id") if c in (reader.fieldnames or [])), None)
        if col is None:
            raise DatasetError(f"{path}: no sample_id column (columns: {reader.fieldnames})")
        ids = [row[col] for row in reader]
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: no sample ids in the file")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise DatasetError(f"{path}: {len(bad)} entries are not sample ids (first: {bad[0]!r})")
    return list(dict.fromkeys(ids))


def _import_flows() -> None:
    """Make ``flows/`` (beside the package in a checkout, not installed) importable."""
    try:
        import flows  # noqa: F401
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1]
        if (root / "flows" / "__init__.py").is_file():
            sys.path.insert(0, str(root))  # Dask LocalCluster workers inherit sys.path


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: expected 0 <= i < n")
    return i, n


def _pydantic_msg(e: dict) -> str:
    where = ".".join(map(str, e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    return f"label.{where}: {msg}" if where else msg


def _print_summary(s: dict, out: Path, metrics: Path) -> None:
    echo = typer.echo
    echo(
        f"run {s['run_id']} ({s['model_id']}): {s['done']}/{s['selected']} samples labelled "
        f"({s['searched']} searched, {s['skipped']} already labelled) in {s['seconds']:.1f} s"
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


def register(app: typer.Typer) -> None:
    """Add the `label` and `serve` commands to the CLI."""
    from evocomp.cli import ParamsOpt, device_for, fail, params_or_exit, progress_bar, user_errors

    @app.command()
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
        shard: str = typer.Option(
            None, help="i/n: only shard i of n (stable hash of the sample id)"
        ),
        task_runner: str = typer.Option(None, help="thread or dask (default: label.task_runner)"),
        dask_address: str = typer.Option(None, help="tcp://HOST:PORT of a running Dask scheduler"),
        dask_workers: int = typer.Option(
            None, help="workers of a local Dask cluster (default: --workers)"
        ),
        workers: int = typer.Option(None, help="parallel tasks (default: label.workers)"),
        batch_size: int = typer.Option(
            None, min=1, help="samples per task (default: ~2 s of search each)"
        ),
        device: str = typer.Option(
            None, help="cpu, cuda, ... (default: EVOCOMP_DEVICE or runtime.device)"
        ),
        dtype: str = typer.Option(None, help="float32, bfloat16, float16 (default: runtime.dtype)"),
        out: Path = typer.Option(
            Path("data/labels/labels.parquet"), help="Parquet label set to write"
        ),
        metrics: Path = typer.Option(Path("metrics/labels.json"), help="label metrics to write"),
        fitness_plot: Path = typer.Option(
            None, help="CSV of the mean fitness per generation (DVC plot)"
        ),
        db_url: str = typer.Option(
            None, help="store URL (default: EVOCOMP_DB_URL or data/evocomp.db)"
        ),
        generations: int = typer.Option(
            None, help="override label.generations (a deeper re-search)"
        ),
        population: int = typer.Option(None, help="override label.population"),
        parents: int = typer.Option(None, help="override label.parents"),
        seeds: int = typer.Option(
            None, help="override label.seeds (independent searches per sample)"
        ),
        in_process: bool = typer.Option(
            False, help="run the same steps in a plain loop, without Prefect"
        ),
        params_path: Path = ParamsOpt,
    ) -> None:
        """Label samples with the genetic search (Prefect flow); skip those already labelled.

        A larger --generations/--population/--seeds makes a new run; its labels supersede the old ones in the export.
        """
        from pydantic import ValidationError

        from evocomp.config import LabelParams

        params = params_or_exit(params_path)
        runner = task_runner or params.label.task_runner
        given = (workers, generations, population, parents, seeds)
        names = ("workers", *SEARCH_OVERRIDES)
        overrides = {k: v for k, v in zip(names, given, strict=True) if v is not None}
        try:
            lp = LabelParams(**params.label.model_dump() | overrides)
        except ValidationError as err:
            fail("; ".join(_pydantic_msg(e) for e in err.errors()))
        if runner not in ("thread", "dask"):
            fail(f"--task-runner {runner!r}: expected thread or dask")
        splits = split or list(lp.splits)
        if unknown := [s for s in splits if s not in SPLITS]:
            fail(f"--split {unknown[0]!r}: expected one of {', '.join(SPLITS)}")
        _import_flows()
        try:
            from evocomp.store import get_engine
            from flows.label import model_ref, progress_hook, run_label, select_samples

            sample_ids = read_ids(ids) if ids else None
            shard_t = parse_shard(shard) if shard else None
            model = model or Path(params.mllm.checkpoint)
            device, dtype = device_for(params, device), dtype or params.runtime.dtype
            # Fail on user errors in a second, before any Prefect server starts.
            found = select_samples(data, splits, lp.max_samples, sample_ids)
            if sample_ids and len(found) < len(sample_ids):
                typer.secho(f"warning: {len(sample_ids) - len(found)} of the {len(sample_ids)} ids in "
                            f"{ids} are not in {data} ({', '.join(splits)}); ignored",
                            fg="yellow", err=True)  # fmt: skip
            model_ref(model, device, dtype)
            get_engine(db_url)
        except user_errors() as err:
            fail(str(err))
        if runner == "dask" and not os.environ.get("PREFECT_API_URL"):
            typer.secho(
                "warning: no PREFECT_API_URL: each Dask worker starts its own temporary "
                "Prefect server (slow); run `prefect server start` and set PREFECT_API_URL",
                fg="yellow",
                err=True,
            )
        kwargs = dict(
            data=str(data),
            splits=splits,
            model=str(model),
            params=lp,
            features_dir=str(features),
            db_url=db_url,
            shard=shard_t,
            ids=sample_ids,
            labels_out=str(out),
            metrics_out=str(metrics),
            fitness_out=str(fitness_plot) if fitness_plot else None,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
        try:
            with progress_bar(0, "label") as bar, progress_hook(bar):
                summary = run_label(
                    runner=runner,
                    dask_address=dask_address,
                    dask_workers=dask_workers,
                    in_process=in_process,
                    **kwargs,
                )
        except user_errors() as err:
            fail(str(err))
        _print_summary(summary, out, metrics)
        raise typer.Exit(1 if summary["failed"] else 0)

    @app.command()
    def serve(
        cron: str = typer.Option("0 2 * * *", help="when to retrain (cron, server time zone)"),
        name: str = typer.Option("nightly", help="deployment name"),
        stage: list[str] = typer.Option(
            None, help="only these DVC stages (repeatable; default: all)"
        ),
    ) -> None:
        """Serve the retraining flow (`dvc repro`) as a deployment on a cron schedule.

        Runs until interrupted; needs a Prefect server (PREFECT_API_URL) for the schedule
        to fire while this process is the one serving it.
        """
        from pydantic import ValidationError

        try:
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=cron)
        except ValidationError as err:
            fail(f"--cron {cron!r}: not a valid cron expression ({err.errors()[0]['msg']})")
        if not os.environ.get("PREFECT_API_URL"):
            typer.secho(
                "warning: no PREFECT_API_URL: serving against a temporary Prefect server that "
                "stops with this process; run `prefect server start` and set PREFECT_API_URL",
                fg="yellow",
                err=True,
            )
        _import_flows()
        from flows.pipeline import retrain

        retrain.serve(
            name=name,
            cron=cron,
            limit=1,
            parameters={"stages": stage or None, "workspace": str(Path.cwd().resolve())},
        )
