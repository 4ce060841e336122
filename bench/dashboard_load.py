"""Dashboard page load times on a store of 10,000 labelled samples (SQLite).

    .venv/bin/python bench/dashboard_load.py                  # 10,000 samples, ~1 min on 2 cores
    .venv/bin/python bench/dashboard_load.py --samples 500    # a smoke run

Builds a synthetic label store in a temporary directory through the store API
(``upsert_samples``, ``get_or_create_run``, ``write_label``, ``write_failure``): one dataset,
a first run labelling every sample (36 tokens, 3-8 vocabulary groups and their words, each
heuristic's kept set, an 11-generation logbook and a 12-candidate elite per label, 1% failures,
~10% of the labels beaten by a heuristic)
and a second, deeper run re-labelling 10% of them (two seeds: agreement). Images and their meta
(grid, objects, answer cells) come from a small shapes-vqa pool reused across samples.

Then, per dashboard page, with Streamlit's caches cleared before every measurement (a cold
load): the page's queries and statistics alone, and a whole ``AppTest`` run of the page
(script, queries, charts; no browser). Reports min and median over ``--repeats`` and writes
``metrics/bench_dashboard_load.json`` with ``max_page_seconds`` (the slowest page's median
AppTest run), ``samples``, per-page seconds and the ``command``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # dashboards/ is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, command_line, describe_machine, machine_info, summarize

from evocomp.files import write_json_atomic

PAGES = {
    "overview": "pages/overview.py",
    "label_quality": "pages/label_quality.py",
    "sample": "pages/sample.py",
    "imbalance": "pages/imbalance.py",
}
GENERATIONS = 10
N_TOKENS = 36
ELITE = 12
HEURISTICS = ("random", "pooling", "fastv", "visionzip", "divprune", "dart")
_CHUNK = 500  # labels per transaction


def _record(rng: random.Random, generations: int, seeds: int):
    """A plausible paper-mode label: one kept token per vocabulary group."""
    from evocomp.data.shapes import WORDS
    from evocomp.store import LabelRecord

    n_groups = rng.randint(3, 8)
    groups = [0] * N_TOKENS  # group 0: background
    cells = rng.sample(range(N_TOKENS), 2 * (n_groups - 1))
    for g in range(1, n_groups):
        for t in cells[2 * (g - 1) : 2 * g]:
            groups[t] = g
    members = [[t for t in range(N_TOKENS) if groups[t] == g] for g in range(n_groups)]
    kept = sorted(rng.choice(m) for m in members)
    full = rng.uniform(0.05, 1.0)
    loss = max(0.01, full + rng.gauss(0.05, 0.3))
    margin = rng.expovariate(1 / 0.05)
    beaten = rng.random() < 0.1
    conv = rng.randint(0, generations)
    logbook = []
    for gen in range(generations + 1):
        best = loss + max(0.0, (conv - gen)) * 0.05
        logbook.append(
            {
                "gen": gen,
                "nevals": 48 if gen == 0 else 36,
                "min": best,
                "avg": best + 0.3,
                "max": best + 0.9,
                "std": 0.2,
            }
        )
    elite = [(kept, loss)]
    for i in range(1, ELITE):
        alt = list(kept)
        g = rng.randrange(n_groups)
        alt[g] = rng.choice(members[groups[kept[g]]])
        elite.append((sorted(set(alt)), loss + margin + 0.01 * i))
    soft = [0.0] * N_TOKENS
    for cand, _ in elite:
        for t in cand:
            soft[t] += 1 / ELITE
    return LabelRecord(
        kept=kept,
        k=len(kept),
        n_tokens=N_TOKENS,
        soft=soft,
        groups=groups,
        loss=loss,
        full_loss=full,
        margin=margin,
        n_groups=n_groups,
        converged_gen=conv,
        heuristic_losses={  # ~10% of the labels lose to DivPrune: the audit's suspects
            m: loss + abs(rng.gauss(0.3, 0.2)) * (-1 if beaten and m == "divprune" else 1)
            for m in HEURISTICS
        },
        heuristic_kept={m: sorted(rng.sample(range(N_TOKENS), len(kept))) for m in HEURISTICS},
        group_words=rng.sample(WORDS, n_groups),
        agreement=rng.uniform(0.2, 1.0) if seeds > 1 else None,
        n_forwards=generations + 1,
        seconds=rng.uniform(0.5, 2.0),
        logbook=logbook,
        elite=elite,
    )


def make_store(url: str, n: int, root: Path, seed: int = 0) -> dict[str, Any]:
    """Write a synthetic n-sample label store at ``url`` (images under ``root``); returns counts."""
    from evocomp.config import SearchParams
    from evocomp.data.readers import read_dataset
    from evocomp.data.synth import write_dataset
    from evocomp.store import (
        ensure_dataset,
        finish_run,
        get_engine,
        get_or_create_run,
        session_scope,
        upgrade,
        upsert_samples,
        write_failure,
        write_label,
    )

    rng = random.Random(seed)
    write_dataset(root / "pool", n=min(24, n), seed=seed, questions_per_image=1)
    pool = read_dataset(root / "pool")
    upgrade(url)
    engine = get_engine(url)
    dataset_id = ensure_dataset(engine, "synthetic", str(root / "pool"))
    ids = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:32] for i in range(n)]
    rows = [
        {
            "id": sid,
            "split": ("test", "val", *["train"] * 8)[i % 10],
            "qtype": b.meta.get("qtype"),
            "question": b.question,
            "answer": b.answer,
            "image": str(b.image),
            "meta": b.meta | {"pool": i % len(pool)},
        }
        for i, sid in enumerate(ids)
        for b in [pool[i % len(pool)]]
    ]
    upsert_samples(engine, dataset_id, rows)
    first = SearchParams().model_dump(mode="json")
    deeper = SearchParams(generations=2 * GENERATIONS, seeds=2).model_dump(mode="json")
    counts = {"done": 0, "failed": 0, "relabelled": 0}
    for params, gens, seeds, chosen in (
        (first, GENERATIONS, 1, ids),
        (deeper, 2 * GENERATIONS, 2, ids[::10]),
    ):
        run = get_or_create_run(engine, "synthetic-llava", params, "bench")
        for start in range(0, len(chosen), _CHUNK):
            with session_scope(engine) as session:
                for sid in chosen[start : start + _CHUNK]:
                    if seeds == 1 and rng.random() < 0.01:
                        write_failure(session, run, sid, "ValueError: synthetic failure")
                        counts["failed"] += 1
                        continue
                    write_label(session, run, sid, _record(rng, gens, seeds))
                    counts["done" if seeds == 1 else "relabelled"] += 1
        finish_run(engine, run, "done")
    return counts


def _page_queries(page: str, url: str) -> None:
    """What a page reads and computes before it draws (its cached functions, called cold)."""
    from dashboards import data
    from evocomp.audit import keep, suspects

    facts = data.label_facts(url)
    if page == "overview":
        data.runs(url)
        suspects.run_health(suspects.score_suspects(facts))
    elif page == "label_quality":
        suspects.score_suspects(facts)
        suspects.before_after(facts)
    elif page == "sample":
        top = suspects.score_suspects(facts).iloc[0]
        data.sample(url, top["sample_id"])
        data.generations(url, int(top["label_id"]))
        data.elites(url, int(top["label_id"]))
        data.sample_labels(url, top["sample_id"])
    elif page == "imbalance":
        scope = suspects.latest_per_sample(facts)
        keep.keep_stats(scope)
        keep.fixed_keep_fraction(scope)
        ids = tuple(sorted(int(i) for i in scope["label_id"])[: data.MAX_GROUP_LABELS])
        rows = data.keep_details(url, ids)
        keep.keep_by_class(rows)
        keep.keep_heatmaps(rows)
        keep.keep_by_word(rows)


def _apptest_page(page: str) -> float:
    """Seconds of one cold AppTest run of ``page`` (the app is opened on Overview first)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "dashboards" / "app.py"), default_timeout=120)
    if page != "overview":
        at.run()
        at.switch_page(PAGES[page])
    st.cache_data.clear()
    t0 = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"page {page} raised: {at.exception[0].value}")
    return seconds


