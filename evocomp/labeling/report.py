"""What a finished label run reports: ``metrics/labels.json`` and the fitness curve CSV.

Both are read by ``dvc metrics show`` / ``dvc plots show`` and the dashboard; their keys
are listed in DESIGN.md (Metrics files).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd

from evocomp import store as db
from evocomp.labelset import label_set_hash
from evocomp.search import SearchSpace


def _mean(xs) -> float | None:
    vals = [float(x) for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def label_metrics(labels: str | Path, failed: int) -> dict:
    """``metrics/labels.json`` of an exported label set."""
    df = pd.read_parquet(labels)
    heur = [json.loads(h) for h in df["heuristic_losses"]]
    best = [min((v for v in h.values() if v is not None), default=None) for h in heur]
    groups = [int(g) for g in df["n_groups"].dropna()]
    space = [  # log10 of the candidates each label was searched among
        SearchSpace.of_label(g, int(k)).log10_size
        for g, k in zip(df["groups"], df["k"], strict=True)
        if g is not None
    ]
    return {
        "label_set_hash": label_set_hash(df),  # what the labels decide (evocomp/labelset.py)
        "samples": len(df),
        "failed": failed,
        "mean_label_loss": _mean(df["loss"]),
        "mean_full_loss": _mean(df["full_loss"]),
        "mean_heuristic_loss": {
            m: _mean(h.get(m) for h in heur) for m in sorted(set().union(*heur))
        },
        "never_worse_than_best_heuristic": _mean(
            float(loss <= b + 1e-6)
            for loss, b in zip(df["loss"], best, strict=True)
            if b is not None
        ),
        "mean_kept_fraction": _mean(df["k"] / df["n_tokens"].where(df["n_tokens"] > 0)),
        "median_groups": float(statistics.median(groups)) if groups else None,
        "search_space_log10": {
            "mean": _mean(space),
            "median": float(statistics.median(space)),
            "min": min(space),
            "max": max(space),
        }
        if space
        else None,
    }


def fitness_curve(engine, run_id: int) -> str:
    """CSV of the run's convergence: per generation, the mean over its labels of min/avg/max."""
    rows = db.generation_means(engine, run_id)
    return "gen,min,avg,max,samples\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
