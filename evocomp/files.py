"""Atomic file writes: a temporary file beside the target, then a rename.

A crash (even ``kill -9``) leaves either the old file or the new one, never half of one;
every metrics file, plot CSV and manifest the pipeline writes goes through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
