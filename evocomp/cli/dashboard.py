"""`evocomp dashboard`: start the Streamlit audit dashboard on loopback.

evocomp dashboard                      # = streamlit run dashboards/app.py --server.headless true ...
evocomp dashboard --benchmark scenes   # the scenes-vqa stage set's outputs (dvc.yaml scenes_*)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from evocomp.cli.common import fail
from evocomp.config import PROFILE_ENV

# What the dashboard reads for each built-in benchmark's stage set (dashboards/data.py);
# a variable the user has set wins.
BENCHMARK_PATHS = {
    "shapes": {},
    "scenes": {
        PROFILE_ENV: "scenes",
        "EVOCOMP_METRICS_DIR": "metrics/scenes",
        "EVOCOMP_LABELS": "data/scenes/labels/labels.parquet",
        "EVOCOMP_FEATURES_DIR": "data/scenes/features",
        "EVOCOMP_COMPRESSOR": "models/scenes/compressor",
    },
}


def dashboard(
    port: int = typer.Option(8501),
    address: str = typer.Option("127.0.0.1"),
    benchmark: str = typer.Option(
        "shapes", help="whose outputs to audit: shapes (dvc.yaml's main stages) or scenes"
    ),
) -> None:
    """Start the Streamlit audit dashboard (read-only on the store except its explicit actions)."""
    if benchmark not in BENCHMARK_PATHS:
        fail(f"--benchmark {benchmark!r}: expected one of {', '.join(BENCHMARK_PATHS)}")
    app_file = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
    if not app_file.is_file():
        fail(f"dashboard app not found at {app_file} (run from a source checkout)")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_file),
        "--server.headless",
        "true",
        "--server.address",
        address,
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
    ]
    env = {**BENCHMARK_PATHS[benchmark], **os.environ}
    typer.echo(f"dashboard on http://{address}:{port}")
    raise typer.Exit(subprocess.call(cmd, env=env))
