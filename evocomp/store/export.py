"""Frozen Parquet exports of the label store: one label per sample, the latest run winning.

A label set holds one budget (:func:`budget_of`: paper mode, or budget mode at one keep ratio):
a label at 48 tokens is not a deeper search of one at 16, so runs of other budgets never
supersede it; each budget is exported to its own file (``evocomp label --keep-ratio``).

The live database is never a DVC output; this file is (``data/labels/labels.parquet``). The
same store always gives the same bytes: rows are sorted by sample id, the schema is fixed and
nothing time-dependent is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from evocomp.store.models import Label, LabelRun, SampleRow

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("qtype", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("image", pa.string()),
        ("run_id", pa.int64()),
        ("model_id", pa.string()),
        ("params_hash", pa.string()),
        ("n_tokens", pa.int64()),
        ("k", pa.int64()),
        ("kept", pa.list_(pa.int64())),
        ("soft", pa.list_(pa.float64())),
        ("groups", pa.list_(pa.int64())),
        ("loss", pa.float64()),
        ("full_loss", pa.float64()),
        ("heuristic_losses", pa.string()),  # JSON object, method -> loss
        ("margin", pa.float64()),
        ("agreement", pa.float64()),
        ("n_groups", pa.int64()),
    ]
)


def budget_of(params: dict[str, Any]) -> tuple[Any, ...]:
    """What a run's labels are labels *of*: ``("paper",)`` or ``("budget", keep ratio)``."""
    if params.get("mode", "paper") == "paper":
        return ("paper",)
    ratio = params.get("keep_ratio")
    # to 3 decimals, as metrics key ratios (evocomp.tokens.ratio_key): 1/3 and 0.333 are one
    return ("budget", None if ratio is None else round(float(ratio), 3))


def _budget_name(budget: tuple[Any, ...]) -> str:
    if budget == ("paper",):
        return "paper mode"
    return "budget mode" if budget[1] is None else f"keep ratio {budget[1]:g}"


def _latest_labels(
    session: Session,
    model_id: str | None,
    run_ids: Iterable[int] | None,
    budget: tuple[Any, ...] | None = None,
) -> list[dict[str, Any]]:
    """One row per sample: its done label from the most recently created matching run."""
    stmt = (
        select(
            Label.sample_id,
            SampleRow.split,
            SampleRow.qtype,
            SampleRow.question,
            SampleRow.answer,
            SampleRow.image,
            Label.run_id,
            LabelRun.model_id,
            LabelRun.params_hash,
            Label.n_tokens,
            Label.k,
            Label.kept,
            Label.soft,
            Label.groups,
            Label.loss,
            Label.full_loss,
            Label.heuristic_losses,
            Label.margin,
            Label.agreement,
            Label.n_groups,
            LabelRun.created_at.label("run_created_at"),
        )
        .join(LabelRun, Label.run_id == LabelRun.id)
        .join(SampleRow, Label.sample_id == SampleRow.id)
        .where(Label.status == "done")
    )
    if model_id is not None:
        stmt = stmt.where(LabelRun.model_id == model_id)
    if run_ids is not None:
        stmt = stmt.where(Label.run_id.in_([int(r) for r in run_ids]))
    # Each run's budget, read once per run (its params are JSON: SQLite and PostgreSQL differ
    # in JSON operators, so the budget is compared here and the labels filtered by run id).
    runs = select(LabelRun.id, LabelRun.params)
    if model_id is not None:
        runs = runs.where(LabelRun.model_id == model_id)
    run_budget = {run_id: budget_of(params) for run_id, params in session.execute(runs)}
    if budget is not None:
        stmt = stmt.where(Label.run_id.in_([r for r, b in run_budget.items() if b == budget]))
    best: dict[str, tuple[tuple[Any, int], dict[str, Any]]] = {}
    seen: set[tuple[Any, ...]] = set()
    for row in session.execute(stmt).mappings():
        seen.add(run_budget[row["run_id"]])
        # Run ids break creation-time ties (SQLite's CURRENT_TIMESTAMP has 1 s resolution).
        rank = (row["run_created_at"], row["run_id"])
        current = best.get(row["sample_id"])
        if current is None or rank > current[0]:
            best[row["sample_id"]] = (rank, dict(row))
    if len(seen) > 1:
        names = ", ".join(sorted(_budget_name(b) for b in seen))
        raise ValueError(
            f"the store holds labels of several budgets ({names}); export one "
            "(`evocomp labels export --paper` or `--keep-ratio R`)"
        )
    # Sorted in Python, not SQL: PostgreSQL collations would order strings differently.
    return [best[sid][1] for sid in sorted(best)]


def _to_record(row: dict[str, Any]) -> dict[str, Any]:
    record = {name: row[name] for name in SCHEMA.names}
    record["heuristic_losses"] = json.dumps(row["heuristic_losses"] or {}, sort_keys=True)
    return record


def _write_atomic(table: pa.Table, out: Path) -> None:
    """Write ``table`` to a temp file beside ``out``, then rename it over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pq.write_table(table, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())  # the rename must never expose an empty file after a crash
        tmp.chmod(0o644)  # mkstemp creates 0600; an export is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_labels(
    bind: Engine | Session,
    out_path: str | os.PathLike[str],
    model_id: str | None = None,
    run_ids: Iterable[int] | None = None,
    budget: tuple[Any, ...] | None = None,
) -> int:
    """Write the done labels to a Parquet file, one row per sample; return the row count.

    When a sample has labels in several (matching) runs, the most recently created run wins,
    so a deeper re-search supersedes older labels. ``budget`` (:func:`budget_of`) keeps only
    runs of that budget. The file is replaced atomically.
    """
    if isinstance(bind, Session):
        rows = _latest_labels(bind, model_id, run_ids, budget)
    else:
        with Session(bind) as session:
            rows = _latest_labels(session, model_id, run_ids, budget)
    table = pa.Table.from_pylist([_to_record(r) for r in rows], schema=SCHEMA)
    _write_atomic(table, Path(out_path))
    return table.num_rows
