"""Anytime search: how close the label's search budget gets to a 5x longer search, and how cheaply.

    .venv/bin/python bench/anytime.py                         # 40 held-out shapes-vqa samples
    .venv/bin/python bench/anytime.py --benchmark scenes      # 144 tokens: metrics/scenes/, plots/scenes/
    .venv/bin/python bench/anytime.py --samples 2 --threads 1 # a smoke run

On a held-out set (``--samples`` images, one question each, seed ``--seed``; built and cached
by ``bench/_setup.py``) every sample is labelled with ``label_sample`` under several search
settings, each recording its anytime trace (best loss so far after every generation,
``SearchResult.trace``):

- ``label``: params.yaml's ``label`` section as configured (mode, keep_ratio, seeding; the
  paper's budget: population 48, 12 parents, 10 generations); ``--profile`` picks a profile
  (default ``scenes`` with ``--benchmark scenes``, else the file's own);
- ``reference``: the same search run for ``5 * (generations + 1) - 1`` generations (54 for
  10: five times the generations counting generation 0, about 4.9x the forwards at 48/12),
  without early stopping. With the same seed its first generations *are* the ``label`` run
  (the generations only bound the loop), so its final loss is never above the label's when
  ``label.seeds`` is 1; ``reference_extends_label`` checks that prefix on every sample;
- ``no_seeding``: the heuristics' sets do not seed the population (still scored, for the
  comparison, so they still cost their forwards);
- ``early_stop``: stop after ``--patience`` generations without improvement;
- ``half_population``: population and parents halved (24 and 6);
- ``warm_start``: the label's search with a trained compressor's pick (``--compressor``,
  default the benchmark's committed one, trained on the pipeline's own split, never on these
  images) as one more seed of the initial population (``label.warm_start``).

A *forward* here is one candidate scored: one sequence through the LLM (``n_evals``; a
generation's candidates run as one batched call, which label records count as
``n_forwards``). Candidates a search has already scored are free, as in the search's cache.

Every loss is measured in the sample's loss scale ``s = max(worst heuristic loss - full-token
loss, audit.loss_floor)`` (:mod:`evocomp.audit.suspects`): how much the choice of tokens can
matter for that sample. Raw nats would let the few hard samples (8 nats of room) drown the
many easy ones (0.004), and the 1e-5 grid of :mod:`evocomp.tolerance` is a noise bound, not a
scale of quality. The curve of a setting is the mean over samples of ``(best so far -
reference's final loss) / s`` against forwards. A setting *reaches the label's quality* once its
best is within ``--tolerance`` scales of the ``label`` run's final loss (default
``audit.min_margin``, 0.01: the audit calls candidates that close an arbitrary choice).

Reports per setting the forwards spent, the final excess over the reference, the median
forwards to the label's quality (over samples; none where fewer than half reach it), the share
of samples that reach it and that reach it within a quarter of the label run's forwards, and the
mean excess at fixed fractions of the label run's forwards; then the label run's gap to the
reference and the log10 size of each sample's search space. Writes ``--out``
(``metrics/bench_anytime.json``; ``metrics/scenes/bench_anytime.json`` for scenes) and the
curves as ``setting,forwards,excess`` rows to ``--plot`` (``plots/anytime.csv``,
``plots/scenes/anytime.csv``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402
from _common import REPO, begin, command_line, describe_machine, finish  # noqa: E402
from _setup import (  # noqa: E402
    Workspace,
    add_common_args,
    build_workspace,
    check_device,
    mean,
    workspace_report,
)

from evocomp.config import SearchParams, parse_params  # noqa: E402
from evocomp.files import check_writable, write_text_atomic  # noqa: E402
from evocomp.labeling.sample import Labelled, check_warm_start, label_sample  # noqa: E402

# setting -> its search params, from the label section's
SETTINGS: dict[str, Callable[[SearchParams, argparse.Namespace], SearchParams]] = {
    "label": lambda p, a: p,
    "reference": lambda p, a: p.model_copy(
        update={
            "generations": a.reference_factor * (p.generations + 1) - 1,
            "early_stop_patience": None,
        }
    ),
    "no_seeding": lambda p, a: p.model_copy(update={"seed_with_heuristics": False}),
    "early_stop": lambda p, a: p.model_copy(update={"early_stop_patience": a.patience}),
    "half_population": lambda p, a: p.model_copy(
        update={"population": max(3, p.population // 2), "parents": max(2, p.parents // 2)}
    ),
    "warm_start": lambda p, a: p.model_copy(update={"warm_start": str(a.compressor)}),
}
REQUIRED = ("label", "reference")
FRACTIONS = (0.25, 0.5, 1.0, 2.0, 5.0)  # of the label run's forwards, per sample


def points(lab: Labelled) -> list[tuple[int, float]]:
    """``(forwards so far, best loss so far)`` after every generation of the search."""
    return [(p["n_evals"], p["best"]) for p in lab.result.trace]


def best_at(pts: list[tuple[int, float]], forwards: float) -> float | None:
    """The best loss a search had after ``forwards`` (None before its generation 0 ends)."""
    best = None
    for spent, loss in pts:
        if spent > forwards:
            break
        best = loss
    return best


def loss_scale(lab: Labelled, floor: float) -> float:
    """The audit's loss scale of a sample: worst heuristic minus full-token loss, >= floor."""
    worst = max(lab.result.heuristic_losses.values(), default=lab.result.loss)
    return max(worst - lab.full_loss, floor)


