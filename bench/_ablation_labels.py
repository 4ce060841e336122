"""The ablation bench's label sets: the searched vocabulary groups, k-means groups and a
random candidate per sample, cached on disk per (grouping, search params) digest.

Split out of ``bench/ablation.py`` (which imports it, as the tests do) to keep each file
near STYLE's length. The k-means is written here because the stand-in grouping must be
seeded per sample and torch-only (no scikit-learn in the product's dependencies).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from _setup import Workspace

from evocomp.config import SearchParams
from evocomp.data.samples import sample_seed
from evocomp.features.grouping import group_ids
from evocomp.labeling.sample import label_sample
from evocomp.search import SearchSpace
from evocomp.search.operators import repair


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Cluster id per row ``(N,)``: k-means++ seeding, Lloyd iterations, no empty cluster.

    Args:
        x: (N, D) points, N >= k.
        k: clusters.
        seed: seeds the k-means++ draws.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= N={n}, got k={k}")
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    centres = x[[first]]  # (1, D)
    d2 = ((x - x[first]) ** 2).sum(1)  # (N,) squared distance to the nearest centre
    for _ in range(1, k):
        i = int(torch.multinomial(d2, 1, generator=g)) if d2.sum() > 0 else int(d2.argmax())
        centres = torch.cat([centres, x[[i]]])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    assign = None
    for _ in range(iters):
        dist = torch.cdist(x, centres)  # (N, k)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for j in (counts == 0).nonzero().flatten().tolist():
            # an empty cluster takes the point farthest from its centre in a cluster of > 1
            own = dist.gather(1, new[:, None]).squeeze(1).masked_fill(counts[new] <= 1, -1.0)
            i = int(own.argmax())
            counts[new[i]] -= 1
            new[i], counts[j] = j, 1
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts[:, None]
    return assign


def kmeans_groups(tokens: torch.Tensor, n_groups: int, seed: int) -> torch.Tensor:
    """k-means stand-in for the vocabulary groups: n_groups clusters of the unit tokens ``(N,)``."""
    return kmeans(F.normalize(tokens.float(), dim=-1), n_groups, seed)


def _labels_path(ws: Workspace, grouping: str, params: SearchParams) -> Path:
    key = json.dumps(
        {"grouping": grouping, "params": params.model_dump(mode="json")}, sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return ws.root / "labels" / ws.info["model_id"] / f"{grouping}-{digest}.parquet"


def make_labels(ws: Workspace, samples: list, grouping: str, params: SearchParams, log=print):
    """Label set ``DataFrame`` (the columns ``items_from_labels`` reads), cached on disk.

    ``vocab``: the search on the vocabulary groups (``vocab_paper``: the caller passes
    ``paper`` mode); ``kmeans``: the same search on k-means groups; ``random_in_group``: a
    random candidate of the vocabulary-group search space, no search.
    """
    path = _labels_path(ws, grouping, params)
    if path.is_file():
        df = pd.read_parquet(path)
        if set(df["sample_id"]) == {s.id for s in samples}:
            log(f"labels {grouping}: {len(df)} cached ({path})")
            return df
    t0, rows = time.perf_counter(), []
    for s in samples:
        feats = ws.features(s)
        seed = sample_seed(params.seed, s.id)
        if grouping == "random_in_group":
            # a random candidate of the space: one member per group in paper mode, k tokens
            # within the group quotas in budget mode
            space = SearchSpace.build(feats.nearest, None, params)
            kept = repair((), space, random.Random(seed))
            prompt = ws.mllm.encode(s.question, s.answer)
            loss = float(
                ws.mllm.subset_loss(
                    prompt, feats.tokens, torch.tensor([kept]), feats.layout, feats.extra
                )[0]
            )
            soft = None
        else:
            if grouping == "kmeans":
                n_groups = int(group_ids(feats.nearest).max()) + 1
                feats = replace(feats, nearest=kmeans_groups(feats.tokens, n_groups, seed))
            lab = label_sample(ws.mllm, s, feats, params)
            kept, loss, soft = lab.result.kept, lab.result.loss, lab.result.soft
        n = feats.tokens.shape[0]
        rows.append(
            {
                "sample_id": s.id,
                "split": s.split,
                "model_id": ws.info["model_id"],
                "n_tokens": n,
                "kept": kept,
                "k": len(kept),
                "loss": loss,
                "soft": soft if soft is not None else [float(t in kept) for t in range(n)],
            }
        )
    df = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    log(f"labels {grouping}: {len(df)} in {time.perf_counter() - t0:.0f} s")
    return df
