"""Label one sample: its search space, the heuristics at the same size, the search, the record.

:func:`label_and_store` is the unit of work of every label path: the Prefect flow's tasks
and ``evocomp label --in-process`` both call it per sample (through
:func:`evocomp.labeling.steps.label_batch`).

    evocomp label --split test
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evocomp.baselines import heuristic_sets
from evocomp.compress.model import (
    WEIGHTS_FILE,
    TokenCompressor,
    keep_logits,
    load_compressor,
    select_topk,
)
from evocomp.config import SearchParams
from evocomp.data.samples import Sample, sample_seed
from evocomp.errors import ModelError
from evocomp.features.cache import Features
from evocomp.labeling.fitness import fitness_fn
from evocomp.search import SearchResult, SearchSpace, search
from evocomp.search.worth import elimination_order, rank_target
from evocomp.store.records import LabelRecord
from evocomp.tolerance import loss_on_grid, scores_on_grid


@dataclass(frozen=True)
class Labelled:
    result: SearchResult
    full_loss: float
    groups: list[int]
    seconds: float
    heuristic_kept: dict[str, list[int]]  # each heuristic's set, the one its loss was taken on
    group_words: list[str]  # the vocabulary word of each group


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
    space = SearchSpace.build(feats.nearest, None, params)  # groups and k, once
    fitness = fitness_fn(mllm, sample, feats, params.objective)
    seed = sample_seed(params.seed, sample.id)
    hsets = heuristic_sets(
        space.k,
        tokens=feats.tokens,
        grid=feats.cells,
        text_attn=feats.text_attn,
        cls_attn=feats.cls_attn,
        seed=seed,
        methods=params.heuristics,
    )
    warm = warm_start_sets(mllm, feats, space, params)
    result = search(space, fitness, params, seed, hsets, progress, warm_sets=warm)
    if params.soft_target == "elimination":
        order, forwards = elimination_order(result.kept, fitness)
        result = dataclasses.replace(
            result,
            soft=rank_target(order, result.n_tokens),
            n_forwards=result.n_forwards + forwards,
        )
    full = loss_on_grid(fitness(torch.arange(space.n_tokens)[None])[0])  # as the search's
    if not math.isfinite(full) or not math.isfinite(result.loss):
        raise ValueError(f"sample {sample.id}: non-finite loss (full {full}, label {result.loss})")
    words = mllm.tokenizer.convert_ids_to_tokens([int(feats.nearest[m[0]]) for m in space.members])
    return Labelled(
        result,
        full,
        groups=list(space.group_of),
        seconds=time.perf_counter() - t0,
        heuristic_kept={m: sorted(idx.tolist()) for m, idx in hsets.items()},
        group_words=list(words),
    )


@functools.lru_cache(maxsize=4)
def _load_warm(directory: str, stamp: tuple[int, int], model_id: str) -> TokenCompressor:
    """Loaded once per file state in this process: ``stamp`` (the weights' mtime and size,
    a stat, not a read of the weights per sample) changes when a compressor is retrained in
    place, and it is loaded again."""
    model, extra = load_compressor(directory)
    if extra.get("model_id") not in (None, model_id):
        raise ModelError(
            f"label.warm_start {directory} was trained for model {extra['model_id']!r}, not "
            f"{model_id!r}: train a compressor on this model's labels (`evocomp train`)"
        )
    return model


def check_warm_start(directory: str, model_id: str) -> TokenCompressor:
    """The ``label.warm_start`` compressor; raises FileNotFoundError (no compressor there) or
    ModelError (one of another model)."""
    where = Path(directory).resolve()
    weights = where / WEIGHTS_FILE
    stat = weights.stat() if weights.is_file() else None
    stamp = (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)  # load_compressor says why
    return _load_warm(str(where), stamp, model_id)


def warm_start_sets(mllm, feats: Features, space: SearchSpace, params: SearchParams) -> dict:
    """``{"compressor": indices}``: the ``label.warm_start`` compressor's pick for the sample,
    a candidate of the label's size (budget mode: its top k; paper mode: its best-scored
    member of each group), or ``{}`` without a warm start."""
    if params.warm_start is None:
        return {}
    model = check_warm_start(params.warm_start, mllm.model_id)
    logits = keep_logits(model, feats.tokens, feats.cells, feats.text)
    if params.mode == "budget":
        return {"compressor": select_topk(logits, k=space.k)}
    score = scores_on_grid(logits).tolist()  # ties to the lower index, on every machine
    best = [max(m, key=lambda t: (score[t], -t)) for m in space.members]
    return {"compressor": torch.tensor(best)}


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
        heuristic_kept=lab.heuristic_kept,
        group_words=lab.group_words,
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
