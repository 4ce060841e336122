"""Label audit: a suspect score per label, run health, before/after.

Pure functions over a table of per-label *facts* (``evocomp.audit.facts.label_facts``: one
row per stored label, numeric columns only: ``status, loss, full_loss, margin, agreement,
converged_gen, last_gen``, the heuristics' losses ``best_heuristic_loss`` /
``worst_heuristic_loss`` at the label's size, ...); the dashboard (``dashboards/``) and
``bench/audit.py`` present what these return. Thresholds: :class:`evocomp.config.AuditParams`
(``audit:`` in params.yaml).

A label is the best mask a finite search found (EvoComp paper, Sec. 3). Every loss below is
measured in the sample's *loss scale* ``s = max(worst heuristic loss - full-token loss,
loss_floor)``: how much the choice of tokens matters for this sample (0.004 nats on an easy
yes/no question, 8 nats on a colour question). The evidence against a label:

* ``heuristic``: the label's loss exceeds the best heuristic's at the same size by more than
  ``max_heuristic_gap`` scales. A free heuristic did better; the search starts from the
  heuristics' sets, so a clean label never does this: the strongest evidence (weight 2.5,
  more than all the others together).
* ``excess``: the label's loss exceeds the full-token loss by more than ``max_excess`` scales:
  the label loses the answer (weight 0.5).
* ``margin``: the final elite's runner-up is within ``min_margin`` scales (weight 0.25),
* ``agreement``: independent seeds found different masks, mean Jaccard ``< min_agreement``
  (``label.seeds > 1``; weight 0.25),
* ``not_converged``: the best mask still improved in the last generation (weight 0.125) —
  these three only where the label has room to improve (excess above ``min_room`` scales):
  on the many samples where any mask keeps the answer, ties and late improvements are noise.

Each fired reason has a severity in [0.5, 1] (0.5 at its threshold, 1 from ``SPAN`` past it);
the score is their weighted sum and a label is *flagged* when its score reaches
``flag_score``. A run's *bad share* is ``(sum over done labels of min(score, 1) + failed) /
(done + failed)`` and its *health* is ``max(0, 1 - bad share / health_tolerance)``: 1 when no
label is suspect and none failed, 0 when the evidence adds up to ``health_tolerance`` (a
quarter by default) of the labels being bad.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from evocomp.config import AuditParams

REASONS = ("heuristic", "excess", "margin", "agreement", "not_converged")
# A label a free heuristic beats is certainly improvable (re-searching from the heuristics'
# sets improves it): its weight exceeds all the others together (1.125), so it ranks above
# every label that is only doubtful.
WEIGHTS = {
    "heuristic": 2.5,
    "excess": 0.5,
    "margin": 0.25,
    "agreement": 0.25,
    "not_converged": 0.125,
}
SPAN = {"heuristic": 0.25, "excess": 0.5}  # scales past the threshold to full severity
EXPLAIN = {
    "heuristic": "the label's answer loss is above the best heuristic's at the same size",
    "excess": "the label's answer loss is far above the full-token loss: it loses the answer",
    "margin": "the search's runner-up is almost as good: the choice between them is arbitrary",
    "agreement": "independent seeds (label.seeds > 1) found different masks",
    "not_converged": "the best mask still improved in the last generation",
}


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name].astype(float) if name in df else pd.Series(np.nan, index=df.index)


def score_suspects(facts: pd.DataFrame, rules: AuditParams = AuditParams()) -> pd.DataFrame:
    """``facts`` with ``scale, gap, excess, score, reasons, suspect`` and one ``r_<reason>``
    severity column per reason added, ranked by score, then by excess (highest first; full
    ties keep the input order). Failed labels are never suspects (they are failures)."""
    df = facts.copy()
    done = df["status"] == "done"
    loss, full = _col(df, "loss"), _col(df, "full_loss")
    worst = _col(df, "worst_heuristic_loss")
    scale = (worst - full).where(worst.notna(), loss - full).clip(lower=rules.loss_floor)
    df["scale"] = scale.fillna(rules.loss_floor)
    df["gap"] = (loss - _col(df, "best_heuristic_loss")) / df["scale"]
    df["excess"] = (loss - full) / df["scale"]
    margin = _col(df, "margin") / df["scale"]
    room = done & (df["excess"] > rules.min_room)
    depth = {
        "heuristic": (df["gap"] - rules.max_heuristic_gap) / SPAN["heuristic"],
        "excess": (df["excess"] - rules.max_excess) / SPAN["excess"],
        "margin": (rules.min_margin - margin) / max(rules.min_margin, 1e-12),
        "agreement": (rules.min_agreement - _col(df, "agreement"))
        / max(rules.min_agreement, 1e-12),
        "not_converged": pd.Series(1.0, index=df.index),
    }
    fired = {
        "heuristic": done & (df["gap"] > rules.max_heuristic_gap),
        "excess": done & (df["excess"] > rules.max_excess),
        "margin": room & (margin < rules.min_margin),
        "agreement": room & (_col(df, "agreement") < rules.min_agreement),
        "not_converged": room
        & (df["last_gen"].fillna(0) > 0)
        & (df["converged_gen"] == df["last_gen"]).fillna(False),
    }
    score = pd.Series(0.0, index=df.index)
    for name in REASONS:
        sev = (0.5 + 0.5 * depth[name].fillna(0.0).clip(0.0, 1.0)).where(fired[name], 0.0)
        df[f"r_{name}"] = sev
        score += WEIGHTS[name] * sev
    df["score"] = score.round(4)
    df["suspect"] = done & (df["score"] >= rules.flag_score)
    df["reasons"] = [", ".join(n for n in REASONS if fired[n].iloc[i]) for i in range(len(df))]
    return df.sort_values(["score", "excess"], ascending=False, kind="stable")


def reason_counts(scored: pd.DataFrame, suspects_only: bool) -> pd.Series:
    """Labels each reason fired on, among the suspects only or among all ``scored`` labels (a
    reason can fire on a label whose score stays under the flag)."""
    rows = scored[scored["suspect"]] if suspects_only else scored
    return pd.Series({r: int(rows[f"r_{r}"].gt(0).sum()) for r in REASONS}, dtype=int)


def run_health(scored: pd.DataFrame, rules: AuditParams = AuditParams()) -> pd.DataFrame:
    """Per run: done, failed, suspects, bad share and health (see the module docstring),
    oldest run first."""
    cols = ["run_id", "done", "failed", "suspects", "bad_share", "health"]
    if scored.empty:
        return pd.DataFrame(columns=cols)
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
    out["bad_share"] = ((out["penalty"] + out["failed"]) / total).round(4)
    out["health"] = (1.0 - out["bad_share"] / rules.health_tolerance).clip(lower=0.0).round(4)
    return out.drop(columns="penalty").reset_index()[cols]


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
