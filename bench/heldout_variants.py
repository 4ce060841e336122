"""How far the committed reference models carry: held-out variants of the built-in benchmarks.

    .venv/bin/python bench/heldout_variants.py --benchmark shapes   # models/mllm
    .venv/bin/python bench/heldout_variants.py --benchmark scenes   # models/scenes/mllm

The product's figures are measured on data drawn like the reference model's training data.
A user who generates a held-out variant (``evocomp synth --objects MIN-MAX --background
STYLE``, README "Held-out variants") needs to know whether the model still answers there,
or every label and compression figure on it measures a model that has lost the task. For each
variant: ``--n`` fresh images at one seed (20000, outside every training and evaluation seed)
with one question each, and the model's accuracy with all tokens, with the oracle's tokens
and with random ones at each ``--ratios`` keep ratio (``evocomp mllm eval``'s selections), per
question type, with binomial standard errors. Every variant uses the same seed, so the
background variants hold the very same scenes and questions as the benchmark's own row
(a paired comparison); the object-count variants are new scenes.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import REPO, begin, command_line, finish, keep_ratios  # noqa: E402

SEED = 20000
# name -> (objects, background); None: the benchmark's own
VARIANTS = {
    "shapes": {
        "own (3-6 objects, plain)": (None, None),
        "1-2 objects": ((1, 2), None),
        "7-9 objects": ((7, 9), None),
        "10-12 objects": ((10, 12), None),
        "noise background": (None, "noise"),
        "texture background": (None, "texture"),
    },
    "scenes": {
        "own (6-16 objects, texture)": (None, None),
        "2-5 objects": ((2, 5), None),
        "17-24 objects": ((17, 24), None),
        "plain background": (None, "plain"),
        "noise background": (None, "noise"),
    },
}
MODELS = {"shapes": REPO / "models" / "mllm", "scenes": REPO / "models" / "scenes" / "mllm"}


def se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def evaluate_variant(mllm, benchmark: str, grid: int, variant, n: int, ratios) -> dict:
    from evocomp.data.readers import read_dataset
    from evocomp.data.synth import write_dataset
    from evocomp.mllm.reference_eval import evaluate_reference

    with tempfile.TemporaryDirectory() as tmp:
        samples = read_dataset(
            write_dataset(
                tmp,
                n,
                SEED,
                benchmark=benchmark,
                grid=grid if benchmark == "scenes" else None,
                variant=variant,
            )
        )
        m = evaluate_reference(mllm, samples, ratios=ratios)
    row = {"samples": len(samples), "full": m["full"], "full_se": se(m["full"], len(samples))}
    row["full_by_type"] = m["full_by_type"]
    for key, r in m["ratios"].items():
        row[key] = {sel: r[sel] for sel in ("oracle", "random")}
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", choices=sorted(VARIANTS), default="shapes")
    p.add_argument("--model", type=Path, help="checkpoint (default: the benchmark's committed one)")
    p.add_argument("--n", type=int, default=600, help="images per variant")
    p.add_argument("--ratios", default="0.333,0.111")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="default: metrics/[scenes/]bench_heldout_variants.json")
    args = p.parse_args(argv)
    ratios = keep_ratios(p, args.ratios)
    model = args.model or MODELS[args.benchmark]
    if not (model / "config.json").is_file():
        p.error(f"--model {model}: no checkpoint there")
    out = args.out or REPO / "metrics" / (
        "scenes/bench_heldout_variants.json"
        if args.benchmark == "scenes"
        else "bench_heldout_variants.json"
    )
    start, machine = begin(args)
    from evocomp.data.synth import Variant
    from evocomp.mllm.checkpoint import checkpoint_info
    from evocomp.mllm.loader import load_mllm

    n_tokens = checkpoint_info(model)["n_tokens"]
    grid = math.isqrt(n_tokens)
    if args.benchmark == "shapes" and n_tokens != 36:
        p.error(f"--model {model} has {n_tokens} visual tokens; shapes-vqa needs 36")
    mllm = load_mllm(model, args.device, "float32")
    rows = {}
    for name, (objects, background) in VARIANTS[args.benchmark].items():
        rows[name] = evaluate_variant(
            mllm, args.benchmark, grid, Variant(objects, background), args.n, ratios
        )
        r = rows[name]
        print(f"{name}: full {r['full']:.3f} +- {r['full_se']:.3f}", flush=True)
    report = {
        "benchmark": args.benchmark,
        "model": os.path.relpath(model, REPO) if model.is_relative_to(REPO) else str(model),
        "seed": SEED,
        "variants": rows,
        "machine": machine,
        "command": command_line(argv, __file__),
    }

    def show(rep):
        keys = [k for k in next(iter(rep["variants"].values())) if k[:2] == "0."]
        head = " | ".join(f"oracle @{k} | random @{k}" for k in keys)
        print(f"\n| variant | full | {head} |")
        print("|---" * (2 + 2 * len(keys)) + "|")
        for name, r in rep["variants"].items():
            cells = " | ".join(f"{r[k]['oracle']:.3f} | {r[k]['random']:.3f}" for k in keys)
            print(f"| {name} | {r['full']:.3f} ± {r['full_se']:.3f} | {cells} |")

    return finish(report, out, start, show)


if __name__ == "__main__":
    main()
