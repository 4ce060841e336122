"""`evocomp serve`: the retraining flow (``dvc repro``) as a deployment on a cron schedule.

evocomp serve --cron "0 2 * * *"
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from evocomp.cli.common import fail


def serve(
    cron: str = typer.Option("0 2 * * *", help="when to retrain (cron, server time zone)"),
    name: str = typer.Option("nightly", help="deployment name"),
    stage: list[str] = typer.Option(None, help="only these DVC stages (repeatable; default: all)"),
) -> None:
    """Serve the retraining flow (`dvc repro`) as a deployment on a cron schedule.

    Runs until interrupted; needs a Prefect server (PREFECT_API_URL) for the schedule
    to fire while this process is the one serving it.
    """
    import evocomp.prefect_env  # noqa: F401  (before prefect is imported)

    # isort: split
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
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
    from flows.pipeline import retrain

    retrain.serve(
        name=name,
        cron=cron,
        limit=1,
        parameters={"stages": stage or None, "workspace": str(Path.cwd().resolve())},
    )
