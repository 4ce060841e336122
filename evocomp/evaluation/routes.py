"""Which compressor served each keep ratio of an evaluation (``compressor_for_ratio`` in an
``eval.json``), read back for deployment and for evaluating new data the same way."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from evocomp.errors import ModelError

T = TypeVar("T")


def route_of_evaluation(path: str | Path) -> dict[str, Path]:
    """An ``evocomp evaluate`` result's ``compressor_for_ratio`` (keep ratio -> the compressor
    folder that served it; with ``evaluate.choose`` ``val_answer_loss`` or
    ``select_answer_loss``, the one of lowest held-out answer loss): a deployment's
    :class:`evocomp.deploy.BudgetScorers` route, or another evaluation's (``evocomp evaluate
    --route``). Folders are as the evaluation was given them: relative to the directory it
    ran in.

    Raises:
        ValueError: an unreadable file, or one without ``compressor_for_ratio`` (an
            evaluation of a single compressor).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable evaluation result ({err})") from None
    route = data.get("compressor_for_ratio") if isinstance(data, dict) else None
    if not isinstance(route, dict) or not route:
        raise ValueError(
            f"{path} has no compressor_for_ratio: it evaluated one compressor, which serves "
            "every ratio (pass it with --compressor)"
        )
    return {str(k): Path(v) for k, v in route.items()}


def resolve_route(
    route: Mapping[str, str | Path],
    by_folder: Mapping[Path, T],
    source: str = "the route",
    among: str = "compressors given",
) -> dict[str, T]:
    """``route`` (keep ratio key -> compressor folder) as keep ratio key -> the value
    ``by_folder`` holds for that folder (folders compared resolved, so a relative and an
    absolute path of one folder match). The one place deployment and ``evocomp evaluate
    --route`` map a route onto the compressors they were given.

    Raises:
        ModelError: a folder of the route that is not among ``by_folder``'s.
    """
    resolved = {Path(f).resolve(): v for f, v in by_folder.items()}
    out = {}
    for key, folder in route.items():
        if Path(folder).resolve() not in resolved:
            given = ", ".join(str(f) for f in by_folder)
            raise ModelError(
                f"{source} serves keep ratio {key} by {folder}, which is not among the "
                f"{among} ({given})"
            )
        out[key] = resolved[Path(folder).resolve()]
    return out
