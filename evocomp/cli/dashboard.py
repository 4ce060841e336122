"""`evocomp dashboard`: start the Streamlit audit dashboard on loopback.

evocomp dashboard            # = streamlit run dashboards/app.py --server.headless true ...
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from evocomp.cli.common import fail


def dashboard(port: int = typer.Option(8501), address: str = typer.Option("127.0.0.1")) -> None:
    """Start the Streamlit audit dashboard (read-only on the store except its explicit actions)."""
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
    typer.echo(f"dashboard on http://{address}:{port}")
    raise typer.Exit(subprocess.call(cmd))
