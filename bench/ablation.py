"""The paper's ablation on our benchmark: which parts of EvoComp the accuracy depends on.

    .venv/bin/python bench/ablation.py                                # 900 samples, 3 seeds
    .venv/bin/python bench/ablation.py --samples 120 --epochs 5 --train-seeds 1   # a smoke run

issue 12's table, on scenes-vqa (the scenes model, models/scenes/mllm):

    .venv/bin/python bench/ablation.py --benchmark scenes --ratios 0.333,0.222,0.111 --train-seeds 3 --out metrics/scenes/ablation.json

A held-out shapes-vqa set (``bench/_setup.py``; ``--benchmark scenes``: scenes-vqa on the scenes
model's grid; train / val / test by image hash) is labelled on its train and val splits with the
pipeline's search (``label`` in params.yaml: mode, keep ratio; population / parents /
generations from the flags), labels cached per (model id, search params, grouping) next to the
features, so variants, training seeds and re-runs share them. Each variant's compressor is
trained ``--train-seeds`` N times (``train.seed`` + 0 .. N-1, the same labels) with params.yaml's
``train`` section (early stopping on val), and each is evaluated on the test split at the keep
ratios ``--ratios`` (default 1/4.5 and 1/9; exact-match accuracy of the generated answer,
``evocomp.evaluation.harness.evaluate_methods``):

- ``full``: GHM-C + cosine separation, with the question as input (``train`` in params.yaml);
- ``ce_only``: plain BCE, no cosine term (``loss=bce, cos_alpha=0``);
- ``ce_cos``: plain BCE + the cosine term (``loss=bce``);
- ``focal_cos``: the focal loss + the cosine term (``loss=focal``, gamma ``train.focal_gamma``:
  2);
- ``ghm_no_cos``: GHM-C without the cosine term (``cos_alpha=0``);
- ``no_text``: the compressor does not see the question (``use_text=false``);
- ``random_in_group``: the labels replaced by a random candidate of the same search space (no
  search): one random token per vocabulary group in ``paper`` mode, a random set of k tokens
  within the group quotas in ``budget`` mode;
- ``kmeans_groups``: labels from the same search with the vocabulary groups replaced by k-means
  clusters of the (unit-normalised) visual tokens, as many clusters as the sample has groups;
- ``paper_labels``: the labels of ``paper`` mode (one token per vocabulary group, as published)
  whatever params.yaml's label mode, the rest as ``full``.

Reported per variant and ratio: the mean test accuracy over the seeds (``accuracy``, the table),
each seed's (``accuracy_per_seed``) and a standard error (``accuracy_stderr``; which one is
``accuracy_stderr_kind``): with N >= 2 seeds that of the mean across seeds, sample std /
sqrt(N) (the spread training causes on this test set); with one seed the binomial
sqrt(p (1 - p) / n_test) of the test accuracy. The heuristics and all tokens are evaluated on
the same test samples for reference. Writes ``metrics/bench_ablation.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
from _ablation_labels import kmeans, kmeans_groups, make_labels  # noqa: E402, F401
from _common import (  # noqa: E402
    REPO,
    begin,
    command_line,
    describe_machine,
    finish,
    keep_ratios,
)
from _setup import Workspace, add_common_args, build_workspace, check_device, mean  # noqa: E402

from evocomp.baselines import HEURISTICS  # noqa: E402
from evocomp.compress.fit import best_epoch, fit_compressor  # noqa: E402
from evocomp.compress.training import answer_loss_monitor, items_from_labels  # noqa: E402
from evocomp.config import PROFILE_ENV, TrainParams, load_params  # noqa: E402
from evocomp.evaluation.harness import evaluate_methods  # noqa: E402
from evocomp.tokens import ratio_key  # noqa: E402

RATIOS = (1 / 4.5, 1 / 9)  # the default --ratios, exactly (keep_count rounds ratio x N)
# variant -> (label set, train-param overrides); "full" takes params.yaml's train section as is
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("vocab", {}),
    "ce_only": ("vocab", {"loss": "bce", "cos_alpha": 0.0}),
    "ce_cos": ("vocab", {"loss": "bce"}),
    "focal_cos": ("vocab", {"loss": "focal"}),
    "ghm_no_cos": ("vocab", {"cos_alpha": 0.0}),
    "no_text": ("vocab", {"use_text": False}),
    "random_in_group": ("random_in_group", {}),
    "kmeans_groups": ("kmeans", {}),
    "paper_labels": ("vocab_paper", {}),
}


def accuracy(raw: dict, method: str, ratios: Sequence[float]) -> dict[str, float]:
    """{ratio key: test accuracy} of ``method`` in ``evaluate_methods``' output."""
    return {ratio_key(r): mean(raw["hits"][f"{method}@{ratio_key(r)}"]) for r in ratios}


