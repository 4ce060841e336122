"""What the labels keep: keep/drop balance, keep rate by token class, grid cell and vocabulary word.

Pure functions over per-label rows (columns ``n_tokens, kept, groups, heuristic_kept,
group_words, meta``: the label's JSON columns and its sample's meta), for the labels and, side
by side, each heuristic at the same size: the EvoComp paper's case against attention-based
selectors is that they keep tokens by position, not by content. Rows whose ``heuristic_kept``
or ``group_words`` is None (labels written before store revision 0004) count for what they do
record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from evocomp.tokens import grid_shape

LABEL = "label"  # the selection name of the labels themselves, beside the heuristics' names
CLASSES = ("answer", "object", "background")


def keep_stats(labels: pd.DataFrame) -> dict[str, Any]:
    """Keep/drop balance of done labels: overall and per question type."""
    done = labels[labels["status"] == "done"]
    kept, tokens = float(done["k"].sum()), float(done["n_tokens"].sum())

    by_qtype = (
        done.assign(qtype=done["qtype"].fillna("?"))
        .groupby("qtype", sort=True)
        .agg(labels=("k", "size"), kept=("k", "sum"), tokens=("n_tokens", "sum"))
    )
    by_qtype["keep_ratio"] = by_qtype["kept"] / by_qtype["tokens"].clip(lower=1)

    return {
        "labels": len(done),
        "keep_ratio": kept / tokens if tokens else None,
        "by_qtype": by_qtype.reset_index(),
        "kept_fraction": (done["k"] / done["n_tokens"].clip(lower=1)).rename("kept_fraction"),
    }


def fixed_keep_fraction(labels: pd.DataFrame) -> float | None:
    """The kept fraction ``k / n_tokens`` when every done label has the same one, else None.

    Budget mode fixes it (``label.keep_ratio``): a breakdown of it by anything is one flat bar.
    """
    done = labels[labels["status"] == "done"]
    fraction = (done["k"] / done["n_tokens"]).astype(float).unique()
    return float(fraction[0]) if len(fraction) == 1 else None


def token_classes(meta: dict[str, Any] | None, n_tokens: int) -> np.ndarray | None:
    """(n_tokens,) index into ``CLASSES`` of each token, from a built-in benchmark's meta.

    A token is *answer* when the answer needs its patch (meta ``relevant``), else *object* when
    it is in some object's ``patches``, else *background*. None when the meta records no
    objects and relevant patches, or describes another grid than these tokens'.
    """
    if not meta or "objects" not in meta or "relevant" not in meta:
        return None
    if "grid" in meta and token_grid(meta, n_tokens) != tuple(meta["grid"]):
        return None  # e.g. a 6 x 6 layout under a model that makes 24 x 24 tokens
    objects = [int(p) for o in meta["objects"] for p in o.get("patches", [])]
    relevant = [int(p) for p in meta["relevant"]]
    if not all(0 <= p < n_tokens for p in objects + relevant):
        return None
    cls = np.full(n_tokens, CLASSES.index("background"))
    cls[objects] = CLASSES.index("object")
    cls[relevant] = CLASSES.index("answer")
    return cls


def _selections(row: Any) -> dict[str, list[int]]:
    """The label's kept tokens and each recorded heuristic's, by selection name."""
    return {LABEL: row.kept, **(row.heuristic_kept or {})}


def _ordered(names: Iterable[str]) -> list[str]:
    """The label first, then the heuristics by name (PostgreSQL's JSONB reorders them)."""
    return sorted(names, key=lambda n: (n != LABEL, n))


def keep_by_class(rows: pd.DataFrame) -> pd.DataFrame:
    """Keep rate per selection and token class: kept tokens of the class / tokens of the class.

    Columns ``selection, class, labels, tokens, kept, keep_rate`` (NaN where the class has no
    token), the label first, then the heuristics by name. Rows without token
    classes are skipped; a heuristic counts the rows that record its set.
    """
    tokens: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    labels: Counter[str] = Counter()
    for row in rows.itertuples(index=False):
        cls = token_classes(row.meta, row.n_tokens)
        if cls is None:
            continue
        for name, idx in _selections(row).items():
            tokens[name] = tokens.get(name, 0) + np.bincount(cls, minlength=len(CLASSES))
            kept[name] = kept.get(name, 0) + np.bincount(cls[idx], minlength=len(CLASSES))
            labels[name] += 1
    out = pd.DataFrame(
        [
            (name, c, labels[name], int(tokens[name][i]), int(kept[name][i]))
            for name in _ordered(tokens)
            for i, c in enumerate(CLASSES)
        ],
        columns=["selection", "class", "labels", "tokens", "kept"],
    )
    out["keep_rate"] = out["kept"] / out["tokens"].where(out["tokens"] > 0)
    return out


@dataclass(frozen=True)
class Heatmaps:
    """Per selection, the fraction of labels that keep each cell of the most common grid."""

    grid: tuple[int, int] | None  # (rows, cols); None without labels
    rates: dict[str, np.ndarray]  # selection -> (rows, cols) keep rate per cell
    labels: dict[str, int]  # selection -> labels averaged
    skipped: int  # labels on another grid (another token count)


def token_grid(meta: dict[str, Any] | None, n_tokens: int) -> tuple[int, int]:
    """The sample's patch grid: meta ``grid`` when it holds n_tokens cells, else the model's rule."""
    grid = (meta or {}).get("grid")
    if isinstance(grid, list) and len(grid) == 2 and grid[0] * grid[1] == n_tokens:
        return int(grid[0]), int(grid[1])
    return grid_shape(n_tokens)


def keep_heatmaps(rows: pd.DataFrame) -> Heatmaps:
    """How often each grid cell is kept, per selection, over the labels of the most common grid.

    Labels of other grids are skipped (counted in ``skipped``); ties between grids go to the
    one seen first.
    """
    grids = [token_grid(m, n) for m, n in zip(rows["meta"], rows["n_tokens"], strict=True)]
    if not grids:
        return Heatmaps(None, {}, {}, 0)
    grid = Counter(grids).most_common(1)[0][0]
    counts: dict[str, np.ndarray] = {}
    labels: Counter[str] = Counter()
    for row, g in zip(rows.itertuples(index=False), grids, strict=True):
        if g != grid:
            continue
        for name, idx in _selections(row).items():
            counts.setdefault(name, np.zeros(grid[0] * grid[1]))[idx] += 1  # idx distinct
            labels[name] += 1
    rates = {name: (counts[name] / labels[name]).reshape(grid) for name in _ordered(counts)}
    return Heatmaps(grid, rates, dict(labels), sum(g != grid for g in grids))


def keep_by_word(rows: pd.DataFrame, top: int = 30) -> pd.DataFrame:
    """Keep rate of the labels per vocabulary word of the tokens' groups, most frequent first.

    Columns ``word, labels, tokens, kept, keep_rate``: ``labels`` holding the word, its
    ``tokens`` in them and how many are ``kept``; the ``top`` words with the most tokens (ties by
    word). Rows without group words are skipped.
    """
    labels: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for row in rows.itertuples(index=False):
        if row.group_words is None or row.groups is None:
            continue
        words = np.asarray(row.group_words, dtype=object)[np.asarray(row.groups, dtype=int)]
        labels.update(set(row.group_words))
        tokens.update(words.tolist())
        kept.update(words[np.asarray(row.kept, dtype=int)].tolist())
    out = pd.DataFrame(
        [(w, labels[w], n, kept[w]) for w, n in tokens.items()],
        columns=["word", "labels", "tokens", "kept"],
    )
    out = out.sort_values(["tokens", "word"], ascending=[False, True], kind="stable").head(top)
    out["keep_rate"] = out["kept"] / out["tokens"]
    return out.reset_index(drop=True)
