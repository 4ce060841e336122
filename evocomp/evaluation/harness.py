"""Every method x keep ratio on the test split: accuracy, retention, tokens, FLOPs, latency.

Methods: full, the heuristics of ``baselines`` (VisionZip as its embedding-producing
dominant + contextual variant), SparseVLM and PruMerge (:mod:`evocomp.evaluation.guided`),
the trained EvoComp compressor, and the GA oracle (labels searched on the test samples
themselves: an upper bound).

    evocomp evaluate --out metrics/eval.json
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from evocomp.baselines import select, visionzip_merge
from evocomp.compress.fit import Item, collate
from evocomp.compress.model import select_topk, select_topk_filled
from evocomp.data.samples import Sample, sample_seed
from evocomp.evaluation.answers import is_correct
from evocomp.evaluation.guided import MERGERS, prumerge, rater_scores
from evocomp.features.cache import FeatureStore
from evocomp.tokens import keep_count, nearest_budget, ratio_key
from evocomp.tolerance import loss_on_grid


def prefill_flops(
    info: dict, n_text: int, n_visual: int, n_kept: int, prune_layer: int = 0
) -> float:
    """Analytic LLM prefill FLOPs: 2 x (per-token weights) x tokens + 4 x hidden x L^2 per layer.

    Per-token weights per layer ~ 4 h^2 (attention) + 3 h f (gated MLP); the first
    ``prune_layer`` layers see all visual tokens, the rest only the kept ones.
    """
    h, f, layers = info["hidden_size"], info["ffn"], info["layers"]
    per_layer = 4 * h * h + 3 * h * f

    def cost(L: int, n: int) -> float:
        return n * (2 * per_layer * L + 4 * h * L * L)

    full, kept = n_text + n_visual, n_text + n_kept
    return cost(full, prune_layer) + cost(kept, layers - prune_layer)


def oracle_ranking(label_row) -> torch.Tensor:
    """Token scores from a GA label: kept tokens first, then by elite frequency."""
    n = int(label_row.n_tokens)
    score = torch.zeros(n)
    if label_row.soft is not None:
        score += torch.as_tensor(list(label_row.soft), dtype=torch.float32)
    score[torch.as_tensor(list(label_row.kept), dtype=torch.long)] += 2.0
    return score - torch.arange(n) * 1e-6  # deterministic ties: earlier token first


def route_by_answer_loss(
    mllm,
    info: dict,
    compressors: dict,
    samples: list[Sample],
    fstore: FeatureStore,
    ratios,
    objective: str = "answer",
    batch: int = 64,
    progress=None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``evaluate.choose: val_answer_loss`` / ``select_answer_loss``: which of several
    compressors (``{label keep ratio: compressor}``) serves each keep ratio, chosen on held-out
    samples (the val split, or the train images left out of fitting), never on the test split
    the table reports.

    Each compressor ranks every validation sample's tokens; the MLLM answers from its top k at
    each ratio (k as in evaluation) and the sample's answer loss is taken as the search takes
    it (:func:`evocomp.labeling.fitness.fitness_fn`, on the loss grid; ``objective`` is
    ``label.objective``). The lowest mean serves the ratio; ties go to :func:`nearest_budget`'s
    order. Returns ``(route, losses)``: ``ratio_key(ratio) -> label keep ratio`` and
    ``ratio_key(ratio) -> {ratio_key(label keep ratio): mean loss}``. ``progress(done,
    total)`` is called as the samples finish."""
    from evocomp.labeling.fitness import fitness_fn

    if not samples:
        raise ValueError("no held-out samples to choose a compressor on")
    sums: dict[tuple[float, float], float] = defaultdict(float)
    selectors = {
        lr: Selector(mllm, info, model, seed=0, label_ratio=lr)
        for lr, model in sorted(compressors.items())
    }
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        # each sample's features and prompt (and, for distill, its all-token answer) once,
        # shared by every compressor
        feats = [fstore.get(s.id) for s in chunk]
        fits = [fitness_fn(mllm, s, f, objective) for s, f in zip(chunk, feats, strict=True)]
        for label_ratio, sel in selectors.items():
            scores = sel.scores("evocomp", chunk, feats)
            for r in ratios:
                kept = sel.kept("evocomp", r, chunk, feats, scores)
                for fit, idx in zip(fits, kept, strict=True):
                    sums[(r, label_ratio)] += loss_on_grid(float(fit(idx[None])[0]))
        if progress:
            progress(min(start + batch, len(samples)), len(samples))
    losses = {
        ratio_key(r): {
            ratio_key(lr): loss_on_grid(sums[(r, lr)] / len(samples)) for lr in sorted(compressors)
        }
        for r in ratios
    }
    route = {
        ratio_key(r): min(
            compressors,
            key=lambda lr, r=r: (losses[ratio_key(r)][ratio_key(lr)], abs(math.log(r / lr)), lr),
        )
        for r in ratios
    }
    return route, losses


