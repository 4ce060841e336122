"""Does the audit find bad labels? Planted noise, and re-searching what it flags.

    make demo                                  # the label store, features and model it reads
    .venv/bin/python bench/audit.py            # ~5 min on 2 cores for the demo's 1200 labels
    .venv/bin/python bench/audit.py --research 0 --max-labels 200   # a smoke run
    .venv/bin/python bench/audit.py --heldout 600 --set-seed 11 --out metrics/bench_audit_heldout.json

Reads a label store (default: the demo's ``data/evocomp.db``, its prepared samples, feature
cache and ``mllm.checkpoint``) and takes the label set in it (the latest done label per
sample, as exported). With ``--heldout N`` it first makes one: a held-out shapes-vqa set of N
images drawn with ``--set-seed`` (``bench/_setup.py``, cached under ``.bench/``), labelled with
params.yaml's ``label`` settings by ``evocomp label`` into a store next to it. The suspect
rules are params.yaml's ``audit:`` section.

1. **Planted noise** (``evocomp.audit.noise``): for every label, three wrong labels of its
   size with their true answer loss (one batched forward per sample): a random candidate of
   its search space, the worst heuristic's set, the label shifted to neighbouring tokens. A
   seeded share (5% and 20%) of the labels get one of them (each kind alone, then the kinds
   mixed: ``overall``); the audit scores the noisy set. Per kind and share: AUROC of the
   suspect score for "planted", precision among the top #planted, health. On the clean set:
   the flagged share and health.
2. **Closing the loop**: the ``--research`` (50) highest-ranked labels and as many random
   others are re-searched with ``--budget`` (5) times the generations, through
   ``evocomp label --ids ... --generations ...`` on a copy of the store; how often and how
   much the loss improves, for each group. ``--keep-store PATH`` keeps the copy: point the
   dashboard at it (``EVOCOMP_DB_URL=sqlite:///PATH``) to see the before/after view.

Writes ``metrics/bench_audit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _common import REPO, begin, command_line, finish  # noqa: E402
from sqlalchemy import select  # noqa: E402

from evocomp.audit import noise, suspects  # noqa: E402
from evocomp.audit.facts import label_facts  # noqa: E402
from evocomp.config import SearchParams, load_params  # noqa: E402
from evocomp.data.prepared import load_prepared  # noqa: E402
from evocomp.features.cache import FeatureStore  # noqa: E402
from evocomp.mllm.loader import load_mllm  # noqa: E402
from evocomp.store import Label, LabelRun, get_engine  # noqa: E402

EVOCOMP = str(Path(sys.executable).parent / "evocomp")
RESEARCH_GRID = 1e-5  # the search's loss grid: a smaller change is no improvement


def wrong_labels(engine, latest: pd.DataFrame, mllm, data: Path, features: Path) -> pd.DataFrame:
    """Per label: the answer loss of each planted kind (columns ``noise.KINDS``)."""
    ids = [int(i) for i in latest["label_id"]]
    with engine.connect() as conn:
        rows = conn.execute(
            select(Label.id, Label.kept, Label.heuristic_losses, LabelRun.params)
            .join(LabelRun, LabelRun.id == Label.run_id)
            .where(Label.id.in_(ids))
        ).all()
    stored = {r[0]: r[1:] for r in rows}
    samples = {s.id: s for s in load_prepared(data)}
    fstore = FeatureStore(features, mllm.model_id)
    fields = set(SearchParams.model_fields)
    out, t0 = [], time.perf_counter()
    for i, (label_id, sid) in enumerate(zip(ids, latest["sample_id"], strict=True), 1):
        kept, hlosses, run_params = stored[label_id]
        params = SearchParams(**{k: v for k, v in run_params.items() if k in fields})
        sample, feats = samples[sid], fstore.get(sid)
        sets = noise.noisy_sets(sample, feats, kept, hlosses, params, mllm.grid)
        out.append(
            {"label_id": label_id} | noise.noisy_losses(mllm, sample, feats, sets, params.objective)
        )
        if i % 200 == 0 or i == len(ids):
            print(f"  wrong labels: {i}/{len(ids)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return pd.DataFrame(out)


def audit(facts: pd.DataFrame, rules) -> tuple[pd.DataFrame, float, float]:
    """Scored facts in their input order, the flagged share and the health of the set."""
    scored = suspects.score_suspects(facts, rules).loc[facts.index]
    health = suspects.run_health(scored.assign(run_id=0), rules)
    return scored, float(scored["suspect"].mean()), float(health["health"].iloc[0])


def planted_noise(latest, wrong, rules, shares, seed) -> dict[str, Any]:
    """Per kind (and ``overall``): the audit's figures on the clean set and at each share.

    A planted label whose loss is within ``max_heuristic_gap`` loss scales of the label it
    replaces is *benign*: under the search's objective it is as good a label (in budget mode
    the group quotas make many random candidates keep every object). Figures are given over
    all planted labels and over the harmful ones only (benign ones left out of both sides).
    """
    wrong = wrong.dropna(axis=1, how="any")  # a kind missing for some label is not planted
    kinds = [k for k in noise.KINDS if k in wrong] + ["overall"]
    clean, flagged_clean, health_clean = audit(latest, rules)
    out: dict[str, Any] = {}
    for kind in kinds:
        row: dict[str, Any] = {
            "flagged_clean_fraction": flagged_clean,
            "health_clean": health_clean,
        }
        for share in shares:
            noisy, planted = noise.plant(
                latest, wrong, None if kind == "overall" else kind, share, seed
            )
            scored, flagged, health = audit(noisy, rules)
            harm = planted & (
                (noisy["loss"] - latest["loss"]) / clean["scale"] > rules.max_heuristic_gap
            )
            keep = ~planted | harm
            tag = f"{round(share * 100):d}"
            row[f"auroc_{tag}"] = noise.auroc(scored["score"], planted)
            row[f"precision_at_planted_{tag}"] = noise.precision_at_planted(
                scored["score"], planted
            )
            row[f"benign_fraction_{tag}"] = float(1 - harm[planted].mean())
            if harm.any():
                row[f"auroc_harmful_{tag}"] = noise.auroc(scored["score"][keep], harm[keep])
                row[f"precision_at_harmful_{tag}"] = noise.precision_at_planted(
                    scored["score"][keep], harm[keep]
                )
            row[f"recall_flagged_{tag}"] = float(scored.loc[planted, "suspect"].mean())
            row[f"flagged_{tag}"] = flagged
            row[f"health_noisy_{tag}"] = health
        tags = [f"{round(s * 100):d}" for s in shares]
        for key in ("auroc", "precision_at_planted", "auroc_harmful", "precision_at_harmful"):
            vals = [row[f"{key}_{t}"] for t in tags if f"{key}_{t}" in row]
            row[key] = min(vals) if vals else None  # the unfavourable share
        out[kind] = row
    return out


def heldout_store(args) -> None:
    """Point ``args`` at a held-out set labelled into its own store (made once, then reused:
    ``evocomp label`` skips labelled samples)."""
    from _setup import build_workspace

    ws = build_workspace(args.model, args.heldout, args.set_seed, args.device)
    args.data = ws.root / "prepared-v0.1-t0.15"
    args.features = ws.root / "features"
    store = ws.root / f"audit-{ws.info['model_id']}.db"
    args.db_url = f"sqlite:///{store}"
    t0 = time.perf_counter()
    cmd = [
        EVOCOMP, "label", "--in-process", "--params", str(args.params), "--db-url", args.db_url,
        "--data", str(args.data), "--features", str(args.features), "--model", str(args.model),
        "--device", args.device, "--out", str(ws.root / "audit-labels.parquet"),
        "--metrics", str(ws.root / "audit-labels.json"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"labelling the held-out set failed:\n{res.stderr[-3000:]}")
    print(f"  held-out set labelled into {store} ({time.perf_counter() - t0:.0f} s)", flush=True)


def copy_store(src: str, dst: Path) -> str:
    """A consistent copy of a SQLite store (WAL included), as a URL."""
    path = src.removeprefix("sqlite:///")
    with sqlite3.connect(path) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return f"sqlite:///{dst}"


def research(args, url: str, scored: pd.DataFrame, params, tmp: Path) -> dict[str, Any]:
    """Re-search the top suspects and as many random labels with a larger budget."""
    n = args.research
    top = list(scored["sample_id"][:n])
    rest = scored["sample_id"][n:]
    rng = np.random.default_rng(args.seed)
    rand = list(rest.iloc[np.sort(rng.choice(len(rest), size=min(n, len(rest)), replace=False))])
    generations = params.label.generations * args.budget
    for name, ids in (("suspects", top), ("random", rand)):
        (tmp / f"{name}.json").write_text(json.dumps(ids))
        cmd = [
            EVOCOMP, "label", "--in-process", "--ids", str(tmp / f"{name}.json"),
            "--generations", str(generations), "--params", str(args.params),
            "--db-url", url, "--data", str(args.data), "--features", str(args.features),
            "--model", str(args.model), "--device", args.device,
            "--out", str(tmp / f"{name}.parquet"), "--metrics", str(tmp / f"{name}.json.out"),
        ]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise SystemExit(f"re-search of the {name} failed:\n{res.stderr[-3000:]}")
        print(f"  re-searched {len(ids)} {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ba = suspects.before_after(label_facts(get_engine(url))).set_index("sample_id")
    scale = scored.set_index("sample_id")["scale"]
    out: dict[str, Any] = {"generations": generations, "budget_factor": args.budget}
    for name, ids in (("suspects", top), ("random", rand)):
        d = ba.loc[ids, "delta"]
        out[name] = {
            "samples": len(ids),
            "improved": int((d < -RESEARCH_GRID / 2).sum()),
            "improved_fraction": float((d < -RESEARCH_GRID / 2).mean()),
            "mean_delta": float(d.mean()),
            "median_delta": float(d.median()),
            "mean_delta_scales": float((d / scale.loc[ids]).mean()),
            "flagged": int(scored.set_index("sample_id").loc[ids, "suspect"].sum()),
        }
    return out


def print_report(rep: dict[str, Any]) -> None:
    print(f"\n{rep['labels']} labels; clean: {rep['clean']}")
    cols = [
        "auroc",
        "precision_at_planted",
        "benign_fraction_20",
        "auroc_harmful",
        "precision_at_harmful",
        "health_noisy_5",
        "health_noisy_20",
    ]
    print(pd.DataFrame(rep["kinds"]).T[cols].round(3).to_string())
    if rep.get("research"):
        r = rep["research"]
        for name in ("suspects", "random"):
            g = r[name]
            print(
                f"re-search x{r['budget_factor']} {name}: {g['improved']}/{g['samples']} "
                f"improved, mean delta {g['mean_delta']:+.4f} nats"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db-url", default=f"sqlite:///{REPO / 'data' / 'evocomp.db'}")
    p.add_argument("--data", type=Path, default=REPO / "data" / "prepared")
    p.add_argument("--features", type=Path, default=REPO / "data" / "features")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--model", type=Path, help="default: params.yaml's mllm.checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-labels", type=int, help="only the first N labels (a smoke run)")
    p.add_argument("--research", type=int, default=50, help="labels re-searched per group")
    p.add_argument("--budget", type=int, default=5, help="generations multiplier")
    p.add_argument("--keep-store", type=Path, help="keep the re-searched store copy here")
    p.add_argument("--heldout", type=int, help="label a held-out set of N images first")
    p.add_argument("--set-seed", type=int, default=11, help="the held-out set's seed")
    p.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_audit.json")
    args = p.parse_args(argv)
    if args.heldout is not None:
        return args
    if not args.db_url.startswith("sqlite:///"):
        p.error("--db-url: the re-search copies the store: a SQLite URL (sqlite:///PATH)")
    if not Path(args.db_url.removeprefix("sqlite:///")).is_file():
        p.error(f"--db-url: no store at {args.db_url}: run `make demo` first")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start, machine = begin(args)
    params = load_params(args.params)
    args.model = args.model or REPO / params.mllm.checkpoint
    if args.heldout is not None:
        heldout_store(args)
    rules = params.audit
    engine = get_engine(args.db_url)
    latest = suspects.latest_per_sample(label_facts(engine)).reset_index(drop=True)
    if args.max_labels:
        latest = latest.iloc[: args.max_labels]
    if latest.empty:
        raise SystemExit(f"no done labels in {args.db_url}")
    mllm = load_mllm(args.model, args.device, prompt_template=params.mllm.prompt_template)
    wrong = wrong_labels(engine, latest, mllm, args.data, args.features)
    report: dict[str, Any] = {"labels": len(latest), "rules": rules.model_dump()}
    kinds = planted_noise(latest, wrong, rules, args.shares, args.seed)
    report["kinds"] = kinds
    report["clean"] = {
        "flagged_fraction": kinds["overall"]["flagged_clean_fraction"],
        "health": kinds["overall"]["health_clean"],
    }
    if args.research:
        scored, _, _ = audit(latest, rules)
        scored = scored.sort_values(["score", "excess"], ascending=False, kind="stable")
        with tempfile.TemporaryDirectory() as tmp:
            dst = args.keep_store or Path(tmp) / "store.db"
            dst.unlink(missing_ok=True)
            url = copy_store(args.db_url, dst)
            report["research"] = research(args, url, scored, params, Path(tmp))
    report |= {
        "store": args.db_url.replace(str(REPO) + "/", ""),
        "heldout": {"images": args.heldout, "seed": args.set_seed} if args.heldout else None,
        "model_id": mllm.model_id,
        "seed": args.seed,
        "machine": machine,
        "command": command_line(argv, __file__),
    }
    return finish(report, args.out, start, print_report)


if __name__ == "__main__":
    main()
