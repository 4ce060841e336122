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

``--compressor DIR`` also runs ``evocomp evaluate``'s comparison on each variant (every sample
in the test split, every method of the benchmark's params but the GA oracle, which needs
labels of the variant): does a compressor trained on the benchmark's own data carry to a
variant, against the heuristics at the same keep ratios and prune layer? Repeated (one per
label budget, like the scenes pipeline's), each ratio goes to the compressor whose labels'
keep ratio is nearest it (a variant has no val split to choose on), or with ``--route
EVAL_JSON`` the one that evaluation chose (``compressor_for_ratio``: the pipeline's
routing, as deployment serves it). ``paired`` in each row
is EvoComp's accuracy minus every other method's on the same samples, with its standard
error. ``--variants own,noise`` runs the variants whose names start with those words.

    .venv/bin/python bench/heldout_variants.py --benchmark scenes --ratios 0.333,0.222,0.111 \
        --compressor models/scenes/compressor --compressor models/scenes/compressor_0.222 \
        --compressor models/scenes/compressor_0.333
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

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


def _progress():
    """Print each evaluation phase's progress at every quarter (a 2000-sample variant runs for
    many minutes). Plain lines, not ``evocomp.cli.common.progress_bars``: this bench runs
    under nohup into a log file, where those bars draw nothing."""
    shown: set = set()

    def show(phase: str, done: int, total: int) -> None:
        quarter = 4 * done // max(1, total)
        if (phase, quarter) not in shown and (quarter or done == total):
            shown.add((phase, quarter))
            print(f"  {phase}: {done}/{total}", flush=True)

    return show


def evaluate_variant(
    mllm, benchmark: str, grid: int, variant, n: int, ratios, compressor=None, params=None,
    route=None,
) -> dict:  # fmt: skip
    from evocomp.data.prepared import write_prepared
    from evocomp.data.readers import read_dataset
    from evocomp.data.synth import write_dataset
    from evocomp.mllm.reference_eval import evaluate_reference

    with tempfile.TemporaryDirectory() as tmp:
        raw = write_dataset(
            Path(tmp) / "raw",
            n,
            SEED,
            benchmark=benchmark,
            grid=grid if benchmark == "scenes" else None,
            variant=variant,
        )
        samples = read_dataset(raw, None, 0.0, 1.0)  # every sample held out
        m = evaluate_reference(mllm, samples, ratios=ratios)
        row = {"samples": len(samples), "full": m["full"], "full_se": se(m["full"], len(samples))}
        row["full_by_type"] = m["full_by_type"]
        for key, r in m["ratios"].items():
            row[key] = {sel: r[sel] for sel in ("oracle", "random")}
        if compressor is not None:
            from evocomp.evaluation.run import run_evaluation

            prepared = write_prepared(samples, Path(tmp) / "prepared", str(raw)).parent
            result = run_evaluation(
                params, prepared, Path(tmp) / "features", Path(tmp) / "no-labels", compressor,
                mllm, Path(tmp) / "no-speed", progress=_progress(), route_from=route,
            )  # fmt: skip
            row["compression"] = {  # the later prune layer's keys: ratios_l1, or _l2 (3+ layers)
                k: v for k, v in result.items()
                if k in ("prune_layer", "full", "ratios", "stderr", "paired", "compressor_for_ratio")
                or k.startswith(("ratios_l", "stderr_l", "paired_l"))
            }  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", choices=sorted(VARIANTS), default="shapes")
    p.add_argument("--model", type=Path, help="checkpoint (default: the benchmark's committed one)")
    p.add_argument("--n", type=int, default=600, help="images per variant")
    p.add_argument(
        "--ratios",
        default="0.333,0.111",
        help="keep ratios of the reference model's oracle / random check and, with "
        "--compressor, of the comparison with the heuristics",
    )
    p.add_argument(
        "--compressor",
        type=Path,
        action="append",
        help="also compare it with the heuristics; repeat for one per label budget",
    )
    p.add_argument(
        "--route",
        type=Path,
        help="an eval.json: each ratio is served by the compressor that evaluation chose "
        "(its compressor_for_ratio), not by the nearest budget's",
    )
    p.add_argument("--variants", help="comma list: run the variants whose names start so")
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
    for c in args.compressor or []:
        if not c.is_dir():
            p.error(f"--compressor {c}: no compressor there")
    if args.route is not None:
        from evocomp.evaluation.routes import route_of_evaluation

        if not args.compressor:
            p.error("--route needs the --compressor folders it names")
        try:
            route_of_evaluation(args.route)
        except ValueError as err:
            p.error(f"--route: {err}")
    variants = VARIANTS[args.benchmark]
    if args.variants:
        words = [w.strip().lower() for w in args.variants.split(",") if w.strip()]
        unknown = [w for w in words if not any(n.lower().startswith(w) for n in variants)]
        if not words or unknown:
            p.error(
                f"--variants {args.variants}: no {args.benchmark} variant starts with "
                f"{(unknown or [''])[0]!r} (known: {'; '.join(variants)})"
            )
        variants = {n: v for n, v in variants.items() if n.lower().startswith(tuple(words))}
    start, machine = begin(args)
    from evocomp.config import load_params
    from evocomp.data.synth import Variant
    from evocomp.mllm.checkpoint import checkpoint_info
    from evocomp.mllm.loader import load_mllm

    n_tokens = checkpoint_info(model)["n_tokens"]
    grid = math.isqrt(n_tokens)
    if args.benchmark == "shapes" and n_tokens != 36:
        p.error(f"--model {model} has {n_tokens} visual tokens; shapes-vqa needs 36")
    mllm = load_mllm(model, args.device, "float32")
    params = None
    if args.compressor:  # the benchmark's own evaluation settings, less the label-set oracle
        profile = "scenes" if args.benchmark == "scenes" else "demo"
        with mock.patch.dict(os.environ, {"EVOCOMP_PROFILE": profile}):
            params = load_params(REPO / "params.yaml")
        methods = [m for m in params.evaluate.methods if m != "oracle"]
        params = params.model_copy(  # no val split in a variant: the nearest budget serves
            update={
                "evaluate": params.evaluate.model_copy(
                    update={"methods": methods, "choose": "nearest", "ratios": ratios}
                )
            }
        )
    rows = {}
    for name, (objects, background) in variants.items():
        rows[name] = evaluate_variant(
            mllm, args.benchmark, grid, Variant(objects, background), args.n, ratios,
            args.compressor, params, args.route,
        )  # fmt: skip
        r = rows[name]
        print(f"{name}: full {r['full']:.3f} +- {r['full_se']:.3f}", flush=True)
    report = {
        "benchmark": args.benchmark,
        "model": os.path.relpath(model, REPO) if model.is_relative_to(REPO) else str(model),
        "seed": SEED,
        "compressor": [str(c) for c in args.compressor] if args.compressor else None,
        "route": str(args.route) if args.route else None,
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
        comp = {k: r["compression"] for k, r in rep["variants"].items() if "compression" in r}
        if comp:
            first = next(iter(comp.values()))
            methods = sorted(next(iter(first["ratios"].values())))
            for key in sorted(first["ratios"], reverse=True):
                print(f"\nkeep {key}, prune layer {first['prune_layer']} (± standard error)")
                print("| variant | full | " + " | ".join(methods) + " |")
                print("|---" * (2 + len(methods)) + "|")
                for name, c in comp.items():
                    cells = " | ".join(
                        f"{c['ratios'][key][m]:.3f} ± {c['stderr'][key][m]:.3f}" for m in methods
                    )
                    print(f"| {name} | {c['full']:.3f} | {cells} |")
                print("EvoComp minus each method on the same samples (± paired standard error)")
                for name, c in comp.items():
                    pairs = c.get("paired", {}).get(key, {})
                    print(f"  {name}: " + ", ".join(
                        f"{m} {d['diff']:+.3f} ± {d['stderr']:.3f}" for m, d in sorted(pairs.items())
                    ))  # fmt: skip

    return finish(report, out, start, show)


if __name__ == "__main__":
    main()
