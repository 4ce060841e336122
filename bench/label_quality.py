"""Label quality: the GA label's answer loss vs all tokens and vs every heuristic at the same k.

    .venv/bin/python bench/label_quality.py                       # 200 held-out samples (~1-2 min)
    .venv/bin/python bench/label_quality.py --samples 20 --threads 1   # a smoke run
    .venv/bin/python bench/label_quality.py --model /path/to/llava --device cuda

On a held-out shapes-vqa set (``--samples`` images, one question each, seed ``--seed``; built
and cached by ``bench/_setup.py``) every sample is labelled twice with ``label_sample``:

- ``paper``: one token per vocabulary group, the paper's search (population 48, 12 parents,
  10 generations); the label has G tokens, the heuristics are scored at G tokens too;
- ``budget``: exactly round(N / 3) tokens, the same search settings, the population seeded with
  the heuristics' selections, so the label can never be worse than the best of them -- checked
  on every sample (the script exits non-zero, after writing the JSON, if one is).

Per mode: mean label loss, mean full-token loss, the mean loss of every heuristic at the same k,
the mean of the per-sample best heuristic, how often the label is worse than that best, the
margin over the best heuristic *method* (lowest mean), the kept fraction k/N, the group counts
(histogram and median), and how often the label keeps every patch the answer depends on
(shapes-vqa ground truth). The grouping health check (mode-independent): the share of tokens in
the largest group, the distinct nearest words per image (= groups, by construction), the most
common words, how many tokens' nearest word names what lies in their patch (its object's colour
or shape, "background" for an empty patch), and how often two patches the answer needs share a
group (paper mode can then keep only one of them). Writes ``metrics/bench_label_quality.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
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
)
from _setup import (  # noqa: E402
    Workspace,
    add_common_args,
    build_workspace,
    check_device,
    mean,
    workspace_report,
)

from evocomp.config import SearchParams  # noqa: E402
from evocomp.features.grouping import group_ids  # noqa: E402
from evocomp.labeling.sample import Labelled, label_sample  # noqa: E402
from evocomp.mllm.reference_eval import object_patches  # noqa: E402

MODES = ("paper", "budget")
# Grouping is called degenerate when most images' tokens fall into one or two words, or when
# fewer than half of the tokens' nearest words name what their patch shows.
DEGENERATE_WORDS, DEGENERATE_MEANINGFUL = 2, 0.5


def label_all(ws: Workspace, params: SearchParams, log=print) -> tuple[list[tuple], list[dict]]:
    """``([(sample, Labelled)], failures)`` for every sample of the workspace."""
    done, failed = [], []
    t0 = time.perf_counter()
    for i, s in enumerate(ws.samples, 1):
        try:
            done.append((s, label_sample(ws.mllm, s, ws.features(s), params)))
        except (ValueError, RuntimeError) as err:
            failed.append({"sample": s.id, "error": f"{type(err).__name__}: {err}"})
        if i % 50 == 0 or i == len(ws.samples):
            log(f"  {params.mode}: {i}/{len(ws.samples)} samples, {time.perf_counter() - t0:.0f} s")
    return done, failed


def relevant_kept(sample, kept: list[int]) -> float | None:
    """Share of the patches the answer depends on (shapes-vqa ground truth) kept by a label."""
    relevant = sample.meta.get("relevant")
    if not relevant:
        return None
    return len(set(relevant) & set(kept)) / len(set(relevant))


def mode_summary(labelled: list[tuple], failed: list[dict]) -> dict[str, Any]:
    """The per-mode figures (see the module doc)."""
    labs: list[Labelled] = [lab for _, lab in labelled]
    if not labs:
        return {"samples": 0, "failed": len(failed), "failures": failed[:10]}
    methods = list(labs[0].result.heuristic_losses)
    label = [lab.result.loss for lab in labs]
    best = [min(lab.result.heuristic_losses.values()) for lab in labs]
    heur = {m: mean(lab.result.heuristic_losses[m] for lab in labs) for m in methods}
    best_method = min(heur, key=heur.get)
    worse = [lab.result.loss > b for lab, b in zip(labs, best, strict=True)]
    groups = Counter(lab.result.n_groups for lab in labs)
    rel = [r for s, lab in labelled if (r := relevant_kept(s, lab.result.kept)) is not None]
    return {
        "samples": len(labs),
        "failed": len(failed),
        "failures": failed[:10],
        "mean_label_loss": mean(label),
        "median_label_loss": statistics.median(label),
        "mean_full_loss": mean(lab.full_loss for lab in labs),
        "mean_heuristic_loss": heur,
        "mean_best_heuristic_loss": mean(best),
        "median_best_heuristic_loss": statistics.median(best),
        "best_heuristic_method": best_method,
        # > 0: the label's mean loss is below the best heuristic method's
        "margin_vs_best_method": heur[best_method] - mean(label),
        "relative_margin_vs_best_method": (heur[best_method] - mean(label)) / heur[best_method]
        if heur[best_method] > 0
        else None,
        "margin_vs_per_sample_best": mean(best) - mean(label),
        "worse_than_best_heuristic": sum(worse) / len(labs),
        # strictly lower loss than every heuristic at the same k (ties are not wins)
        "beats_best_heuristic": mean(
            lab.result.loss < b for lab, b in zip(labs, best, strict=True)
        ),
        "search_space_log10": {
            "mean": mean(lab.result.space_log10 for lab in labs),
            "median": statistics.median(lab.result.space_log10 for lab in labs),
            "min": min(lab.result.space_log10 for lab in labs),
        },
        "worse_samples": sum(worse),
        # the samples the label only ties: their best heuristic's loss (near 0 nats: the
        # heuristic already answers with certainty, and a tie is all a label can do)
        "tied_best_heuristic_losses": sorted(
            b for lab, b in zip(labs, best, strict=True) if lab.result.loss == b
        ),
        "better_than_full": mean(lab.result.loss < lab.full_loss for lab in labs),
        "mean_k": mean(lab.result.k for lab in labs),
        "mean_kept_fraction": mean(lab.result.k / lab.result.n_tokens for lab in labs),
        "median_groups": statistics.median(lab.result.n_groups for lab in labs),
        "group_histogram": {str(g): groups[g] for g in sorted(groups)},
        "relevant_patches_kept": mean(rel) if rel else None,
        "all_relevant_kept": mean(r == 1.0 for r in rel) if rel else None,
        "seconds_per_sample": mean(lab.seconds for lab in labs),
        "forwards_per_sample": mean(lab.result.n_forwards for lab in labs),
    }


def _meaningful(sample, words: list[str]) -> float | None:
    objects = sample.meta.get("objects")
    if objects is None:
        return None
    cells = object_patches(objects)
    ok = [
        (w in (cells[i]["colour"], cells[i]["shape"])) if i in cells else w == "background"
        for i, w in enumerate(words)
    ]
    return sum(ok) / len(ok)


def grouping_health(ws: Workspace) -> dict[str, Any]:
    """How the vocabulary grouping splits each image's tokens (mode-independent)."""
    to_words = ws.mllm.tokenizer.convert_ids_to_tokens
    largest, distinct, meaningful, background, clash = [], [], [], [], []
    word_share: Counter[str] = Counter()
    n_tokens = 0
    for s in ws.samples:
        nearest = ws.features(s).nearest
        sizes = torch.bincount(group_ids(nearest))
        largest.append(float(sizes.max()) / nearest.numel())
        distinct.append(int(sizes.numel()))
        words = to_words(nearest.tolist())
        word_share.update(words)
        n_tokens += len(words)
        if relevant := sorted(set(s.meta.get("relevant") or [])):
            # paper mode keeps one token per group: two patches the answer needs in one group
            # cannot both be kept
            gids = group_ids(nearest)[relevant].tolist()
            clash.append(len(set(gids)) < len(gids))
        if (m := _meaningful(s, words)) is not None:
            meaningful.append(m)
            background.append(1 - len(s.meta["objects"]) / nearest.numel())
    words_median = statistics.median(distinct)
    mean_meaningful = mean(meaningful) if meaningful else None
    degenerate = words_median <= DEGENERATE_WORDS or (
        mean_meaningful is not None and mean_meaningful < DEGENERATE_MEANINGFUL
    )
    return {
        "mean_largest_group_fraction": mean(largest),
        "max_largest_group_fraction": max(largest),
        "mean_background_fraction": mean(background) if background else None,
        "median_distinct_words": words_median,
        "min_distinct_words": min(distinct),
        "distinct_words_histogram": {str(g): c for g, c in sorted(Counter(distinct).items())},
        "meaningful_nearest_word": mean_meaningful,
        "relevant_patches_share_a_group": mean(clash) if clash else None,
        "top_words": {w: round(c / n_tokens, 4) for w, c in word_share.most_common(10)},
        "vocabulary_words_used": len(word_share),
        "degenerate": degenerate,
    }