@contextmanager
def _dashboard_env(root: Path, url: str) -> Iterator[None]:
    """Point the dashboard at the temporary store (EVOCOMP_* variables), restored afterwards;
    silence bare-mode Streamlit's "No runtime found" warning, printed at every cached call."""
    env = {
        "EVOCOMP_DB_URL": url,
        "EVOCOMP_PARAMS": str(root / "params.yaml"),
        "EVOCOMP_METRICS_DIR": str(root / "metrics"),
        "EVOCOMP_LABELS": str(root / "labels.parquet"),
        "EVOCOMP_COMPRESSOR": str(root / "compressor"),
        "EVOCOMP_FEATURES_DIR": str(root / "features"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(url: str, repeats: int) -> dict[str, Any]:
    """{page: {"queries_seconds": ..., "apptest_seconds": ...}}, each cold (caches cleared)."""
    import streamlit as st

    _apptest_page("overview")  # warm-up: imports, engine, plotly
    pages: dict[str, Any] = {}
    for page in PAGES:
        q, a = [], []
        for _ in range(repeats):
            st.cache_data.clear()
            t = time.perf_counter()
            _page_queries(page, url)
            q.append(time.perf_counter() - t)
            a.append(_apptest_page(page))
        pages[page] = {"queries_seconds": summarize(q), "apptest_seconds": summarize(a)}
    return pages


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_dashboard_load.json")
    args = parser.parse_args(argv)
    info = machine_info()
    print(describe_machine(info))
    with tempfile.TemporaryDirectory(prefix="evocomp-dash-bench-") as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'store.db'}"
        t0 = time.perf_counter()
        counts = make_store(url, args.samples, root)
        build_s = time.perf_counter() - t0
        print(f"store: {args.samples} samples, {counts} in {build_s:.1f} s")
        (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
        with _dashboard_env(root, url):
            pages = measure(url, args.repeats)
    print(f"\n{'page':<15}{'queries min/med (s)':>22}{'AppTest min/med (s)':>22}")
    for page, r in pages.items():
        qs, ap = r["queries_seconds"], r["apptest_seconds"]
        print(
            f"{page:<15}{qs['min']:>11.3f}{qs['median']:>11.3f}{ap['min']:>11.3f}{ap['median']:>11.3f}"
        )
    result = {
        "samples": args.samples,
        "labels": counts,
        "store_build_seconds": round(build_s, 1),
        "max_page_seconds": round(max(r["apptest_seconds"]["median"] for r in pages.values()), 3),
        "pages": pages,
        "command": command_line(argv, __file__ if argv is not None else None),
        "machine": info,
    }
    write_json_atomic(args.out, result)
    print(
        f"\nmax page seconds (median cold AppTest run): {result['max_page_seconds']}; wrote {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
