"""The audit's input: one row of numeric facts per stored label, read from the store.

Shared by the dashboard (which caches it, ``dashboards/data.py``) and ``bench/audit.py``.
Works on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from evocomp.store import Generation, Label, LabelRun, SampleRow

_METHOD = re.compile(r"^\w+$")


def _frame(engine: Engine, stmt) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def heuristic_methods(engine: Engine) -> list[str]:
    """The heuristics the runs compared against (their search params' ``heuristics``)."""
    with engine.connect() as conn:
        params = conn.execute(select(LabelRun.params)).scalars().all()
    names = {m for p in params for m in (p or {}).get("heuristics", []) if isinstance(m, str)}
    return sorted(m for m in names if _METHOD.match(m))


def label_facts(engine: Engine) -> pd.DataFrame:
    """One row per stored label, numeric columns only (see ``evocomp.audit.suspects``), plus
    each heuristic's loss (``h_<method>``), the best and the worst of them."""
    methods = heuristic_methods(engine)
    last_gen = (
        select(func.max(Generation.gen))
        .where(Generation.label_id == Label.id)
        .scalar_subquery()
        .label("last_gen")
    )
    stmt = (
        select(
            Label.id.label("label_id"),
            Label.run_id,
            Label.sample_id,
            Label.status,
            Label.k,
            Label.n_tokens,
            Label.n_groups,
            Label.loss,
            Label.full_loss,
            Label.margin,
            Label.agreement,
            Label.converged_gen,
            last_gen,
            SampleRow.qtype,
            SampleRow.split,
            LabelRun.model_id,
            LabelRun.created_at.label("run_created"),
            *(Label.heuristic_losses[m].as_float().label(f"h_{m}") for m in methods),
        )
        .join(LabelRun, Label.run_id == LabelRun.id)
        .join(SampleRow, Label.sample_id == SampleRow.id)
    )
    df = _frame(engine, stmt.order_by(Label.id))
    for col in ("loss", "full_loss", "margin", "agreement", *(f"h_{m}" for m in methods)):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("k", "n_tokens", "n_groups", "converged_gen", "last_gen"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")  # NULL-able ints
    h = df[[f"h_{m}" for m in methods]]
    df["best_heuristic_loss"] = h.min(axis=1) if methods else float("nan")
    df["worst_heuristic_loss"] = h.max(axis=1) if methods else float("nan")
    best = h.fillna(float("inf")).idxmin(axis=1).str[2:] if methods and len(df) else None
    df["best_heuristic"] = (
        best.where(df["best_heuristic_loss"].notna()) if best is not None else None
    )
    return df
