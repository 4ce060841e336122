"""A temp git copy of the repository to run `dvc repro` in (the pipeline tests share it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout


def copy_repo(repo_root: Path, ws: Path, skip: tuple[str, ...]) -> None:
    """Every git-tracked file of ``repo_root`` under ``ws``, but paths starting with ``skip``."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True
    )
    for rel in files.stdout.split():
        if rel.startswith(skip) or not (repo_root / rel).exists():
            continue
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / rel, ws / rel)


def git_workspace(ws: Path) -> dict:
    """``git init`` + commit ``ws``; returns the environment to run `dvc`/`evocomp` in it
    (this venv first on PATH, offline, its own Prefect home and SQLite store, no profile)."""
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        PREFECT_HOME=str(ws / ".prefect"),
    )
    env.pop("EVOCOMP_DB_URL", None)
    env.pop("EVOCOMP_PROFILE", None)
    sh(["git", "init", "-q"], ws, env)
    sh(["git", "add", "-A"], ws, env)
    sh(["git", "commit", "-qm", "init"], ws, env)
    return env
