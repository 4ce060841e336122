"""The `evaluate` stage: load what the harness needs, run it at both pruning positions, time it.

    evocomp evaluate --out metrics/eval.json

The harness itself is :mod:`evocomp.evaluation.harness`; how the result is shown is
:mod:`evocomp.evaluation.report`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from evocomp.compress.model import load_compressor
from evocomp.config import Params
from evocomp.data.prepared import load_prepared
from evocomp.data.samples import selection_share
from evocomp.evaluation.guided import MERGERS
from evocomp.evaluation.harness import (
    Selector,
    evaluate_methods,
    route_by_answer_loss,
    summarise,
)
from evocomp.evaluation.routes import resolve_route, route_of_evaluation
from evocomp.features.compute import ensure_features
from evocomp.labelset import load_label_set
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.tokens import nearest_budget, ratio_key

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _latency(mllm, info, samples, fstore, selector, ratios, methods, repeats: int = 3) -> dict:
    """Median seconds of selector + LLM prefill (one new token) per method and ratio, on a few samples."""
    out: dict = {"full": []}
    few = samples[:8]
    feats = [fstore.get(s.id) for s in few]
    for s, f in zip(few, feats, strict=True):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mllm.generate([s.question], [f.tokens], [None], 1, layouts=[f.layout], extras=[f.extra])
            ts.append(time.perf_counter() - t0)
        out["full"].append(min(ts))
    for method in [m for m in methods if m not in (*MERGERS, "oracle")]:
        for r in ratios:
            key = f"{method}@{ratio_key(r)}"
            out[key] = []
            for s, f in zip(few, feats, strict=True):
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    scores = selector.scores(method, [s], [f], r)
                    kept = selector.kept(method, r, [s], [f], scores)
                    mllm.generate(
                        [s.question], [f.tokens], kept, 1, layouts=[f.layout], extras=[f.extra]
                    )
                    ts.append(time.perf_counter() - t0)
                out[key].append(min(ts))
    return {k: round(statistics.median(v), 5) for k, v in out.items()}


def _load_compressors(dirs: Path | list[Path], model_id: str, fill: bool) -> dict:
    """``{label_keep_ratio: (folder, compressor, train.select_share)}`` of one compressor or
    several (one per label budget). Refuses another model's compressor, a fill or several
    without the labels' ratio, and two compressors of one label ratio."""
    dirs = [dirs] if isinstance(dirs, str | Path) else list(dirs)
    loaded = {}
    for d in dirs:
        model, extra = load_compressor(d)
        label_ratio = extra.get("label_keep_ratio")
        if (fill or len(dirs) > 1) and label_ratio is None:
            raise ValueError(
                f"{d} does not record its labels' keep ratio (trained before evocomp_fill "
                "existed): retrain it (`evocomp train`), or drop evocomp_fill from "
                "evaluate.methods and pass one --compressor"
            )
        if extra.get("model_id") not in (None, model_id):
            raise ValueError(
                f"{d} was trained on labels of model {extra['model_id']!r}, "
                f"not {model_id!r}: retrain it (`evocomp train`)"
            )
        if label_ratio in loaded:
            raise ValueError(
                f"{d} and {loaded[label_ratio][0]} were both trained on labels of keep ratio "
                f"{label_ratio}: pass one compressor per label budget"
            )
        loaded[label_ratio] = (d, model, extra.get("params", {}).get("select_share", 0.0))
    return loaded