def sample_row(sample, labs: dict[str, Labelled], floor: float, tol: float) -> dict[str, Any]:
    """One sample's figures: scale, final losses, forwards, when each setting reached the label."""
    label, ref = labs["label"], labs["reference"]
    scale = loss_scale(label, floor)
    target = label.result.loss + tol * scale
    row: dict[str, Any] = {
        "sample": sample.id,
        "space_log10": label.result.space_log10,
        "k": label.result.k,
        "n_groups": label.result.n_groups,
        "scale": scale,
        "reference_loss": ref.result.loss,
        "label_gap": (label.result.loss - ref.result.loss) / scale,
        "reference_extends_label": points(ref)[: len(points(label))] == points(label),
        "settings": {},
    }
    for name, lab in labs.items():
        pts = points(lab)
        reach = next((spent for spent, best in pts if best <= target), None)
        row["settings"][name] = {
            "loss": lab.result.loss,
            "forwards": pts[-1][0],
            "excess": (lab.result.loss - ref.result.loss) / scale,
            "forwards_to_label": reach,
            "trace": pts,
        }
    return row


def curve(rows: list[dict], name: str, step: int) -> list[tuple[int, float]]:
    """The setting's mean excess over the reference (in scales) every ``step`` forwards, from
    where every sample has finished its generation 0 to where the last sample stopped."""
    traces = [(r["settings"][name]["trace"], r["reference_loss"], r["scale"]) for r in rows]
    start = max(t[0][0] for t, _, _ in traces)
    end = max(t[-1][0] for t, _, _ in traces)
    out = []
    for x in range(math.ceil(start / step) * step, end + step, step):
        xs = [(best_at(t, x) - ref) / s for t, ref, s in traces]
        out.append((x, mean(xs)))
    return out


def setting_summary(rows: list[dict], name: str, params: SearchParams) -> dict[str, Any]:
    s = [r["settings"][name] for r in rows]
    label = [r["settings"]["label"]["forwards"] for r in rows]
    reach = [x["forwards_to_label"] for x in s]
    med = statistics.median(math.inf if f is None else f for f in reach)
    at = {}
    for frac in FRACTIONS:
        vals = [best_at(x["trace"], frac * budget) for x, budget in zip(s, label, strict=True)]
        at[f"{frac:g}"] = (
            mean((v - r["reference_loss"]) / r["scale"] for v, r in zip(vals, rows, strict=True))
            if all(v is not None for v in vals)
            else None
        )
    return {
        "params": params.model_dump(mode="json"),
        "mean_forwards": mean(x["forwards"] for x in s),
        "median_forwards": statistics.median(x["forwards"] for x in s),
        "forwards_vs_label": mean(x["forwards"] / b for x, b in zip(s, label, strict=True)),
        "mean_final_excess": mean(x["excess"] for x in s),
        "median_final_excess": statistics.median(x["excess"] for x in s),
        "mean_final_loss": mean(x["loss"] for x in s),
        "median_forwards_to_label_quality": None if math.isinf(med) else med,
        "reached_label_quality": mean(f is not None for f in reach),
        "reached_within_quarter_budget": mean(
            f is not None and f <= b / 4 for f, b in zip(reach, label, strict=True)
        ),
        "mean_excess_at_label_budget_fraction": at,
    }