def print_report(rep: dict[str, Any]) -> None:
    print(f"\nEvoComp label quality: {rep['model']['path']} ({rep['model']['model_id']})")
    print(f"machine: {describe_machine(rep['machine'])}")
    print(
        f"{rep['samples']} held-out {rep.get('benchmark', 'shapes')}-vqa samples (seed {rep['seed']}); "
        "answer loss (mean cross-entropy), lower is better\n"
    )
    modes = [m for m in MODES if m in rep["modes"] and rep["modes"][m]["samples"]]
    col = 14
    print(f"{'':<28}" + "".join(f"{m:>{col}}" for m in modes))

    def row(name: str, fmt: str, get) -> None:
        vals = [get(rep["modes"][m]) for m in modes]
        cells = "".join(f"{'-':>{col}}" if v is None else f"{v:>{col}{fmt}}" for v in vals)
        print(f"{name:<28}{cells}")

    row("label", ".4g", lambda r: r["mean_label_loss"])
    row("full tokens", ".4g", lambda r: r["mean_full_loss"])
    for h in rep["modes"][modes[0]]["mean_heuristic_loss"] if modes else []:
        row(f"  {h}", ".4g", lambda r, h=h: r["mean_heuristic_loss"][h])
    row("per-sample best heuristic", ".4g", lambda r: r["mean_best_heuristic_loss"])
    for m in modes:
        print(f"best heuristic method ({m}): {rep['modes'][m]['best_heuristic_method']}")
    row("margin vs best method", ".4g", lambda r: r["margin_vs_best_method"])
    row("  relative", ".1%", lambda r: r["relative_margin_vs_best_method"])
    row("worse than best heuristic", ".1%", lambda r: r["worse_than_best_heuristic"])
    row("beats best heuristic", ".1%", lambda r: r["beats_best_heuristic"])
    row("log10 space size (median)", ".1f", lambda r: r["search_space_log10"]["median"])
    row("label below full loss", ".1%", lambda r: r["better_than_full"])
    row("mean k", ".2f", lambda r: r["mean_k"])
    row("kept fraction k/N", ".3f", lambda r: r["mean_kept_fraction"])
    row("all relevant patches kept", ".1%", lambda r: r["all_relevant_kept"])
    row("seconds / sample", ".3f", lambda r: r["seconds_per_sample"])
    row("forwards / sample", ".1f", lambda r: r["forwards_per_sample"])
    for m in modes:
        if rep["modes"][m]["failed"]:
            print(
                f"{m}: {rep['modes'][m]['failed']} samples FAILED, e.g. "
                f"{rep['modes'][m]['failures'][0]}"
            )
    g = rep["grouping"]
    hist = ", ".join(f"{k}: {v}" for k, v in g["distinct_words_histogram"].items())
    print(
        f"\ngroups per sample (= distinct nearest words): median {g['median_distinct_words']}, "
        f"histogram {{{hist}}}"
    )
    bg = g["mean_background_fraction"]
    print(
        f"largest group: {g['mean_largest_group_fraction']:.1%} of the tokens on average "
        f"(max {g['max_largest_group_fraction']:.1%})"
        + (f"; empty background patches: {bg:.1%}" if bg is not None else "")
    )
    if g["meaningful_nearest_word"] is not None:
        print(
            f"nearest word names the patch's content for {g['meaningful_nearest_word']:.1%} "
            "of the tokens"
        )
    if g["relevant_patches_share_a_group"] is not None:
        print(
            f"samples where two patches the answer needs share a group (paper mode can keep "
            f"only one of them): {g['relevant_patches_share_a_group']:.1%}"
        )
    print(
        "most common nearest words: " + ", ".join(f"{w} {s:.1%}" for w, s in g["top_words"].items())
    )
    if g["degenerate"]:
        print(
            "GROUPING DEGENERATES: most tokens share one or two vocabulary words, or their "
            "nearest words do not name what their patch shows; fix the vocabulary / projector "
            "alignment, not the search"
        )
    else:
        print("grouping: healthy (not degenerate)")
    check = rep.get("budget_never_worse")
    if check is not None:
        verdict = "PASS" if check else "FAIL"
        print(f"budget mode never worse than the best heuristic on any sample: {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, samples=200)
    p.add_argument("--modes", default=",".join(MODES), help="search modes, comma-separated")
    p.add_argument("--keep-ratio", type=float, default=1 / 3, help="budget mode: k = ratio * N")
    p.add_argument("--population", type=int, default=48)
    p.add_argument("--parents", type=int, default=12)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--search-seed", type=int, default=0, help="global search seed")
    p.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_label_quality.json")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes: expected a comma-separated subset of {MODES}, got {args.modes}")
    if not 0.0 < args.keep_ratio <= 1.0:
        p.error(f"--keep-ratio must lie in (0, 1], got {args.keep_ratio}")
    check_device(p, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Label, print the table, write the JSON; returns what was written."""
    args = parse_args(argv)
    start, machine = begin(args)
    ws = build_workspace(
        args.model, args.samples, args.seed, args.device, args.cache, benchmark=args.benchmark
    )
    modes = {}
    for mode in args.modes:
        params = SearchParams(
            mode=mode,
            population=args.population,
            parents=args.parents,
            generations=args.generations,
            keep_ratio=args.keep_ratio,
            seed=args.search_seed,
            seed_with_heuristics=True,
        )
        done, failed = label_all(ws, params)
        modes[mode] = mode_summary(done, failed) | {"params": params.model_dump(mode="json")}
    report: dict[str, Any] = {
        "modes": modes,
        "grouping": grouping_health(ws),
        "samples": len(ws.samples),
    } | workspace_report(ws, args, machine, command_line(argv, __file__))
    if "budget" in modes:
        report["budget_never_worse"] = modes["budget"].get("worse_samples", 0) == 0
    finish(report, args.out, start, print_report)
    if report.get("budget_never_worse") is False:
        raise SystemExit(
            f"budget mode: the label is worse than the best heuristic on "
            f"{modes['budget']['worse_samples']} samples; seeding with the heuristics must "
            "prevent that (see evocomp/search.py)"
        )
    return report


if __name__ == "__main__":
    main()