def _choice_samples(data: Path, loaded: dict, rule: str, limit: int | None) -> list:
    """The samples ``evaluate.choose`` compares compressors on: the val split
    (``val_answer_loss``), or the train images every compressor left out of fitting
    (``select_answer_loss``: each must have been trained with the same ``train.select_share``
    > 0, else that share is not held out of all of them)."""
    if rule == "val_answer_loss":
        val = load_prepared(data, "val", limit)
        if not val:
            raise ValueError(
                f"{data}: the val split is empty, and evaluate.choose val_answer_loss picks the "
                "compressors on it (set evaluate.choose: nearest)"
            )
        return val
    shares = {d: share for d, _, share in loaded.values()}
    common = Counter(shares.values()).most_common(1)[0][0]
    odd = [(d, v) for d, v in shares.items() if not v or v != common]
    if odd:
        folder, share = odd[0]
        raise ValueError(
            f"{folder} was trained with train.select_share {share}, and evaluate.choose "
            "select_answer_loss needs every compressor trained with the same share > 0 "
            f"(here: {sorted(set(shares.values()))}): retrain them with one, or set "
            "evaluate.choose: nearest"
        )
    held = selection_share(load_prepared(data, "train"), next(iter(shares.values())))[:limit]
    if not held:
        raise ValueError(
            f"{data}: no train image falls in the selection share, and evaluate.choose "
            "select_answer_loss picks the compressors on those (raise train.select_share)"
        )
    return held


def _given_route(path: Path, loaded: dict, ratios) -> tuple[dict, dict]:
    """``(route, choice)`` from another evaluation's ``compressor_for_ratio`` (``evocomp
    evaluate --route``) for several compressors: each ratio it names is served by the
    compressor it names, which must be one of ``loaded``; any other ratio by the nearest
    budget's, as deployment serves it."""
    named = _named_route(path, loaded)
    route = {}
    for r in ratios:
        key = ratio_key(r)
        route[key] = named[key] if key in named else nearest_budget(loaded, r)
    return route, {"rule": "route", "route": str(path)}


def _named_route(path: Path, loaded: dict) -> dict:
    """The route of ``path``'s eval.json as ratio key -> label keep ratio of ``loaded``."""
    by_folder = {d: lr for lr, (d, _, _) in loaded.items()}
    return resolve_route(route_of_evaluation(path), by_folder, str(path), "--compressor folders")


def _route(params: Params, data: Path, features_dir: Path, mllm, info, loaded, progress):
    """``(route, choice)`` for several compressors (``evaluate.choose``): which label ratio
    serves each evaluated ratio, and what eval.json records about the choice."""
    p = params.evaluate
    models = {lr: m for lr, (_, m, _) in loaded.items()}
    if p.choose == "nearest":
        return {ratio_key(r): nearest_budget(models, r) for r in p.ratios}, {"rule": "nearest"}
    samples = _choice_samples(data, loaded, p.choose, p.max_samples)
    split = "val" if p.choose == "val_answer_loss" else "select"
    store = ensure_features(mllm, samples, features_dir, params.runtime.batch_size)
    route, losses = route_by_answer_loss(
        mllm, info, models, samples, store, p.ratios, params.label.objective,
        progress=(lambda done, total: progress(f"choose compressors ({split})", done, total))
        if progress else None,
    )  # fmt: skip
    # the val rule's keys are those of eval.json files written before the select rule existed
    return route, {"rule": p.choose, f"{split}_samples": len(samples), p.choose: losses}


