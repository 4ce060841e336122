"""Glue of ``evocomp evaluate``: load what the harness needs, time it, shape eval.json.

The harness itself is ``evocomp/evaluate.py``; this module reads files and
formats the result (metrics/eval.json, plots/retention.csv, a printed table).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pandas as pd

from evocomp.config import EvaluateParams, Params
from evocomp.evaluate import Selector, evaluate_methods, summarise
from evocomp.features import ensure_features
from evocomp.mllm.hf_llava import checkpoint_info
from evocomp.mllm.quality import budget, ratio_key
from evocomp.prepared import load_prepared
from evocomp.training import load_label_set


def _latency(mllm, info, samples, fstore, selector, ratios, methods, repeats: int = 3) -> dict:
    """Median seconds of selector + LLM prefill (one new token) per method and ratio, on a few samples."""
    out: dict = {"full": []}
    few = samples[:8]
    feats = [fstore.get(s.id) for s in few]
    for s, f in zip(few, feats, strict=True):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mllm.generate([s.question], [f.tokens], [None], max_new_tokens=1)
            ts.append(time.perf_counter() - t0)
        out["full"].append(min(ts))
    for method in [m for m in methods if m not in ("visionzip", "oracle")]:
        for r in ratios:
            k = budget(r, info["n_tokens"])
            key = f"{method}@{ratio_key(r)}"
            out[key] = []
            for s, f in zip(few, feats, strict=True):
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    scores = selector.scores(method, [s], [f])
                    kept = selector.kept(method, k, [s], [f], scores)
                    mllm.generate([s.question], [f.tokens], kept, max_new_tokens=1)
                    ts.append(time.perf_counter() - t0)
                out[key].append(min(ts))
    return {k: round(statistics.median(v), 5) for k, v in out.items()}


def run_evaluation(
    params: Params,
    data: Path,
    features_dir: Path,
    labels: Path,
    compressor_dir: Path,
    mllm,
    speed: Path,
    progress_bar,
) -> dict:
    p = params.evaluate
    info = checkpoint_info(mllm.path)
    samples = load_prepared(data, "test", p.max_samples)
    if not samples:
        raise ValueError(f"{data}: the test split is empty")
    fstore = ensure_features(mllm, samples, features_dir, params.runtime.batch_size)
    methods = list(p.methods)
    compressor, label_df = None, None
    if "evocomp" in methods:
        from evocomp.compressor import load_compressor

        compressor, extra = load_compressor(compressor_dir)
        if extra.get("model_id") not in (None, info["model_id"]):
            raise ValueError(
                f"{compressor_dir} was trained on labels of model {extra['model_id']!r}, "
                f"not {info['model_id']!r}: retrain it (`evocomp train`)"
            )
    if "oracle" in methods:
        label_df = load_label_set(labels)
        label_df = label_df[label_df["split"] == "test"]
    n_text = len(mllm.encode(samples[0].question).prefix) + len(
        mllm.encode(samples[0].question).suffix
    )
    with progress_bar(len(samples), f"evaluate (l={p.prune_layer})") as bar:
        raw = evaluate_methods(
            mllm,
            info,
            samples,
            fstore,
            p.ratios,
            methods,
            compressor,
            label_df,
            p.prune_layer,
            p.seed,
            progress=bar,
        )
    result = summarise(raw, p.ratios, methods, info, n_text, p.prune_layer)
    if compressor is not None and info["layers"] > 1:
        # The paper's two pruning positions: l=0 (above) and l=2 (after two LLM layers;
        # a 2-layer LLM can only be pruned after layer 1, which is then reported).
        other = min(2, info["layers"] - 1) if p.prune_layer == 0 else 0
        with progress_bar(len(samples), f"evaluate evocomp (l={other})") as bar:
            raw2 = evaluate_methods(
                mllm,
                info,
                samples,
                fstore,
                p.ratios,
                ["evocomp"],
                compressor,
                None,
                other,
                p.seed,
                progress=bar,
            )
        alt = summarise(raw2, p.ratios, ["evocomp"], info, n_text, other)
        result[f"evocomp_l{other}"] = {r: alt["ratios"][r]["evocomp"] for r in alt["ratios"]}
    selector = Selector(mllm, info, compressor, label_df, p.seed)
    result["latency_seconds"] = _latency(mllm, info, samples, fstore, selector, p.ratios, methods)
    result["model_id"] = info["model_id"]
    if speed.is_file():
        bench = json.loads(speed.read_text())
        result["prefill_speedup"] = bench.get("prefill_speedup", {})
        result["end_to_end_speedup"] = bench.get("end_to_end_speedup", {})
        result["speedup_source"] = f"{speed} ({bench.get('command', 'bench/speedup.py')})"
    return result


def write_plot(path: Path, result: dict) -> None:
    rows = [
        {"method": m, "ratio": float(r), "accuracy": acc, "retention": result["retention"][r][m]}
        for r, accs in result["ratios"].items()
        for m, acc in accs.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).sort_values(["method", "ratio"]).to_csv(path, index=False)


def print_table(result: dict) -> str:
    # eval.json is written with sorted keys: restore the reading order (largest budget
    # first, the methods as params.yaml lists them)
    ratios = sorted(result["ratios"], key=float, reverse=True)
    present = list(next(iter(result["ratios"].values())))
    order = EvaluateParams.model_fields["methods"].default
    methods = [m for m in order if m in present] + [m for m in present if m not in order]
    lines = [
        f"full-token accuracy {result['full']:.3f} on {result['samples']} test samples "
        f"(prune layer {result['prune_layer']}); cells: accuracy (retention %)",
        f"{'method':<11}" + "".join(f"{'keep ' + r:>18}" for r in ratios),
    ]
    for m in methods:
        lines.append(
            f"{m:<11}"
            + "".join(
                f"{result['ratios'][r][m]:>10.3f} ({result['retention'][r][m]:5.1f})"
                for r in ratios
            )
        )
    for key in [k for k in result if k.startswith("evocomp_l")]:
        full = result["full"] or 1
        lines.append(
            f"{key:<11}"
            + "".join(
                f"{result[key][r]:>10.3f} ({100 * result[key][r] / full:5.1f})" for r in ratios
            )
        )
    return "\n".join(lines)
