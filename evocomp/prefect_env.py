"""Robust Prefect settings, applied before ``prefect`` is first imported.

Prefect reads its settings once, when it is imported, so this module must be
imported first (``flows/__init__.py``, ``flows/label.py`` and the CLI commands that start Prefect do)::

    import evocomp.prefect_env  # noqa: F401  (before any prefect import)

Each setting is a default: a value the user set in the environment wins.

- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: with no
  ``PREFECT_API_URL`` a temporary server starts in ~12-17 s; the 20 s default
  fails on a busy machine.
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``: else the temporary server prints
  a "database is locked" traceback on every run.
- ``PREFECT_HOME=.prefect`` under the working directory: the temporary
  server's database and logs stay with the project (``.prefect/`` is
  git-ignored) instead of in ``~/.prefect``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


def defaults(cwd: Path | None = None) -> dict[str, str]:
    """The settings this module applies, for a working directory."""
    home = (cwd or Path.cwd()).resolve() / ".prefect"
    return {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(home),
        # one line per finished task drowns the flow's own progress lines
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    }


def apply(cwd: Path | None = None) -> dict[str, str]:
    """Set each default the user has not set; return the ones this call set."""
    applied = {}
    for key, value in defaults(cwd).items():
        if not os.environ.get(key):
            os.environ[key] = value
            applied[key] = value
    if applied and "prefect" in sys.modules:
        # Too late for this process's settings; child processes still inherit them.
        warnings.warn(
            "evocomp.prefect_env was imported after prefect: "
            f"{', '.join(applied)} will not apply to this process",
            stacklevel=2,
        )
    return applied


apply()
