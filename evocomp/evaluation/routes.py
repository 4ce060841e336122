"""Which compressor served each keep ratio of an evaluation (``compressor_for_ratio`` in an
``eval.json``), read back for deployment and for evaluating new data the same way."""

from __future__ import annotations

import json
from pathlib import Path


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
