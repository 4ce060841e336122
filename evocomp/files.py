"""Atomic file writes: a temporary file beside the target, then a rename.

A crash (even ``kill -9``) leaves either the old file or the new one, never half of one;
every metrics file, plot CSV and manifest the pipeline writes goes through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from evocomp.errors import OutputError


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (parents created) by temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys (same data, same bytes), atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable(*paths: str | Path | None) -> None:
    """Fail before any work when an output (a file or a folder to write) cannot be written.

    Probes the nearest existing folder on the way to each path with a temporary file, so
    read-only mounts and permissions are caught as they are; nothing is left behind.

    Raises:
        OutputError: naming the path and why.
    """
    for path in filter(None, paths):
        path = Path(path)
        where = path if path.is_dir() else path.parent
        while not where.exists():
            where = where.parent
        if not where.is_dir():
            raise OutputError(f"cannot write {path}: {where} is a file, not a folder")
        try:
            fd, probe = tempfile.mkstemp(dir=where, prefix=".evocomp-probe-")
        except OSError as err:
            raise OutputError(
                f"cannot write {path}: {where} is not writable ({err.strerror})"
            ) from None
        os.close(fd)
        os.unlink(probe)