class Selector:
    """Kept sets (or merged embeddings) for one method on one batch of samples."""

    def __init__(
        self,
        mllm,
        info: dict,
        compressor=None,
        labels=None,
        seed: int = 0,
        label_ratio: float | None = None,
        route: dict[str, float] | None = None,
    ):
        """``labels``: a label set (DataFrame) or several, one per budget; the oracle at a
        ratio uses the label searched for that ratio's k where there is one, else the first
        set's ranking (its kept tokens, then the elite's keep frequency).

        ``label_ratio``: the keep ratio of the compressor's training labels (its
        ``label_keep_ratio``); ``evocomp_fill`` keeps the compressor's top tokens up to it and
        fills the rest by DivPrune's max-min diversity from them.

        ``compressor``: one compressor, or ``{label_keep_ratio: compressor}``, one per label
        budget: each ratio is then served by the one trained nearest it (:meth:`compressor_for`),
        or by ``route`` (``ratio_key(ratio)`` -> label keep ratio; :func:`route_by_answer_loss`)."""
        self.mllm, self.info, self.seed = mllm, info, seed
        self.route = dict(route or {})
        if isinstance(compressor, dict):
            self.compressors = dict(sorted(compressor.items()))
        else:
            self.compressors = {} if compressor is None else {label_ratio: compressor}
        sets = [] if labels is None else [labels] if hasattr(labels, "itertuples") else labels
        self.labels = {r.sample_id: r for r in sets[0].itertuples(index=False)} if sets else {}
        self.labels_at_k = {
            (r.sample_id, int(r.k)): r for df in sets for r in df.itertuples(index=False)
        }

    def compressor_for(self, ratio: float | None):
        """``(compressor, its label_keep_ratio)`` serving keep ratio ``ratio``: the one the
        route names for it, else the one whose labels' ratio is :func:`nearest_budget`, or
        the only one."""
        if not self.compressors:
            raise ValueError("evocomp needs a trained compressor")
        if len(self.compressors) == 1:
            return next(iter(self.compressors.items()))[::-1]
        if ratio is None:
            raise ValueError("several compressors: name the keep ratio to pick one")
        label_ratio = self.route.get(ratio_key(ratio)) or nearest_budget(self.compressors, ratio)
        return self.compressors[label_ratio], label_ratio

    def scores(
        self, method: str, samples: list[Sample], feats: list, ratio: float | None = None
    ) -> list[torch.Tensor] | None:
        """Per-sample scores of ``method`` (None for methods that select without them);
        EvoComp's come from the compressor serving ``ratio``."""
        if method in ("evocomp", "evocomp_fill"):
            compressor, _ = self.compressor_for(ratio)
            items = [Item(f.tokens, f.cells, f.text, torch.zeros(f.tokens.shape[0])) for f in feats]
            b = collate(items)
            with torch.no_grad():
                out = compressor(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask)
            return [row[: f.tokens.shape[0]] for row, f in zip(out.logits, feats, strict=True)]
        if method == "oracle":
            missing = [s.id for s in samples if s.id not in self.labels]
            if missing:
                raise ValueError(
                    f"no GA label for test sample {missing[0]} (label the test split for the oracle)"
                )
            return [oracle_ranking(self.labels[s.id]) for s in samples]
        if method == "sparsevlm":  # the raters' attention at FastV's layer (one forward each)
            layer = min(2, self.mllm.n_layers)
            return [
                rater_scores(
                    self.mllm.prompt_attention(
                        self.mllm.encode(s.question), f.tokens, layer, f.layout, f.extra
                    )
                )
                for s, f in zip(samples, feats, strict=True)
            ]
        return None

    def kept(
        self, method: str, ratio: float, samples: list[Sample], feats: list, scores
    ) -> list[torch.Tensor]:
        """Each sample's kept set at ``ratio`` of its own N."""
        ks = [keep_count(ratio, f.tokens.shape[0]) for f in feats]
        if method == "oracle":  # the label searched at this k, where the budgets include it
            scores = [
                oracle_ranking(self.labels_at_k[(s.id, k)]) if (s.id, k) in self.labels_at_k else sc
                for s, k, sc in zip(samples, ks, scores, strict=True)
            ]
        if method == "evocomp_fill":  # ranked up to the label's size, then diversity
            _, label_ratio = self.compressor_for(ratio)
            if label_ratio is None:
                raise ValueError("evocomp_fill needs the compressor's label_keep_ratio")
            return [
                select_topk_filled(sc, f.tokens, k, label_ratio)
                for f, sc, k in zip(feats, scores, ks, strict=True)
            ]
        if method == "sparsevlm":  # attention scores: FastV's top-k on the 1e-6 grid
            return [select("fastv", k, text_attn=sc) for sc, k in zip(scores, ks, strict=True)]
        if scores is not None:
            return [select_topk(sc, k=k) for sc, k in zip(scores, ks, strict=True)]
        return [
            select(
                method,
                k,
                tokens=f.tokens,
                grid=f.cells,
                text_attn=f.text_attn,
                cls_attn=f.cls_attn,
                seed=sample_seed(self.seed, s.id),
            )
            for s, f, k in zip(samples, feats, ks, strict=True)
        ]


