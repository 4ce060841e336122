"""The paper's ablation on our benchmark: which parts of EvoComp the accuracy depends on.

    .venv/bin/python bench/ablation.py                             # 900 samples (~5-10 min)
    .venv/bin/python bench/ablation.py --samples 120 --epochs 5    # a smoke run

A held-out shapes-vqa set (``bench/_setup.py``; train / val / test by image hash) is labelled
on its train and val splits with the pipeline's search (``label`` in params.yaml: mode, keep
ratio; population / parents / generations from the flags), labels cached per (model id, search
params, grouping) next to the features, so variants and re-runs share them. Compressors are
trained with params.yaml's ``train`` section (early stopping on val) and evaluated on the test
split at keep ratios 1/4.5 and 1/9 (exact-match accuracy of the generated answer,
``evocomp.evaluation.harness.evaluate_methods``):

- ``full``: GHM-C + cosine separation, with the question as input (``train`` in params.yaml);
- ``ce_only``: plain BCE, no cosine term (``loss=bce, cos_alpha=0``);
- ``ghm_no_cos``: GHM-C without the cosine term (``cos_alpha=0``);
- ``no_text``: the compressor does not see the question (``use_text=false``);
- ``random_in_group``: the labels replaced by a random candidate of the same search space (no
  search): one random token per vocabulary group in ``paper`` mode, a random set of k tokens
  within the group quotas in ``budget`` mode;
- ``kmeans_groups``: labels from the same search with the vocabulary groups replaced by k-means
  clusters of the (unit-normalised) visual tokens, as many clusters as the sample has groups;
- ``paper_labels``: the labels of ``paper`` mode (one token per vocabulary group, as published)
  whatever params.yaml's label mode, the rest as ``full``.

The heuristics and all tokens are evaluated on the same test samples for reference. Writes
``metrics/bench_ablation.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (
    REPO,
    begin,
    command_line,
    describe_machine,
    finish,  # noqa: E402
)
from _setup import Workspace, add_common_args, build_workspace, check_device, mean  # noqa: E402

from evocomp.baselines import HEURISTICS  # noqa: E402
from evocomp.compress.fit import best_epoch, fit_compressor  # noqa: E402
from evocomp.compress.training import items_from_labels  # noqa: E402
from evocomp.config import SearchParams, TrainParams, load_params  # noqa: E402
from evocomp.data.samples import sample_seed  # noqa: E402
from evocomp.evaluation.harness import evaluate_methods  # noqa: E402
from evocomp.features.grouping import group_ids  # noqa: E402
from evocomp.labeling.sample import label_sample  # noqa: E402
from evocomp.search import SearchSpace  # noqa: E402
from evocomp.search.operators import repair  # noqa: E402
from evocomp.tokens import ratio_key  # noqa: E402

RATIOS = (1 / 4.5, 1 / 9)
# variant -> (label set, train-param overrides); "full" takes params.yaml's train section as is
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("vocab", {}),
    "ce_only": ("vocab", {"loss": "bce", "cos_alpha": 0.0}),
    "ghm_no_cos": ("vocab", {"cos_alpha": 0.0}),
    "no_text": ("vocab", {"use_text": False}),
    "random_in_group": ("random_in_group", {}),
    "kmeans_groups": ("kmeans", {}),
    "paper_labels": ("vocab_paper", {}),
}


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


def accuracy(raw: dict, method: str) -> dict[str, float]:
    return {ratio_key(r): mean(raw["hits"][f"{method}@{ratio_key(r)}"]) for r in RATIOS}


def run_variant(ws, labels, test, base: TrainParams, overrides: dict, device: str) -> dict:
    """Train one compressor variant and evaluate it on the test split."""
    items = items_from_labels(labels, ws.fstore)
    tp = base.model_copy(update=overrides)
    t0 = time.perf_counter()
    model, history = fit_compressor(
        items["train"], items["val"], tp, device, llm_heads=ws.info["heads"], llm_ffn=ws.info["ffn"]
    )
    train_s = time.perf_counter() - t0
    raw = evaluate_methods(ws.mllm, ws.info, test, ws.fstore, RATIOS, ["evocomp"], compressor=model)
    best = best_epoch(history, tp.monitor)  # the epoch fit_compressor restored
    return {
        "accuracy": accuracy(raw, "evocomp"),
        "full": mean(raw["hits"]["full"]),
        "train": {
            "epochs": len(history),
            "best_epoch": best["epoch"],
            "val_precision": best["val_precision"],
            "seconds": train_s,
            "params": tp.model_dump(mode="json"),
        },
    }


def print_report(rep: dict[str, Any]) -> None:
    keys = [ratio_key(r) for r in RATIOS]
    print(f"\nEvoComp ablation: {rep['model']['path']} ({rep['model']['model_id']})")
    print(f"machine: {describe_machine(rep['machine'])}")
    print(
        f"{rep['splits']} samples (seed {rep['seed']}); test accuracy, all tokens "
        f"{rep['baselines']['full']:.3f}\n"
    )
    print(
        f"{'variant':<18}" + "".join(f"{'keep ' + k:>12}" for k in keys) + "   label loss  val prec"
    )
    for name, v in rep["variants"].items():
        lab = rep["label_sets"][VARIANTS[name][0]]
        prec = v["train"]["val_precision"]
        print(
            f"{name:<18}"
            + "".join(f"{v['accuracy'][k]:>12.3f}" for k in keys)
            + f"   {lab['mean_loss']:>10.4g}  {'-' if prec is None else f'{prec:.3f}':>8}"
        )
    se = rep["accuracy_stderr_max"]
    print(f"(one standard error of a test accuracy here: up to {se:.3f})")
    print("heuristics:")
    for m, acc in rep["baselines"]["heuristics"].items():
        print(f"  {m:<16}" + "".join(f"{acc[k]:>12.3f}" for k in keys))


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
    p.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_ablation.json")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: expected a comma-separated subset of {list(VARIANTS)}")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    check_device(p, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Label, train, evaluate, print the table, write the JSON; returns what was written."""
    args = parse_args(argv)
    start, machine = begin(args)
    base = load_params(args.params).train.model_copy(update={"loss": "ghm", "use_text": True})
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
    raw = evaluate_methods(ws.mllm, ws.info, test, ws.fstore, RATIOS, list(HEURISTICS))
    baselines = {
        "full": mean(raw["hits"]["full"]),
        "heuristics": {m: accuracy(raw, m) for m in HEURISTICS},
    }
    variants = {}
    for name in args.variants:
        grouping, overrides = VARIANTS[name]
        variants[name] = run_variant(
            ws, label_sets[grouping]["df"], test, base, overrides, args.device
        )
        acc = ", ".join(f"{k} {a:.3f}" for k, a in variants[name]["accuracy"].items())
        print(f"  {name}: {acc} ({time.perf_counter() - start:.0f} s)", flush=True)
    report: dict[str, Any] = {
        "accuracy": {name: v["accuracy"] for name, v in variants.items()},
        "variants": variants,
        "baselines": baselines,
        "label_sets": {g: {k: v for k, v in s.items() if k != "df"} for g, s in label_sets.items()},
        "ratios": [ratio_key(r) for r in RATIOS],
        "splits": splits,
        "search": search.model_dump(mode="json"),
        "seed": args.seed,
        "model": {"path": str(args.model), "model_id": ws.info["model_id"]},
        "machine": machine,
        "command": command_line(argv, __file__),
    }
    # binomial standard error of the accuracies above, at their worst (p closest to 1/2)
    accs = [a for v in variants.values() for a in v["accuracy"].values()]
    p = min(accs, key=lambda a: abs(a - 0.5)) if accs else 0.5
    report["accuracy_stderr_max"] = (p * (1 - p) / len(test)) ** 0.5
    finish(report, args.out, start, print_report)
    return report


if __name__ == "__main__":
    main()
