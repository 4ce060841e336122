"""The retraining flow: ``dvc repro`` of the whole pipeline, one run at a time.

    evocomp serve --cron "0 2 * * *"          # a scheduled deployment of `retrain`

``dvc repro`` re-runs only what changed (features -> label -> train -> evaluate);
the label stage itself skips samples already labelled. DVC holds a workspace
lock, so two repros must never overlap: the flow takes a file lock before it
starts DVC, and ``evocomp serve`` runs at most one flow run at a time.
"""

from __future__ import annotations

import evocomp.prefect_env  # noqa: F401  (before prefect is imported)

# isort: split
import fcntl
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger

LOCK_FILE = ".dvc/tmp/evocomp-retrain.lock"


@contextmanager
def _workspace_lock(root: Path):
    """Wait for any other retrain in this workspace to finish (an flock, freed if we die)."""
    path = root / LOCK_FILE
    if not path.parent.parent.is_dir():  # not a DVC workspace: let `dvc` say so
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_streamed(cmd: list[str], cwd: Path, log) -> int:
    """Run ``cmd``, sending each line it prints to ``log``; return its exit status."""
    log.info(f"$ {' '.join(cmd)}  (in {cwd})")
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            if line.strip():
                log.info(line.rstrip())
        return proc.wait()


@flow(name="retrain")
def retrain(stages: list[str] | None = None, workspace: str | None = None) -> None:
    """``dvc repro [stages]`` in the workspace (default: the current directory).

    Raises:
        RuntimeError: DVC failed; its output is in the flow's logs.
    """
    log = get_run_logger()
    root = Path(workspace or Path.cwd()).resolve()
    cmd = [sys.executable, "-m", "dvc", "repro", *(stages or [])]
    with _workspace_lock(root):
        status = run_streamed(cmd, root, log)
    if status != 0:
        raise RuntimeError(f"`dvc repro` failed in {root} with exit status {status} (see the log)")
