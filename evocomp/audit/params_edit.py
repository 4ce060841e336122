"""Editing the ``train:`` section of params.yaml in place: the dashboard's "apply" button.

Comments and key order survive (a YAML round trip would drop them); every edit is validated
with the same pydantic models the stages use, and written only if the file did not change
since its diff was shown.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evocomp.config import TrainParams, parse_params
from evocomp.errors import ParamsError

_KEY_LINE = re.compile(
    r"^(?P<head>(?P<indent>[ ]+)(?P<key>\w+):[ ]*)(?P<value>[^#\n]*?)"
    r"(?P<gap>[ ]*)(?P<comment>#.*)?$"
)


@dataclass(frozen=True)
class ParamsUpdate:
    """A validated edit of params.yaml: the text before and after, and their unified diff."""

    old_text: str
    new_text: str
    diff: str


def _scalar(value: Any) -> str:
    """A YAML scalar that PyYAML reads back as the same value (1e-05 needs a dot in YAML 1.1)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        return f"{mantissa}.0e{exp}" if e and "." not in mantissa else text
    return str(value)


def _train_block(lines: list[str], source: str) -> tuple[int, int] | None:
    """[start, end) line indices of the top-level ``train:`` block's body, None if absent."""
    start = next((i for i, ln in enumerate(lines) if re.match(r"^train:\s*(#.*)?$", ln)), None)
    if start is None:
        if any(re.match(r"^train:", ln) for ln in lines):
            raise ParamsError(f"{source}: the train: section is written inline; edit it by hand")
        return None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " #"):
        end += 1
    # trailing blank lines and top-level comments belong to what follows
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1][0] == "#"):
        end -= 1
    return start + 1, end


def propose_train_update(
    text: str, updates: Mapping[str, Any], source: str = "params.yaml"
) -> ParamsUpdate:
    """Set ``train.<key>`` values in params.yaml text, keeping comments and order.

    Existing keys are edited in place (an inline comment keeps its column); missing keys are
    appended to the ``train:`` block. The result is validated with ``parse_params``.

    Raises:
        ParamsError: an unknown key, an invalid value (the message names the key), or a
            profile that overrides the key so the edit would have no effect.
    """
    unknown = sorted(set(updates) - set(TrainParams.model_fields))
    if unknown:
        raise ParamsError(
            f"{source}: unknown train parameter(s) {unknown} (known: "
            f"{', '.join(TrainParams.model_fields)})"
        )
    lines = text.splitlines()
    block = _train_block(lines, source)
    if block is None:
        lines.append("train:")
        block = (len(lines), len(lines))
    start, end = block
    matches = {i: m for i in range(start, end) if (m := _KEY_LINE.match(lines[i]))}
    indent = next((m["indent"] for m in matches.values()), "  ")
    todo = dict(updates)
    for i, m in matches.items():
        if m["indent"] != indent or m["key"] not in todo:
            continue  # a nested line, or a key left as it is
        head = m["head"] + _scalar(todo.pop(m["key"]))
        if m["comment"]:
            col = len(m["head"]) + len(m["value"]) + len(m["gap"])
            head += " " * max(1, col - len(head)) + m["comment"]
        lines[i] = head
    lines[end:end] = [f"{indent}{key}: {_scalar(v)}" for key, v in todo.items()]
    new_text = "\n".join(lines) + ("\n" if text.endswith("\n") or not text else "")
    try:
        raw = yaml.safe_load(new_text) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: the edit would not be valid YAML: {err}") from None
    params = parse_params(raw, source)
    for key, value in updates.items():
        if getattr(params.train, key) != getattr(TrainParams(**{key: value}), key):
            raise ParamsError(
                f"{source}: profile {params.profile!r} overrides train.{key}; "
                f"edit profiles.{params.profile}.train instead"
            )
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            fromfile=source,
            tofile=source,
        )
    )
    return ParamsUpdate(text, new_text, diff)


def write_params(path: str | Path, update: ParamsUpdate) -> None:
    """Write ``update.new_text`` to ``path`` atomically, only if the file still holds old_text.

    Raises:
        ParamsError: the file changed since the diff was shown.
    """
    path = Path(path)
    current = path.read_text() if path.exists() else ""
    if current != update.old_text:
        raise ParamsError(f"{path} changed since the diff was shown; review the new diff")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(update.new_text)
    os.replace(tmp, path)