def stderr_kind(n_seeds: int) -> str:
    """Which standard error :func:`aggregate_seeds` reports for ``n_seeds`` training seeds."""
    return "seeds" if n_seeds >= 2 else "binomial"


def aggregate_seeds(per_seed: list[dict[str, float]], n_test: int) -> dict[str, dict]:
    """Mean, per-seed accuracies and standard error of each ratio over the training seeds.

    The standard error is the one of the mean across seeds, sample std / sqrt(N), with N >= 2
    seeds; with one seed there is no spread to measure and the binomial standard error of the
    test accuracy, sqrt(p (1 - p) / n_test), stands in (:func:`stderr_kind`).

    Args:
        per_seed: one {ratio key: test accuracy} per training seed, in seed order.
        n_test: test samples each accuracy was measured on.

    Returns:
        ``{"accuracy": {key: mean}, "accuracy_per_seed": {key: [accuracy of each seed]},
        "accuracy_stderr": {key: standard error}}``.
    """
    if not per_seed or n_test < 1:
        raise ValueError(
            f"aggregate_seeds: need >= 1 seed and test sample, got {len(per_seed)}, {n_test}"
        )
    accs = {key: [run[key] for run in per_seed] for key in per_seed[0]}
    means = {key: statistics.fmean(xs) for key, xs in accs.items()}
    if stderr_kind(len(per_seed)) == "seeds":
        se = {key: statistics.stdev(xs) / math.sqrt(len(xs)) for key, xs in accs.items()}
    else:
        se = {key: math.sqrt(p * (1 - p) / n_test) for key, p in means.items()}
    return {"accuracy": means, "accuracy_per_seed": accs, "accuracy_stderr": se}


def run_variant(
    ws: Workspace,
    labels: pd.DataFrame,
    test: list,
    params: TrainParams,
    device: str,
    ratios: Sequence[float],
    seeds: Sequence[int],
    log: Callable[[str], None] = print,
    objective: str = "answer",
) -> dict:
    """Train one variant's compressor once per training seed on the same labels; test each.

    ``train.monitor: answer_loss`` scores the val labels' samples with ``ws.mllm`` and the
    labels' ``objective``, as ``evocomp train`` does.

    Returns :func:`aggregate_seeds`'s dict plus ``train``: the variant's params (``seed``: the
    first one's), the seeds, and one row per seed (epochs, best epoch, its val BCE and
    precision, seconds), with the mean val precision.
    """
    items = items_from_labels(labels, ws.fstore)
    answer_loss = None
    if params.monitor == "answer_loss" and items["val"]:
        by_id = {s.id: s for s in ws.split("val")}
        val = labels[labels["split"] == "val"]
        cases = [
            (by_id[i], ws.fstore.get(i), int(k))
            for i, k in zip(val["sample_id"], val["k"], strict=True)
        ]
        answer_loss = answer_loss_monitor(cases, ws.mllm, objective)
    per_seed, runs = [], []
    for seed in seeds:
        tp = params.model_copy(update={"seed": seed})
        t0 = time.perf_counter()
        model, history = fit_compressor(
            items["train"],
            items["val"],
            tp,
            device,
            llm_heads=ws.info["heads"],
            llm_ffn=ws.info["ffn"],
            answer_loss=answer_loss,
        )
        train_s = time.perf_counter() - t0
        raw = evaluate_methods(
            ws.mllm, ws.info, test, ws.fstore, ratios, ["evocomp"], compressor=model
        )
        per_seed.append(accuracy(raw, "evocomp", ratios))
        best = best_epoch(history, tp.monitor)  # the epoch fit_compressor restored
        runs.append(
            {
                "seed": seed,
                "epochs": len(history),
                "best_epoch": best["epoch"],
                "val_loss": best["val_loss"],
                "val_precision": best["val_precision"],
                "seconds": train_s,
            }
        )
        acc = ", ".join(f"{k} {a:.3f}" for k, a in per_seed[-1].items())
        log(f"    seed {seed}: {acc} (trained in {train_s:.0f} s)")
    precisions = [r["val_precision"] for r in runs if r["val_precision"] is not None]
    return {
        **aggregate_seeds(per_seed, len(test)),
        "train": {
            "params": params.model_copy(update={"seed": seeds[0]}).model_dump(mode="json"),
            "seeds": list(seeds),
            "runs": runs,
            "val_precision": mean(precisions) if precisions else None,
        },
    }


