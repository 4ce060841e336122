"""Planted label noise and how well the audit finds it (``bench/audit.py``, tests).

A label-issue finder is judged by the labels it ranks first when some are known to be wrong
(cleanlab reports precision and recall on planted noise). Three kinds of wrong label, each a
set of the label's size whose true answer loss is computed with the model:

* ``random``: a random candidate of the sample's search space (the label made by no search);
* ``worst_heuristic``: the set of the heuristic with the highest answer loss at that size;
* ``shift``: every kept token moved to a random free neighbour on the token grid (a label
  off by one patch, e.g. a stale label after a resize).

A planted label keeps the stored label's search statistics (margin, agreement, convergence):
only its tokens and their answer loss change, as when a label set is corrupted after the
search. The audit must find it from the loss evidence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from evocomp.baselines import heuristic_sets
from evocomp.config import SearchParams
from evocomp.data.samples import Sample, sample_seed
from evocomp.features.cache import Features
from evocomp.labeling.sample import fitness_fn
from evocomp.search import SearchSpace
from evocomp.search.operators import repair
from evocomp.tolerance import loss_on_grid

KINDS = ("random", "worst_heuristic", "shift")


def shift(kept: Sequence[int], grid: tuple[int, int], rng: random.Random) -> list[int]:
    """Each kept token moved to a random 4-neighbour on the ``(rows, cols)`` grid that no
    other token of the result occupies (kept in place when it has none)."""
    rows, cols = grid
    out: list[int] = []
    for t in kept:
        r, c = divmod(int(t), cols)
        free = [
            rr * cols + cc
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
            if 0 <= rr < rows and 0 <= cc < cols and rr * cols + cc not in out
        ]
        free = [n for n in free if n not in kept] or free
        out.append(rng.choice(free) if free else int(t))
    if len(set(out)) < len(out):  # a token with no free neighbour collided: keep the originals
        out = [int(t) for t in kept]
    return sorted(out)


def noisy_sets(
    sample: Sample,
    feats: Features,
    kept: Sequence[int],
    heuristic_losses: dict[str, float],
    params: SearchParams,
    grid: tuple[int, int],
) -> dict[str, list[int]]:
    """The three wrong labels of one sample (see the module docstring), seeded by its id."""
    rng = random.Random(sample_seed(params.seed + 7919, sample.id))
    space = SearchSpace.build(feats.nearest, None, params)
    if space.k != len(kept):
        raise ValueError(
            f"sample {sample.id}: the label keeps {len(kept)} tokens but its search space "
            f"{space.k}: features or params differ from the labelling run's"
        )
    out = {"random": repair((), space, rng)}
    methods = tuple(m for m in params.heuristics if m in heuristic_losses)
    if methods:
        worst = max(methods, key=lambda m: heuristic_losses[m])
        hsets = heuristic_sets(
            space.k,
            tokens=feats.tokens,
            grid=grid,
            text_attn=feats.text_attn,
            cls_attn=feats.cls_attn,
            seed=sample_seed(params.seed, sample.id),
            methods=(worst,),
        )
        out["worst_heuristic"] = sorted(int(t) for t in hsets[worst])
    out["shift"] = shift(kept, grid, rng)
    return out


def noisy_losses(
    mllm, sample: Sample, feats: Features, sets: dict[str, list[int]], objective: str = "answer"
):
    """The loss of each set under the label run's ``objective`` (on the search's loss grid),
    one batched forward."""
    kinds = list(sets)
    idx = torch.tensor([sets[k] for k in kinds], dtype=torch.long)
    losses = fitness_fn(mllm, sample, feats, objective)(idx)
    return {k: loss_on_grid(float(v)) for k, v in zip(kinds, losses.tolist(), strict=True)}


def plant(
    facts: pd.DataFrame, noisy: pd.DataFrame, kind: str | None, share: float, seed: int
) -> tuple[pd.DataFrame, pd.Series]:
    """``facts`` with ``share`` of its labels (seeded choice) given a wrong label's loss, and
    the planted mask. ``noisy``: columns ``label_id`` and one loss column per kind; ``kind``
    None draws a kind per planted label."""
    rng = np.random.default_rng(seed)
    n = int(round(share * len(facts)))
    chosen = rng.choice(len(facts), size=n, replace=False)
    planted = pd.Series(False, index=facts.index)
    planted.iloc[chosen] = True
    by_label = noisy.set_index("label_id")
    kinds = [kind] * n if kind else list(rng.choice(list(by_label.columns), size=n))
    out = facts.copy()
    ids = out.loc[planted, "label_id"].to_numpy()
    out.loc[planted, "loss"] = [by_label.at[i, k] for i, k in zip(ids, kinds, strict=True)]
    return out, planted


def auroc(scores: pd.Series, positive: pd.Series) -> float:
    """Area under the ROC curve of ``scores`` for ``positive``, ties counted half (the
    Mann-Whitney U statistic: one formula, not worth a scikit-learn dependency)."""
    pos = positive.to_numpy(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs positive and negative labels")
    ranks = scores.rank(method="average").to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_planted(scores: pd.Series, positive: pd.Series) -> float:
    """Share of planted labels among the top ``#planted`` by score, ties at the cut broken at
    random (the expected share)."""
    n = int(positive.sum())
    if not n:
        raise ValueError("nothing planted")
    s = scores.to_numpy(float)
    pos = positive.to_numpy(bool)
    cut = np.sort(s)[::-1][n - 1]
    above, at = s > cut, s == cut
    room = n - int(above.sum())
    hits = pos[above].sum() + room * pos[at].sum() / at.sum()
    return float(hits / n)