def evaluate_methods(
    mllm,
    info: dict,
    samples: list[Sample],
    fstore: FeatureStore,
    ratios,
    methods,
    compressor=None,
    labels=None,
    prune_layer: int = 0,
    seed: int = 0,
    batch: int = 64,
    max_new_tokens: int = 8,
    progress=None,
    label_ratio: float | None = None,
    route: dict[str, float] | None = None,
) -> dict:
    """Accuracy of every method at every ratio (plus full), per question type; ``route``:
    which of several compressors serves each ratio (:class:`Selector`)."""
    if not samples:
        raise ValueError("no test samples to evaluate")
    sel = Selector(mllm, info, compressor, labels, seed, label_ratio, route)
    hits: dict[str, list[bool]] = defaultdict(list)
    n_visual: list[int] = []  # each sample's N
    by_type: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        feats = [fstore.get(s.id) for s in chunk]
        vis = [f.tokens for f in feats]
        lays, extras = [f.layout for f in feats], [f.extra for f in feats]
        n_visual.extend(f.tokens.shape[0] for f in feats)
        qs = [s.question for s in chunk]

        def record(name: str, answers: list[str], chunk: list[Sample] = chunk) -> None:
            for s, a in zip(chunk, answers, strict=True):
                ok = is_correct(a, s.answer)
                hits[name].append(ok)
                by_type[(name, s.meta.get("qtype") or "all")].append(ok)

        record(
            "full",
            mllm.generate(
                qs, vis, [None] * len(chunk), max_new_tokens, layouts=lays, extras=extras
            ),
        )
        for method in methods:
            per_ratio = len(sel.compressors) > 1 and method in ("evocomp", "evocomp_fill")
            scores = None if per_ratio else sel.scores(method, chunk, feats)
            for r in ratios:
                name = f"{method}@{ratio_key(r)}"
                if per_ratio:  # each ratio ranked by its own compressor
                    scores = sel.scores(method, chunk, feats, r)
                if method in MERGERS:
                    merge = visionzip_merge if method == "visionzip" else prumerge
                    merged = [
                        merge(f.tokens, f.cls_attn, keep_count(r, f.tokens.shape[0])) for f in feats
                    ]
                    answers = mllm.generate(
                        qs,
                        [m[0] for m in merged],
                        [None] * len(chunk),
                        max_new_tokens,
                        vis_pos=[m[1] for m in merged],
                        layouts=lays,
                        extras=extras,
                    )
                else:
                    kept = sel.kept(method, r, chunk, feats, scores)
                    answers = mllm.generate(
                        qs,
                        vis,
                        kept,
                        max_new_tokens,
                        prune_layer=prune_layer,
                        layouts=lays,
                        extras=extras,
                    )
                record(name, answers)
        if progress:
            progress(min(start + batch, len(samples)), len(samples))
    return {"hits": hits, "by_type": by_type, "n_tokens": n_visual}