def run_evaluation(
    params: Params,
    data: Path,
    features_dir: Path,
    labels: str | Path | list[Path],
    compressor_dir: Path | list[Path],
    mllm,
    speed: Path,
    progress: Progress | None = None,
    route_from: Path | None = None,
) -> dict:
    """``metrics/eval.json`` (DESIGN.md, Metrics files) for the test split of ``data``.

    Every method of ``params.evaluate.methods`` at every keep ratio at the configured prune
    layer, every token-selecting method at the paper's other pruning position too (``ratios_l<l>``,
    ``retention_l<l>``, ``stderr_l<l>``), latencies, and the
    real-shape speedups of ``speed`` (``bench/speedup.py``). ``progress(phase, done, total)``
    is called as test samples finish. Several ``compressor_dir``s (one per label budget)
    serve each ratio by the one trained nearest it, or (``evaluate.choose``) by the one with
    the lowest answer loss on the val split (``val_answer_loss``) or on the train images every
    compressor left out (``select_answer_loss``) (``compressor_for_ratio`` and
    ``compressor_choice`` in the result). ``route_from`` (an earlier ``eval.json``) serves
    each ratio by the compressor that evaluation chose instead: new data, the same routing.
    """
    p = params.evaluate
    info = checkpoint_info(mllm.path, mllm.prompt_override)
    samples = load_prepared(data, "test", p.max_samples)
    if not samples:
        raise ValueError(f"{data}: the test split is empty")
    fstore = ensure_features(mllm, samples, features_dir, params.runtime.batch_size)
    methods = list(p.methods)
    compressor, label_df, label_ratio, route, choice = None, None, None, None, None
    if {"evocomp", "evocomp_fill"} & set(methods):
        loaded = _load_compressors(compressor_dir, info["model_id"], "evocomp_fill" in methods)
        if len(loaded) == 1:
            ((label_ratio, (_, compressor, _)),) = loaded.items()
            if route_from is not None:  # it serves every ratio; the route may name only it
                _named_route(route_from, loaded)
        else:
            compressor = {lr: m for lr, (_, m, _) in loaded.items()}
            route, choice = (
                _given_route(route_from, loaded, p.ratios)
                if route_from is not None
                else _route(params, data, features_dir, mllm, info, loaded, progress)
            )
    if "oracle" in methods:  # one label set per budget; the first ranks at other ratios
        label_df = [
            df[df["split"] == "test"]
            for df in map(load_label_set, [labels] if isinstance(labels, str | Path) else labels)
        ]
    prompt = mllm.encode(samples[0].question)
    n_text = len(prompt.prefix) + len(prompt.suffix)

    def at_layer(layer: int, which: list[str], labels_df) -> dict:
        phase = f"evaluate (l={layer})"
        raw = evaluate_methods(
            mllm, info, samples, fstore, p.ratios, which, compressor, labels_df, layer, p.seed,
            progress=(lambda done, total: progress(phase, done, total)) if progress else None,
            label_ratio=label_ratio, route=route,
        )  # fmt: skip
        return summarise(raw, p.ratios, which, info, n_text, layer)

    result = at_layer(p.prune_layer, methods, label_df)
    selectors = [m for m in methods if m not in MERGERS]
    if selectors and info["layers"] > 1:
        # The paper's two pruning positions: l=0 (above) and l=2 (after two LLM layers; a
        # 2-layer LLM can only be pruned after layer 1, which is then reported), every method
        # that selects tokens at both, so each row compares equal things. VisionZip and
        # PruMerge merge tokens into new embeddings before the LLM: no later-layer variant.
        other = min(2, info["layers"] - 1) if p.prune_layer == 0 else 0
        alt = at_layer(other, selectors, label_df)
        for key in ("ratios", "retention", "stderr", "paired"):
            if key in alt:
                result[f"{key}_l{other}"] = alt[key]
        if "evocomp" in selectors:  # kept for readers of earlier eval.json files
            result[f"evocomp_l{other}"] = {r: alt["ratios"][r]["evocomp"] for r in alt["ratios"]}
    selector = Selector(mllm, info, compressor, label_df, p.seed, label_ratio, route)
    result["latency_seconds"] = _latency(mllm, info, samples, fstore, selector, p.ratios, methods)
    result["model_id"] = info["model_id"]
    if route:
        result["compressor_for_ratio"] = {r: str(loaded[lr][0]) for r, lr in route.items()}
        result["compressor_choice"] = choice
    if speed.is_file():
        bench = json.loads(speed.read_text())
        result["prefill_speedup"] = bench.get("prefill_speedup", {})
        result["end_to_end_speedup"] = bench.get("end_to_end_speedup", {})
        result["speedup_source"] = f"{speed} ({bench.get('command', 'bench/speedup.py')})"
    return result
