"""Labeling throughput: seconds per sample with the paper's search, against its forward floor.

    .venv/bin/python bench/label_throughput.py                    # 30 samples, 3 repeats (~1 min)
    .venv/bin/python bench/label_throughput.py --samples 5 --repeats 1   # a smoke run

On held-out shapes-vqa samples (``bench/_setup.py``), each sample is labelled once untimed with
``label_sample`` in ``paper`` mode (population 48, 12 parents, 10 generations); its Logbook says
how many new candidates every generation scored (``nevals``, duplicates already removed by the
search's cache). Then, side by side per sample (order rotated every repeat):

- ``label``: ``label_sample`` again (deterministic: the same search), all of it -- grouping,
  heuristics, the GA and the full-token forward;
- ``floor``: the same model forwards timed alone: one ``subset_loss`` call of shape
  ``(nevals, k)`` per generation that scored something, plus the full-token ``(1, N)`` call that
  ``label_sample`` makes, on random index rows (the cost depends on the shape only);
- ``batched`` / ``one_by_one``: the search's candidates scored as the search does (one call per
  generation) and one row per call; and the same for one full population (``population``
  rows), since on a small model the search space may run dry after the first generation and
  leave later calls with a handful of rows.

``ratio_to_floor = label / floor`` (target <= 1.3: the GA's own bookkeeping costs little next to
the model) and ``batched_speedup = one_by_one / batched`` (target >= 5), each a ratio of sums
over samples of per-sample medians (ratios of minimums recorded too). ``forwards_per_sample`` is
``SearchResult.n_forwards``. Writes ``metrics/bench_label_throughput.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import (
    REPO,
    begin,
    command_line,
    describe_machine,
    finish,  # noqa: E402
    time_interleaved,
)
from _setup import (  # noqa: E402
    add_common_args,
    build_workspace,
    check_device,
    mean,
    workspace_report,
)

from evocomp.config import SearchParams  # noqa: E402
from evocomp.labeling.sample import label_sample  # noqa: E402

TARGETS = {"ratio_to_floor": ("<=", 1.3), "batched_speedup": (">=", 5.0)}


def forward_shapes(result) -> list[int]:
    """Rows of every fitness call the search made (one per generation that scored anything).

    Checks the Logbook against the search's own counters, so a replay is the same work.
    """
    rows = [int(r["nevals"]) for r in result.logbook if r["nevals"] > 0]
    if len(rows) != result.n_forwards or sum(rows) != result.n_evals:
        raise RuntimeError(
            f"the Logbook ({len(rows)} calls, {sum(rows)} rows) disagrees with the search's "
            f"counters ({result.n_forwards} forwards, {result.n_evals} candidates); with "
            "params.seeds > 1 only the best run's Logbook is kept"
        )
    return rows


def random_rows(p: int, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(p, k) sorted rows of distinct token indices."""
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(p)])


def measure_sample(ws, sample, params: SearchParams, repeats: int, seed: int) -> dict[str, Any]:
    """Time label / floor / batched / one-by-one side by side for one sample."""
    mllm, feats = ws.mllm, ws.features(sample)
    lab = label_sample(mllm, sample, feats, params)  # warmup; also gives the shapes to replay
    res = lab.result
    shapes = forward_shapes(res)
    n = res.n_tokens
    gen = torch.Generator().manual_seed(seed)
    calls = [random_rows(p, res.k, n, gen) for p in shapes]  # the search's forwards
    full = torch.arange(n)[None]  # (1, N): label_sample's full-token loss
    prompt = mllm.encode(sample.question, sample.answer)

    def floor() -> None:
        for rows in calls:
            mllm.subset_loss(prompt, feats.tokens, rows, feats.layout, feats.extra)
        mllm.subset_loss(prompt, feats.tokens, full, feats.layout, feats.extra)

    def batched() -> None:
        for rows in calls:
            mllm.subset_loss(prompt, feats.tokens, rows, feats.layout, feats.extra)

    def one_by_one() -> None:
        for rows in calls:
            for row in rows.split(1):
                mllm.subset_loss(prompt, feats.tokens, row, feats.layout, feats.extra)

    population = random_rows(params.population, res.k, n, gen)  # a whole generation's worth

    def population_batched() -> None:
        mllm.subset_loss(prompt, feats.tokens, population, feats.layout, feats.extra)

    def population_one_by_one() -> None:
        for row in population.split(1):
            mllm.subset_loss(prompt, feats.tokens, row, feats.layout, feats.extra)

    fns = {
        "label": partial(label_sample, mllm, sample, feats, params),
        "floor": floor,
        "batched": batched,
        "one_by_one": one_by_one,
        "population_batched": population_batched,
        "population_one_by_one": population_one_by_one,
    }
    seconds = time_interleaved(fns, repeats, warmup=1, device=ws.mllm.device)
    return {
        "seconds": seconds,
        "n_forwards": res.n_forwards,
        "n_evals": res.n_evals,
        "k": res.k,
        "n_tokens": n,
        "rows_per_forward": shapes,
    }