def paired_difference(ours: list[bool], theirs: list[bool]) -> dict:
    """EvoComp's accuracy minus another method's on the same samples, with the standard error
    of that paired difference (the per-sample differences' standard deviation / sqrt(n)), and
    the samples only one of the two answers. Only those samples carry the difference, so this
    is the error of a comparison on one test set; it is smaller than the unpaired one when the
    two methods miss mostly the same samples, not otherwise."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired difference of {len(ours)} and {len(theirs)} answers")
    n = max(1, len(ours))
    d = [int(a) - int(b) for a, b in zip(ours, theirs, strict=True)]
    diff = sum(d) / n
    return {
        "diff": round(diff, 4),
        "stderr": round(math.sqrt(max(0.0, sum(x * x for x in d) / n - diff * diff) / n), 4),
        "evocomp_only": d.count(1),
        "other_only": d.count(-1),
    }


def summarise(raw: dict, ratios, methods, info: dict, n_text: int, prune_layer: int) -> dict:
    def acc(xs: list[bool]) -> float:
        return round(sum(xs) / max(1, len(xs)), 4)

    full = acc(raw["hits"]["full"])
    out: dict = {
        "full": full,
        "samples": len(raw["hits"]["full"]),
        "prune_layer": prune_layer,
        "ratios": {},
        "retention": {},
        "stderr": {},  # binomial standard error of each accuracy: sqrt(p (1 - p) / n)
        # with evocomp: "paired", its accuracy minus each other method's on the same samples
        "tokens": {},
        "prefill_flops": {},
        "by_type": {},
    }
    ns = raw.get("n_tokens") or [info["n_tokens"]]

    def mean(xs):  # an int when every sample has the same N (the usual case)
        return xs[0] if len(set(xs)) == 1 else round(sum(xs) / len(xs), 2)

    def flops(r: float | None) -> float:
        return mean(
            [prefill_flops(info, n_text, n, keep_count(r, n) if r else n, prune_layer if r else 0)
             for n in ns]
        )  # fmt: skip

    full_flops = flops(None)
    for r in ratios:
        key = ratio_key(r)
        out["ratios"][key] = {m: acc(raw["hits"][f"{m}@{key}"]) for m in methods}
        out["retention"][key] = {
            m: round(100 * v / full, 2) if full else 0.0 for m, v in out["ratios"][key].items()
        }
        out["stderr"][key] = {
            m: round(math.sqrt(v * (1 - v) / max(1, out["samples"])), 4)
            for m, v in out["ratios"][key].items()
        }
        if "evocomp" in methods:
            out.setdefault("paired", {})[key] = {
                m: paired_difference(raw["hits"][f"evocomp@{key}"], raw["hits"][f"{m}@{key}"])
                for m in methods
                if m not in ("evocomp", "oracle")
            }
        out["tokens"][key] = mean([keep_count(r, n) for n in ns])
        out["prefill_flops"][key] = {"flops": flops(r), "ratio_to_full": flops(r) / full_flops}
    types = sorted({q for (_, q) in raw["by_type"]})
    out["by_type"] = {
        name: {q: acc(raw["by_type"][(name, q)]) for q in types if (name, q) in raw["by_type"]}
        for name in sorted(raw["hits"])
    }
    return out
