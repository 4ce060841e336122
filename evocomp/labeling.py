"""Label one sample with the genetic search, and a plain in-process loop over many.

The Prefect flow (``flows/label.py``) wraps :func:`label_and_store` per sample;
``evocomp label --in-process`` runs :func:`label_samples` without Prefect. Both
skip samples already labelled under the same (model id, search-params hash).

    evocomp label --split test
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evocomp.baselines import heuristic_sets
from evocomp.config import SearchParams
from evocomp.datasets import Sample
from evocomp.features import Features
from evocomp.grouping import group_ids
from evocomp.search import SearchResult, sample_seed, search_sample
from evocomp.store.records import LabelRecord


def label_size(params: SearchParams, n_tokens: int, n_groups: int) -> int:
    if params.mode == "paper":
        return n_groups
    return max(1, round(params.keep_ratio * n_tokens))


@dataclass(frozen=True)
class Labelled:
    result: SearchResult
    full_loss: float
    groups: list[int]
    seconds: float


def label_sample(
    mllm,
    sample: Sample,
    feats: Features,
    params: SearchParams,
    progress: Callable[[int, float], None] | None = None,
) -> Labelled:
    """Search the kept-token set of lowest answer loss for one sample."""
    t0 = time.perf_counter()
    feats.check(sample.id)
    groups = group_ids(feats.nearest)
    n = feats.tokens.shape[0]
    k = label_size(params, n, int(groups.max()) + 1)
    prompt = mllm.encode(sample.question, sample.answer)
    if not prompt.answer:
        raise ValueError(f"sample {sample.id}: the answer {sample.answer!r} encodes to no tokens")

    def fitness(idx: torch.Tensor) -> torch.Tensor:
        return mllm.subset_loss(prompt, feats.tokens, idx)

    seed = sample_seed(params.seed, sample.id)
    hsets = heuristic_sets(
        k,
        tokens=feats.tokens,
        grid=mllm.grid,
        text_attn=feats.text_attn,
        cls_attn=feats.cls_attn,
        seed=seed,
        methods=params.heuristics,
    )
    result = search_sample(
        feats.tokens, groups, fitness, k, params, seed, heuristic_sets=hsets, progress=progress
    )
    full = float(fitness(torch.arange(n)[None])[0])
    if not math.isfinite(full) or not math.isfinite(result.loss):
        raise ValueError(f"sample {sample.id}: non-finite loss (full {full}, label {result.loss})")
    return Labelled(result, full, groups.tolist(), time.perf_counter() - t0)


def to_record(lab: Labelled) -> LabelRecord:
    r = lab.result
    return LabelRecord(
        kept=list(r.kept),
        k=r.k,
        n_tokens=r.n_tokens,
        soft=list(r.soft),
        groups=lab.groups,
        loss=r.loss,
        full_loss=lab.full_loss,
        heuristic_losses=dict(r.heuristic_losses),
        margin=r.margin,
        agreement=r.agreement,
        n_groups=r.n_groups,
        converged_gen=r.converged_gen,
        n_forwards=r.n_forwards,
        seconds=lab.seconds,
        logbook=list(r.logbook),
        elite=list(r.elite),
    )


def label_and_store(
    mllm, sample: Sample, feats: Features, params: SearchParams, engine, run_id: int
) -> str:
    """Label one sample and write it (or its failure) in one transaction; returns the status."""
    from evocomp.store import write_failure, write_label

    try:
        lab = label_sample(mllm, sample, feats, params)
    except (ValueError, RuntimeError) as err:
        write_failure(engine, run_id, sample.id, f"{type(err).__name__}: {err}")
        return "failed"
    write_label(engine, run_id, sample.id, to_record(lab))
    return "done"


def register_samples(engine, dataset: str, source: str, samples: list[Sample]) -> int:
    """Upsert the dataset and its samples into the store (labels reference them); returns the dataset id."""
    import json

    from evocomp.store import ensure_dataset, upsert_samples

    dataset_id = ensure_dataset(engine, dataset, source)
    rows = [
        {
            "id": s.id,
            "split": s.split,
            "qtype": s.meta.get("qtype"),
            "question": s.question,
            "answer": s.answer,
            "image": str(s.image),
            "meta": json.loads(json.dumps(s.meta, default=str)),
        }
        for s in samples
    ]
    for start in range(0, len(rows), 500):
        upsert_samples(engine, dataset_id, rows[start : start + 500])
    return dataset_id