def summarize(rows: list[dict], params: dict[str, SearchParams]) -> dict[str, Any]:
    gap = [r["label_gap"] for r in rows]
    space = [r["space_log10"] for r in rows]
    return {
        "settings": {name: setting_summary(rows, name, p) for name, p in params.items()},
        "label_vs_reference": {
            "mean_gap_scales": mean(gap),
            "median_gap_scales": statistics.median(gap),
            "max_gap_scales": max(gap),
            "mean_gap_nats": mean(
                r["settings"]["label"]["loss"] - r["reference_loss"] for r in rows
            ),
            "reference_improved": mean(g > 0 for g in gap),
            "reference_extends_label": mean(r["reference_extends_label"] for r in rows),
        },
        "search_space_log10": {
            "mean": mean(space),
            "median": statistics.median(space),
            "min": min(space),
            "max": max(space),
        },
    }


def print_report(rep: dict[str, Any]) -> None:
    print(f"\nEvoComp anytime search: {rep['model']['path']} ({rep['model']['model_id']})")
    print(f"machine: {describe_machine(rep['machine'])}")
    print(
        f"{rep['samples']} held-out {rep['benchmark']}-vqa samples (seed {rep['seed']}), "
        f"{rep['model']['n_tokens']} visual tokens, label settings of {rep['params_file']} "
        f"(profile {rep['profile']}); losses in loss scales, forwards = candidates scored\n"
    )
    head = f"{'setting':<16}{'pop/par/gen':>12}{'forwards':>10}{'excess':>9}"
    head += f"{'to label':>10}{'reached':>9}{'in 1/4':>8}"
    print(head + "".join(f"{'@' + f:>8}" for f in rep["settings"]["label"]
                         ["mean_excess_at_label_budget_fraction"]))  # fmt: skip
    for name, s in rep["settings"].items():
        p = s["params"]
        to = s["median_forwards_to_label_quality"]
        line = (
            f"{name:<16}{p['population']:>5}/{p['parents']}/{p['generations']:<3}"
            f"{s['median_forwards']:>10.0f}{s['mean_final_excess']:>9.3f}"
            f"{'never' if to is None else f'{to:.0f}':>10}{s['reached_label_quality']:>9.0%}"
            f"{s['reached_within_quarter_budget']:>8.0%}"
        )
        at = s["mean_excess_at_label_budget_fraction"].values()
        print(line + "".join(f"{'-':>8}" if v is None else f"{v:>8.3f}" for v in at))
    g = rep["label_vs_reference"]
    print(
        "\nexcess: final loss above the reference's; to label: median forwards to the label "
        "run's final loss (within the tolerance); @f: mean excess after f x the label run's "
        "forwards"
    )
    print(
        f"label vs reference: gap {g['mean_gap_scales']:.3f} scales on average (median "
        f"{g['median_gap_scales']:.3f}, max {g['max_gap_scales']:.3f}; {g['mean_gap_nats']:.4g} "
        f"nats); the reference improved {g['reference_improved']:.0%} of the labels; its first "
        f"generations repeat the label run on {g['reference_extends_label']:.0%} of the samples"
    )
    sp = rep["search_space_log10"]
    print(
        f"search space: 10^{sp['median']:.1f} candidates per sample (median; mean "
        f"10^{sp['mean']:.1f}, min 10^{sp['min']:.1f}, max 10^{sp['max']:.1f})"
    )
    if rep["failed"]:
        print(f"{len(rep['failed'])} samples FAILED, e.g. {rep['failed'][0]}")