def summarise(per_sample: list[dict[str, Any]]) -> dict[str, Any]:
    def total(name: str, stat) -> float:
        return sum(stat(s["seconds"][name]) for s in per_sample)

    med = statistics.median
    names = per_sample[0]["seconds"]
    sums = {name: total(name, med) for name in names}
    mins = {name: total(name, min) for name in sums}
    n = len(per_sample)
    return {
        "seconds_per_sample": sums["label"] / n,
        "forwards_per_sample": mean(s["n_forwards"] for s in per_sample),
        "candidates_per_sample": mean(s["n_evals"] for s in per_sample),
        "ratio_to_floor": sums["label"] / sums["floor"],
        "batched_speedup": sums["one_by_one"] / sums["batched"],
        # the same comparison on full populations (P rows per call), as on a larger model
        # whose search space does not run dry after the first generation
        "batched_speedup_at_population": sums["population_one_by_one"] / sums["population_batched"],
        "floor_seconds_per_sample": sums["floor"] / n,
        "batched_seconds_per_sample": sums["batched"] / n,
        "one_by_one_seconds_per_sample": sums["one_by_one"] / n,
        "of_minimums": {
            "seconds_per_sample": mins["label"] / n,
            "ratio_to_floor": mins["label"] / mins["floor"],
            "batched_speedup": mins["one_by_one"] / mins["batched"],
            "batched_speedup_at_population": mins["population_one_by_one"]
            / mins["population_batched"],
        },
        "mean_k": mean(s["k"] for s in per_sample),
        "mean_rows_per_forward": mean(r for s in per_sample for r in s["rows_per_forward"]),
    }


def check_targets(rep: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, (op, target) in TARGETS.items():
        v = rep[name]
        out[name] = {
            "target": f"{op} {target}",
            "value": v,
            "pass": v <= target if op == "<=" else v >= target,
        }
    return out


def print_report(rep: dict[str, Any]) -> None:
    p = rep["params"]
    print(
        f"\nEvoComp label throughput: {rep['model']['path']} ({rep['model']['model_id']}), "
        f"{rep['samples']} samples"
    )
    print(f"machine: {describe_machine(rep['machine'])}")
    print(
        f"search: {p['mode']} mode, population {p['population']}, parents {p['parents']}, "
        f"generations {p['generations']}; {rep['repeats']} repeats, per-sample medians summed"
    )
    print(
        f"seconds per sample          {rep['seconds_per_sample']:.4f} "
        f"(min {rep['of_minimums']['seconds_per_sample']:.4f})"
    )
    print(
        f"forwards per sample         {rep['forwards_per_sample']:.2f} "
        f"({rep['candidates_per_sample']:.1f} candidates, {rep['mean_rows_per_forward']:.1f} "
        f"rows per forward, k = {rep['mean_k']:.2f} of {rep['model']['n_tokens']})"
    )
    print(f"floor per sample            {rep['floor_seconds_per_sample']:.4f}")
    print(f"scoring, batched            {rep['batched_seconds_per_sample']:.4f}")
    print(f"scoring, one by one         {rep['one_by_one_seconds_per_sample']:.4f}")
    print(
        f"batched speedup, full populations of {rep['params']['population']}: "
        f"{rep['batched_speedup_at_population']:.2f}x"
    )
    for name, t in rep["targets"].items():
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"{name:<27} {t['value']:.2f} (target {t['target']}) {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, samples=30)
    p.add_argument("--mode", choices=("paper", "budget"), default="paper")
    p.add_argument("--keep-ratio", type=float, default=1 / 3, help="budget mode: k = ratio * N")
    p.add_argument("--population", type=int, default=48)
    p.add_argument("--parents", type=int, default=12)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed passes per sample (after 1 warmup)"
    )
    p.add_argument("--out", type=Path, help="default: metrics/[scenes/]bench_label_throughput.json")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not 0.0 < args.keep_ratio <= 1.0:
        p.error(f"--keep-ratio must lie in (0, 1], got {args.keep_ratio}")
    sub = "scenes" if args.benchmark == "scenes" else ""
    args.out = args.out or REPO / "metrics" / sub / "bench_label_throughput.json"
    check_device(p, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time, print, write the JSON; returns what was written."""
    args = parse_args(argv)
    start, machine = begin(args)
    ws = build_workspace(
        args.model, args.samples, args.seed, args.device, args.cache, benchmark=args.benchmark
    )
    params = SearchParams(
        mode=args.mode,
        population=args.population,
        parents=args.parents,
        generations=args.generations,
        keep_ratio=args.keep_ratio,
    )
    per_sample = []
    for i, s in enumerate(ws.samples):
        per_sample.append(measure_sample(ws, s, params, args.repeats, seed=args.seed * 100003 + i))
        if (i + 1) % 10 == 0 or i + 1 == len(ws.samples):
            print(
                f"  {i + 1}/{len(ws.samples)} samples, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    report: dict[str, Any] = summarise(per_sample)
    report |= {
        "params": params.model_dump(mode="json"),
        "samples": len(ws.samples),
        "repeats": args.repeats,
    } | workspace_report(ws, args, machine, command_line(argv, __file__))
    report["targets"] = check_targets(report)
    finish(report, args.out, start, print_report)
    return report


if __name__ == "__main__":
    main()
