"""Label audit: suspect labels, run health, keep/drop imbalance.

Pure functions over a table of per-label *facts* (one row per stored label, numeric columns
only: ``run_id, sample_id, status, k, n_tokens, n_groups, loss, full_loss, margin, agreement,
converged_gen, last_gen, qtype, model_id, run_created``); the dashboard (``dashboards/``)
queries the store and presents what these return.

A label is *suspect* when the search gives little reason to trust it (EvoComp paper, Sec. 3:
the label is the best mask a finite GA found):

* small margin: the runner-up of the final elite is almost as good (``margin < min_margin``);
* low agreement: independent seeds found different masks (mean Jaccard ``< min_agreement``);
* large excess: the label's answer loss exceeds the full-token loss by more than ``max_excess``;
* not converged: the best mask was still improving in the last generation.

Each fired reason has a severity in [0.5, 1] (how far past its threshold); the suspect score is
their weighted sum. A run's *health* is ``1 - (sum over done labels of min(score, 1) + failed)
/ (done + failed)``: 1 when no label is suspect and none failed, 0 when every label is a strong
suspect or failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SuspectRules:
    """Thresholds of the four suspect reasons and their weights in the score."""

    min_margin: float = 0.01  # nats: a runner-up this close makes the choice arbitrary
    min_agreement: float = 0.5  # Jaccard across seeds (only when label.seeds > 1)
    max_excess: float = 0.5  # nats above the full-token loss: the label loses the answer
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.5)  # margin, agr, excess, conv


REASONS = ("margin", "agreement", "excess", "not_converged")


def _severity(depth: pd.Series) -> pd.Series:
    """0.5 just past a threshold, 1.0 at twice as far or more."""
    return 0.5 + 0.5 * depth.clip(0.0, 1.0)


def score_suspects(facts: pd.DataFrame, rules: SuspectRules = SuspectRules()) -> pd.DataFrame:
    """``facts`` with ``excess, score, reasons, suspect`` (and one column per reason) added.

    Failed labels are never suspects (they are failures). Rows are ranked by score, highest
    first; ties keep the input order.
    """
    df = facts.copy()
    done = df["status"] == "done"
    df["excess"] = df["loss"] - df["full_loss"]
    margin = df["margin"].astype(float)
    agreement = df["agreement"].astype(float)
    fired = {
        "margin": done & (margin < rules.min_margin),
        "agreement": done & (agreement < rules.min_agreement),
        "excess": done & (df["excess"] > rules.max_excess),
        "not_converged": done
        & (df["last_gen"].fillna(0) > 0)
        & (df["converged_gen"] == df["last_gen"]),
    }
    depth = {
        "margin": (rules.min_margin - margin) / max(rules.min_margin, 1e-12),
        "agreement": (rules.min_agreement - agreement) / max(rules.min_agreement, 1e-12),
        "excess": (df["excess"] - rules.max_excess) / max(rules.max_excess, 1e-12),
        "not_converged": pd.Series(1.0, index=df.index),
    }
    score = pd.Series(0.0, index=df.index)
    for name, weight in zip(REASONS, rules.weights, strict=True):
        sev = _severity(depth[name].fillna(0.0)).where(fired[name], 0.0)
        df[f"r_{name}"] = sev
        score += weight * sev
    df["score"] = score.round(4)
    df["suspect"] = pd.concat(fired, axis=1).any(axis=1)
    df["reasons"] = [", ".join(n for n in REASONS if fired[n].iloc[i]) for i in range(len(df))]
    return df.sort_values("score", ascending=False, kind="stable")


def run_health(scored: pd.DataFrame) -> pd.DataFrame:
    """Per run: done, failed, suspects and health (see the module docstring), oldest run first."""
    if scored.empty:
        return pd.DataFrame(columns=["run_id", "done", "failed", "suspects", "health"])
    df = scored.assign(
        is_done=scored["status"] == "done",
        is_failed=scored["status"] == "failed",
        penalty=scored["score"].clip(upper=1.0).where(scored["status"] == "done", 0.0),
    )
    g = df.groupby("run_id", sort=True)
    out = pd.DataFrame(
        {
            "done": g["is_done"].sum(),
            "failed": g["is_failed"].sum(),
            "suspects": g["suspect"].sum(),
            "penalty": g["penalty"].sum(),
        }
    )
    total = (out["done"] + out["failed"]).clip(lower=1)
    out["health"] = (1.0 - (out["penalty"] + out["failed"]) / total).round(4)
    return out.drop(columns="penalty").reset_index()


def latest_per_sample(facts: pd.DataFrame) -> pd.DataFrame:
    """Done labels, one per sample from its most recent run (what the Parquet export keeps)."""
    done = facts[facts["status"] == "done"]
    done = done.sort_values(["run_created", "run_id"], kind="stable")
    return done.drop_duplicates("sample_id", keep="last")


def before_after(facts: pd.DataFrame) -> pd.DataFrame:
    """Samples labelled in several runs: the oldest (before) vs the newest (after) done label."""
    done = facts[facts["status"] == "done"].sort_values(["run_created", "run_id"], kind="stable")
    multi = done[done.duplicated("sample_id", keep=False)]
    if multi.empty:
        return pd.DataFrame(columns=["sample_id", "runs", "loss_before", "loss_after", "delta"])
    g = multi.groupby("sample_id", sort=True)
    out = pd.DataFrame(
        {
            "runs": g["run_id"].nunique(),
            "loss_before": g["loss"].first(),
            "loss_after": g["loss"].last(),
            "margin_before": g["margin"].first(),
            "margin_after": g["margin"].last(),
        }
    )
    out["delta"] = out["loss_after"] - out["loss_before"]
    return out.reset_index()


def keep_stats(labels: pd.DataFrame) -> dict[str, Any]:
    """Keep/drop balance of done labels: overall, per question type and per number of groups."""
    done = labels[labels["status"] == "done"]
    kept, tokens = float(done["k"].sum()), float(done["n_tokens"].sum())

    def by(col: str) -> pd.DataFrame:
        g = done.assign(**{col: done[col].fillna("?") if col == "qtype" else done[col]})
        g = g.groupby(col, sort=True).agg(
            labels=("k", "size"), kept=("k", "sum"), tokens=("n_tokens", "sum")
        )
        g["keep_ratio"] = g["kept"] / g["tokens"].clip(lower=1)
        return g.reset_index()

    return {
        "labels": len(done),
        "keep_ratio": kept / tokens if tokens else None,
        "by_qtype": by("qtype"),
        "by_groups": by("n_groups"),
        "kept_fraction": (done["k"] / done["n_tokens"].clip(lower=1)).rename("kept_fraction"),
    }


def keep_by_group_size(rows: Iterable[tuple[list[int], list[int]]]) -> pd.DataFrame:
    """Keep rate of tokens by the size of their vocabulary group, from (kept, groups) pairs."""
    tokens: dict[int, int] = {}
    kept_n: dict[int, int] = {}
    for kept, groups in rows:
        sizes = np.bincount(np.asarray(groups, dtype=np.int64)) if len(groups) else np.zeros(0)
        size_of = sizes[np.asarray(groups, dtype=np.int64)] if len(groups) else sizes
        for s, n in zip(*np.unique(size_of, return_counts=True), strict=True):
            tokens[int(s)] = tokens.get(int(s), 0) + int(n)
        for t in kept:
            s = int(size_of[t])
            kept_n[s] = kept_n.get(s, 0) + 1
    df = pd.DataFrame(
        {
            "group_size": sorted(tokens),
            "tokens": [tokens[s] for s in sorted(tokens)],
            "kept": [kept_n.get(s, 0) for s in sorted(tokens)],
        }
    )
    df["keep_rate"] = df["kept"] / df["tokens"].clip(lower=1)
    return df
