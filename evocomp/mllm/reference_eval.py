"""How well a reference model separates good token selections from bad ones (built-in benchmarks).

On the test split: full-token accuracy, and at each keep ratio the accuracy of
random, oracle (the patches that hold the answer first, then background), objects
(the answer's patches, then the other objects) and anti-oracle (the answer's patches
last) selections, per question type; plus how meaningful every visual token's
nearest vocabulary word is (the labeling engine groups tokens by it).

    evocomp mllm eval --data data/prepared --model models/mllm --out metrics/mllm.json
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch

from evocomp.data import scenes, shapes
from evocomp.data.samples import Sample
from evocomp.evaluation.answers import is_correct
from evocomp.features.grouping import nearest_vocab
from evocomp.tokens import check_sample_grid, keep_count, ratio_key

RATIOS = (0.5, 1 / 3, 1 / 4.5, 1 / 9)
SELECTIONS = ("random", "oracle", "objects", "anti")


def object_patches(objects: list[dict]) -> dict[int, dict]:
    """Patch index -> the object on it: shapes-vqa objects sit on one ``cell``, scenes-vqa
    objects cover ``patches``."""
    return {p: o for o in objects for p in o.get("patches", [o.get("cell")])}


def oracle_sets(s: Sample, n: int, k: int) -> dict[str, torch.Tensor]:
    """Kept sets of k tokens for a built-in benchmark's sample, by what they put first.

    ``oracle``: the answer's patches (scenes-vqa: each needed object's anchor first), then
    background, then the other objects; ``objects``: the answer's patches, then the other
    objects (what an object-seeking selector keeps: no background at small k); ``anti``: the
    answer's patches last.
    """
    if "relevant" not in s.meta or "objects" not in s.meta:
        raise ValueError(
            f"sample {s.id} has no ground-truth patch metadata (not shapes-vqa or scenes-vqa?)"
        )
    check_sample_grid(s.id, s.meta, n)
    objects = s.meta["objects"]
    shapes_like = bool(objects) and "cell" in objects[0]  # else scenes-vqa
    order = (shapes if shapes_like else scenes).oracle_order(s.meta["relevant"], objects, n)
    rel = order[: len(s.meta["relevant"])]
    cells = set(object_patches(objects))
    objects = (
        rel
        + [i for i in order if i in cells and i not in rel]
        + [i for i in order if i not in cells]
    )
    anti = [i for i in order if i not in rel][::-1] + rel
    return {
        name: torch.tensor(sorted(o[:k]))
        for name, o in (("oracle", order), ("objects", objects), ("anti", anti))
    }


def evaluate_reference(
    mllm, samples: list[Sample], ratios=RATIOS, seed: int = 0, batch: int = 128
) -> dict:
    """Accuracy per method, ratio and question type; nearest-word statistics."""
    if not samples:
        raise ValueError("no test samples to evaluate")
    n = mllm.n_tokens
    gen = torch.Generator().manual_seed(seed)
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)  # (method@ratio, qtype) -> hits
    words = mllm.tokenizer.convert_ids_to_tokens
    vocab = mllm.vocab_embeddings()
    distinct, meaningful = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        vis = mllm.visual_tokens([s.load_image() for s in chunk])  # (B, N, D)
        qs = [s.question for s in chunk]
        runs: dict[str, list] = {"full": [None] * len(chunk)}
        for r in ratios:
            k = keep_count(r, n)
            sets = [oracle_sets(s, n, k) for s in chunk]
            for name in SELECTIONS[1:]:
                runs[f"{name}@{ratio_key(r)}"] = [x[name] for x in sets]
            runs[f"random@{ratio_key(r)}"] = [
                torch.randperm(n, generator=gen)[:k].sort().values for _ in chunk
            ]
        for name, kept in runs.items():
            answers = mllm.generate(qs, list(vis), kept, max_new_tokens=4)
            for s, a in zip(chunk, answers, strict=True):
                hits[(name, s.meta.get("qtype", "all"))].append(is_correct(a, s.answer))
        for s, v in zip(chunk, vis, strict=True):
            near = words(nearest_vocab(v, vocab).tolist())
            distinct.append(len(set(near)))
            cells = object_patches(s.meta.get("objects", []))
            ok = [
                (w in (cells[i]["colour"], cells[i]["shape"])) if i in cells else w == "background"
                for i, w in enumerate(near)
            ]
            meaningful.append(sum(ok) / len(ok))
    return summarise(hits, ratios) | {
        "visual_tokens": n,
        "median_distinct_words": statistics.median(distinct),
        "meaningful_nearest_word": statistics.fmean(meaningful),
    }


def summarise(hits: dict[tuple[str, str], list[bool]], ratios) -> dict:
    def acc(name: str, qtype: str | None = None) -> float:
        vals = [
            h
            for (m, q), hs in hits.items()
            if m == name and (qtype is None or q == qtype)
            for h in hs
        ]
        return round(sum(vals) / max(1, len(vals)), 4)

    qtypes = sorted({q for _, q in hits})
    out: dict = {
        "full": acc("full"),
        "full_by_type": {q: acc("full", q) for q in qtypes},
        "ratios": {},
    }
    for r in ratios:
        key = ratio_key(r)
        out["ratios"][key] = {m: acc(f"{m}@{key}") for m in SELECTIONS}
        out["ratios"][key]["by_type"] = {
            m: {q: acc(f"{m}@{key}", q) for q in qtypes} for m in SELECTIONS
        }
    out["samples"] = len(next(iter(hits.values()))) and sum(
        len(v) for (m, _), v in hits.items() if m == "full"
    )
    return out