def print_report(rep: dict[str, Any]) -> None:
    keys = rep["ratios"]
    print(f"\nEvoComp ablation: {rep['model']['path']} ({rep['model']['model_id']})")
    print(f"machine: {describe_machine(rep['machine'])}")
    print(
        f"{rep['splits']} samples (seed {rep['seed']}); test accuracy, all tokens "
        f"{rep['baselines']['full']:.3f}\n"
    )
    n = len(rep["train_seeds"])
    if rep["accuracy_stderr_kind"] == "seeds":
        print(f"mean ± standard error over {n} training seeds {rep['train_seeds']}")
    else:
        print(f"one training seed {rep['train_seeds']}; ± the binomial standard error")
    print(
        f"{'variant':<18}" + "".join(f"{'keep ' + k:>16}" for k in keys) + "   label loss  val prec"
    )
    for name, v in rep["variants"].items():
        lab = rep["label_sets"][VARIANTS[name][0]]
        prec = v["train"]["val_precision"]
        print(
            f"{name:<18}"
            + "".join(f"{v['accuracy'][k]:>8.3f} ± {v['accuracy_stderr'][k]:.3f}" for k in keys)
            + f"   {lab['mean_loss']:>10.4g}  {'-' if prec is None else f'{prec:.3f}':>8}"
        )
    se = rep["accuracy_stderr_max"]
    n_test = rep["splits"]["test"]
    print(f"(binomial standard error of one test accuracy, {n_test} samples: up to {se:.3f})")
    print("heuristics:")
    for m, acc in rep["baselines"]["heuristics"].items():
        print(f"  {m:<16}" + "".join(f"{acc[k]:>8.3f}{'':8}" for k in keys).rstrip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, samples=900, seed=3)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.3, help="test needs no labels")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml", help="its train section")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--population", type=int, default=48)
    p.add_argument("--parents", type=int, default=12)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--ratios", help="keep ratios, comma-separated (default: 1/4.5,1/9)")
    p.add_argument(
        "--train-seeds",
        type=int,
        default=3,
        help="compressors trained per variant, with seeds train.seed + 0 .. N-1",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="default: metrics/bench_ablation.json, metrics/scenes/ablation.json for scenes",
    )
    args = p.parse_args(argv)
    args.ratios = list(RATIOS) if args.ratios is None else keep_ratios(p, args.ratios)
    if len({ratio_key(r) for r in args.ratios}) < len(args.ratios):
        p.error(f"--ratios: a ratio is named twice (to 3 decimals): {args.ratios}")
    if args.train_seeds < 1:
        p.error("--train-seeds must be >= 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: expected a comma-separated subset of {list(VARIANTS)}")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    check_device(p, args)
    if args.out is None:
        scenes = args.benchmark == "scenes"
        args.out = REPO / "metrics" / ("scenes/ablation.json" if scenes else "bench_ablation.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Label, train, evaluate, print the table, write the JSON; returns what was written."""
    args = parse_args(argv)
    start, machine = begin(args)
    if args.benchmark == "scenes":  # params.yaml's scenes profile, unless one is set already
        os.environ.setdefault(PROFILE_ENV, "scenes")
    # each training seed is one run of its own (train.restarts would pick among the seeds
    # whose spread the table reports)
    base = load_params(args.params).train.model_copy(
        update={"loss": "ghm", "use_text": True, "restarts": 1}
    )
    if base.cos_alpha == 0:
        base = base.model_copy(update={"cos_alpha": TrainParams().cos_alpha})
    if args.epochs:
        base = base.model_copy(update={"epochs": args.epochs})
    ws = build_workspace(
        args.model,
        args.samples,
        args.seed,
        args.device,
        args.cache,
        args.val_fraction,
        args.test_fraction,
        benchmark=args.benchmark,
    )
    labelled = ws.split("train") + ws.split("val")
    test = ws.split("test")
    splits = {name: len(ws.split(name)) for name in ("train", "val", "test")}
    if not ws.split("train") or not test:
        raise SystemExit(f"{splits}: need train and test samples; raise --samples")
    search = load_params(args.params).label.search().model_copy(
        update={"population": args.population, "parents": args.parents,
                "generations": args.generations}
    )  # fmt: skip
    label_sets = {}
    for grouping in dict.fromkeys(VARIANTS[v][0] for v in args.variants):
        mode = {"mode": "paper"} if grouping == "vocab_paper" else {}
        df = make_labels(ws, labelled, grouping, search.model_copy(update=mode))
        label_sets[grouping] = {
            "df": df,
            "mean_loss": float(df["loss"].mean()),
            "mean_k": float(df["k"].mean()),
        }
    raw = evaluate_methods(ws.mllm, ws.info, test, ws.fstore, args.ratios, list(HEURISTICS))
    baselines = {
        "full": mean(raw["hits"]["full"]),
        "heuristics": {m: accuracy(raw, m, args.ratios) for m in HEURISTICS},
    }
    seeds = [base.seed + i for i in range(args.train_seeds)]  # train.seed + 0 .. N-1
    variants = {}
    for name in args.variants:
        grouping, overrides = VARIANTS[name]
        print(f"  {name}:", flush=True)
        tp = base.model_copy(update=overrides)
        v = run_variant(
            ws,
            label_sets[grouping]["df"],
            test,
            tp,
            args.device,
            args.ratios,
            seeds,
            objective=search.objective,
        )
        variants[name] = v
        acc = ", ".join(
            f"{k} {a:.3f} ± {v['accuracy_stderr'][k]:.3f}" for k, a in v["accuracy"].items()
        )
        print(f"  {name}: {acc} ({time.perf_counter() - start:.0f} s)", flush=True)
    report: dict[str, Any] = {
        "accuracy": {name: v["accuracy"] for name, v in variants.items()},  # the seeds' mean
        "accuracy_stderr": {name: v["accuracy_stderr"] for name, v in variants.items()},
        "accuracy_per_seed": {name: v["accuracy_per_seed"] for name, v in variants.items()},
        "accuracy_stderr_kind": stderr_kind(args.train_seeds),
        "train_seeds": seeds,
        "variants": variants,
        "baselines": baselines,
        "label_sets": {g: {k: v for k, v in s.items() if k != "df"} for g, s in label_sets.items()},
        "ratios": [ratio_key(r) for r in args.ratios],
        "splits": splits,
        "search": search.model_dump(mode="json"),
        "seed": args.seed,
        "model": {"path": str(args.model), "model_id": ws.info["model_id"]},
        "machine": machine,
        "command": command_line(argv, __file__),
    }
    # binomial standard error of one test accuracy above, at its worst (p closest to 1/2): the
    # test sample's noise, which the spread across seeds does not include
    accs = [a for v in variants.values() for a in v["accuracy"].values()]
    p = min(accs, key=lambda a: abs(a - 0.5)) if accs else 0.5
    report["accuracy_stderr_max"] = (p * (1 - p) / len(test)) ** 0.5
    finish(report, args.out, start, print_report)
    return report


if __name__ == "__main__":
    main()