def _shown(path: Path) -> str:
    """A path as the report names it: relative to the repository when it lies inside."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def label_params(args: argparse.Namespace) -> tuple[SearchParams, float, float, str]:
    """(the label section's search params, loss floor, tolerance, profile) from --params."""
    raw = yaml.safe_load(args.params.read_text()) or {}
    if args.profile:
        raw["profile"] = args.profile
    params = parse_params(raw, str(args.params))
    tol = params.audit.min_margin if args.tolerance is None else args.tolerance
    return params.label.search(), params.audit.loss_floor, tol, params.profile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, samples=40)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml", help="its label section")
    p.add_argument("--profile", help="params profile (default: scenes for --benchmark scenes)")
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, label and reference always run (known: {', '.join(SETTINGS)})",
    )
    p.add_argument("--reference-factor", type=int, default=5, help="reference: x (gens + 1)")
    p.add_argument("--patience", type=int, default=3, help="early_stop: generations")
    p.add_argument("--tolerance", type=float, help="scales (default: audit.min_margin)")
    p.add_argument("--step", type=int, default=8, help="curve: a point every STEP forwards")
    p.add_argument("--compressor", type=Path, help="warm_start: default models/[scenes/]compressor")
    p.add_argument("--out", type=Path, help="default: metrics/[scenes/]bench_anytime.json")
    p.add_argument("--plot", type=Path, help="default: plots/[scenes/]anytime.csv")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    if any(n not in SETTINGS for n in names):
        p.error(f"--settings: expected a comma-separated subset of {list(SETTINGS)}, got {names}")
    args.settings = [n for n in SETTINGS if n in REQUIRED or n in names]
    if args.reference_factor < 2 or args.patience < 1 or args.step < 1:
        p.error("--reference-factor must be >= 2, --patience and --step >= 1")
    if args.tolerance is not None and args.tolerance < 0:
        p.error("--tolerance must be >= 0")
    if not args.params.is_file():
        p.error(f"--params {args.params}: no such file")
    if args.profile is None and args.benchmark == "scenes":
        args.profile = "scenes"
    sub = Path("scenes") if args.benchmark == "scenes" else Path()
    args.compressor = args.compressor or REPO / "models" / sub / "compressor"
    if "warm_start" in args.settings and not (args.compressor / "config.json").is_file():
        p.error(
            f"--compressor {args.compressor}: no compressor there (train one with `evocomp "
            "train`, or leave warm_start out of --settings)"
        )
    args.out = args.out or REPO / "metrics" / sub / "bench_anytime.json"
    args.plot = args.plot or REPO / "plots" / sub / "anytime.csv"
    check_device(p, args)
    return args


def run_all(ws: Workspace, params: dict[str, SearchParams], floor, tol, log=print):
    """``(rows, failures)``: every sample searched under every setting."""
    rows, failed = [], []
    t0 = time.perf_counter()
    for i, s in enumerate(ws.samples, 1):
        try:
            labs = {n: label_sample(ws.mllm, s, ws.features(s), p) for n, p in params.items()}
        except (ValueError, RuntimeError) as err:
            failed.append({"sample": s.id, "error": f"{type(err).__name__}: {err}"})
        else:
            rows.append(sample_row(s, labs, floor, tol))
        if i % 5 == 0 or i == len(ws.samples):
            log(f"  {i}/{len(ws.samples)} samples, {time.perf_counter() - t0:.0f} s")
    return rows, failed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Search under every setting, print the table, write the JSON and the curve CSV."""
    args = parse_args(argv)
    base, floor, tol, profile = label_params(args)
    check_writable(args.out, args.plot)  # before the searches, not after them
    start, machine = begin(args)
    ws = build_workspace(
        args.model, args.samples, args.seed, args.device, args.cache, benchmark=args.benchmark
    )
    params = {name: SETTINGS[name](base, args) for name in args.settings}
    if "warm_start" in params:  # a compressor of another model: one error, not 40 failures
        try:
            check_warm_start(str(args.compressor), ws.mllm.model_id)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(
                f"--compressor: {err} (or leave warm_start out of --settings)"
            ) from None
    rows, failed = run_all(ws, params, floor, tol)
    if not rows:
        raise SystemExit(f"every sample failed, e.g. {failed[0]}")
    csv = "setting,forwards,excess\n" + "".join(
        f"{name},{x},{y:.6g}\n" for name in params for x, y in curve(rows, name, args.step)
    )
    report: dict[str, Any] = summarize(rows, params)
    for r in rows:  # the curve file holds them; the JSON keeps the per-sample figures
        for s in r["settings"].values():
            del s["trace"]
    write_text_atomic(args.plot, csv)
    report |= {
        "samples": len(rows),
        "failed": failed,
        "params_file": _shown(args.params),
        "profile": profile,
        "loss_floor": floor,
        "tolerance_scales": tol,
        "per_sample": rows,
        "plot": _shown(args.plot),
    } | workspace_report(ws, args, machine, command_line(argv, __file__))
    return finish(report, args.out, start, print_report)


if __name__ == "__main__":
    main()
