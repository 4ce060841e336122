"""Idempotent reads and writes of the label store: datasets, samples, runs and labels.

Every function takes an ``Engine`` (it opens and commits its own transaction) or a ``Session``
(it joins the caller's transaction, which the caller commits). Writes are upserts on the
tables' unique keys, so repeating a call never duplicates a row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from evocomp.errors import StoreError
from evocomp.store.engine import session_scope
from evocomp.store.models import Dataset, Elite, Generation, Label, LabelRun, SampleRow
from evocomp.store.records import LabelRecord

Bind = Engine | Session

RUN_STATUSES = ("running", "done", "failed")
SAMPLE_COLUMNS = ("split", "qtype", "question", "answer", "image", "meta")
MAX_ERROR_CHARS = 20_000  # a whole traceback is useful; a runaway log is not
_UPSERT_CHUNK = 500  # rows per INSERT: 7 columns x 500 stays far below SQLite's variable limit


@contextmanager
def _tx(bind: Bind) -> Iterator[Session]:
    """Use the caller's session as is, or open one transaction on an engine."""
    if isinstance(bind, Session):
        yield bind
    else:
        with session_scope(bind) as session:
            yield session


def _insert(session: Session, model: type) -> Any:
    """The dialect's ``INSERT`` construct, which has ``on_conflict_do_update``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise StoreError(f"unsupported store backend {dialect!r}: use SQLite or PostgreSQL")


def _finite(x: Any) -> float | None:
    """``float(x)``, or None for None/NaN/inf (PostgreSQL JSON rejects NaN; SQLite drops it)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``params`` (sorted keys, no whitespace)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_key(model_id: str, p_hash: str) -> str:
    """The unique key of a label run: sha256 of ``model_id + params_hash``."""
    return hashlib.sha256(f"{model_id}{p_hash}".encode()).hexdigest()


def ensure_dataset(bind: Bind, name: str, source: str) -> int:
    """Return the id of dataset ``name``, creating it (or updating its source) if needed."""
    with _tx(bind) as session:
        stmt = _insert(session, Dataset).values(name=name, source=source)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={"source": source})
        return session.execute(stmt.returning(Dataset.id)).scalar_one()


def upsert_samples(bind: Bind, dataset_id: int, rows: list[dict[str, Any]]) -> int:
    """Insert or update samples by id (content hash); return the number of rows written.

    Each row has ``id, split, qtype, question, answer, image, meta`` (qtype, meta optional).
    """
    values = []
    for row in rows:
        if not row.get("id"):
            raise ValueError(f"sample row without an id: {row!r:.200}")
        values.append(
            {"id": row["id"], "dataset_id": dataset_id} | {c: row.get(c) for c in SAMPLE_COLUMNS}
        )
    with _tx(bind) as session:
        for start in range(0, len(values), _UPSERT_CHUNK):
            stmt = _insert(session, SampleRow).values(values[start : start + _UPSERT_CHUNK])
            excluded = stmt.excluded
            updates = {c: excluded[c] for c in ("dataset_id", *SAMPLE_COLUMNS)}
            session.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=updates))
    return len(values)


def get_or_create_run(
    bind: Bind, model_id: str, params: dict[str, Any], code_version: str, note: str | None = None
) -> int:
    """Return the run of (model_id, params), creating it; a reused run is marked running again.

    The run keeps the code_version it was created with; a new ``note`` replaces the old one.
    """
    p_hash = params_hash(params)
    with _tx(bind) as session:
        stmt = _insert(session, LabelRun).values(
            key=run_key(model_id, p_hash),
            model_id=model_id,
            params=params,
            params_hash=p_hash,
            code_version=code_version,
            status="running",
            note=note,
        )
        reopen = {
            "status": "running",
            "finished_at": None,
            "note": func.coalesce(stmt.excluded.note, LabelRun.__table__.c.note),
        }
        stmt = stmt.on_conflict_do_update(index_elements=["key"], set_=reopen)
        return session.execute(stmt.returning(LabelRun.id)).scalar_one()


def finish_run(bind: Bind, run_id: int, status: str) -> None:
    """Mark run ``run_id`` as ``status`` (done or failed) and stamp its finish time."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
    with _tx(bind) as session:
        result = session.execute(
            update(LabelRun)
            .where(LabelRun.id == run_id)
            .values(status=status, finished_at=None if status == "running" else func.now())
        )
        if result.rowcount == 0:
            raise ValueError(f"no label run with id {run_id}")


def labelled_sample_ids(
    bind: Bind, model_id: str, params_hash: str, status: str | None = "done"
) -> set[str]:
    """Ids of samples already labelled by (model_id, params_hash) with ``status`` (None: any).

    This is the skip-set of a resumable label flow; failed samples are retried by default.
    """
    stmt = (
        select(Label.sample_id)
        .join(LabelRun, Label.run_id == LabelRun.id)
        .where(LabelRun.model_id == model_id, LabelRun.params_hash == params_hash)
    )
    if status is not None:
        stmt = stmt.where(Label.status == status)
    with _tx(bind) as session:
        return set(session.scalars(stmt))


def _indices(seq: Iterable[int], n: int, what: str) -> list[int]:
    """Sorted distinct token indices in [0, n); a ValueError naming ``what`` otherwise."""
    out = sorted(int(i) for i in seq)
    if len(set(out)) != len(out) or (out and not 0 <= out[0] <= out[-1] < n):
        raise ValueError(f"{what} must be distinct indices in [0, {n}), got {out}")
    return out


def _label_values(sample_id: str, record: LabelRecord) -> dict[str, Any]:
    """Validated, JSON-safe column values of a done label."""
    n = int(record.n_tokens)
    where = f"label of sample {sample_id}"
    kept = _indices(record.kept, n, f"{where}: kept")
    if int(record.k) != len(kept):
        raise ValueError(f"{where}: k={record.k} but {len(kept)} kept tokens")
    for name in ("soft", "groups"):
        seq = getattr(record, name)
        if seq is not None and len(seq) != n:
            raise ValueError(f"{where}: {name} has {len(seq)} entries, expected n_tokens={n}")
    heuristic_kept = None
    if record.heuristic_kept is not None:
        heuristic_kept = {
            str(m): _indices(s, n, f"{where}: heuristic {m!r} kept")
            for m, s in record.heuristic_kept.items()
        }
    if record.group_words is not None and record.groups is not None:
        n_groups = max(record.groups, default=-1) + 1
        if len(record.group_words) != n_groups:
            raise ValueError(
                f"{where}: group_words has {len(record.group_words)} entries, expected one per "
                f"group ({n_groups})"
            )
    return {
        "status": "done",
        "error": None,
        "n_tokens": n,
        "k": len(kept),
        "kept": kept,
        "soft": None if record.soft is None else [_finite(x) for x in record.soft],
        "groups": None if record.groups is None else [int(g) for g in record.groups],
        "loss": _finite(record.loss),
        "full_loss": _finite(record.full_loss),
        "heuristic_losses": {str(m): _finite(v) for m, v in record.heuristic_losses.items()},
        "margin": _finite(record.margin),
        "agreement": _finite(record.agreement),
        "n_groups": None if record.n_groups is None else int(record.n_groups),
        "converged_gen": None if record.converged_gen is None else int(record.converged_gen),
        "n_forwards": None if record.n_forwards is None else int(record.n_forwards),
        "seconds": _finite(record.seconds),
        "heuristic_kept": heuristic_kept,
        "group_words": None if record.group_words is None else [str(w) for w in record.group_words],
    }


def write_label(bind: Bind, run_id: int, sample_id: str, record: LabelRecord) -> int:
    """Upsert the label of (run, sample) with its generations and elite; return the label id.

    One transaction: the label row is upserted on (run_id, sample_id), then its generations
    and elite are replaced, so writing the same label twice leaves exactly one copy.
    """
    values = _label_values(sample_id, record)
    generations = [
        {
            "gen": int(row["gen"]),
            "nevals": int(row["nevals"]),
            **{s: _finite(row.get(s)) for s in ("min", "avg", "max", "std")},
        }
        for row in record.logbook
    ]
    elites = [
        {"rank": rank, "kept": sorted(int(i) for i in kept), "loss": _finite(loss)}
        for rank, (kept, loss) in enumerate(record.elite)
    ]
    with _tx(bind) as session:
        stmt = _insert(session, Label).values(run_id=run_id, sample_id=sample_id, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "sample_id"], set_=values | {"updated_at": func.now()}
        )
        label_id = session.execute(stmt.returning(Label.id)).scalar_one()
        session.execute(delete(Generation).where(Generation.label_id == label_id))
        session.execute(delete(Elite).where(Elite.label_id == label_id))
        if generations:
            session.execute(insert(Generation), [g | {"label_id": label_id} for g in generations])
        if elites:
            session.execute(insert(Elite), [e | {"label_id": label_id} for e in elites])
        return label_id


def write_failure(bind: Bind, run_id: int, sample_id: str, error: str) -> None:
    """Record that labelling (run, sample) failed; a 'done' label is never overwritten."""
    error = error[:MAX_ERROR_CHARS]
    with _tx(bind) as session:
        stmt = _insert(session, Label).values(
            run_id=run_id,
            sample_id=sample_id,
            status="failed",
            error=error,
            n_tokens=0,
            k=0,
            kept=[],
            heuristic_losses={},
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "sample_id"],
            set_={"status": "failed", "error": error, "updated_at": func.now()},
            where=Label.__table__.c.status != "done",
        )
        session.execute(stmt)


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def run_summary(bind: Bind, run_id: int) -> dict[str, Any]:
    """Counts, failure reasons and mean losses of one run (the store side of labels.json)."""
    with _tx(bind) as session:
        run = session.get(LabelRun, run_id)
        if run is None:
            raise ValueError(f"no label run with id {run_id}")
        rows = session.execute(
            select(
                Label.sample_id, Label.status, Label.error, Label.loss, Label.full_loss,
                Label.heuristic_losses,
            )
            .where(Label.run_id == run_id)
            .order_by(Label.sample_id)
        ).all()  # fmt: skip
        header = {
            "run_id": run.id,
            "model_id": run.model_id,
            "params_hash": run.params_hash,
            "params": run.params,
            "code_version": run.code_version,
            "status": run.status,
        }
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status == "failed"]
    methods = sorted({m for r in done for m in r.heuristic_losses})
    return header | {
        "done": len(done),
        "failed": len(failed),
        "failures": [{"sample_id": r.sample_id, "error": r.error} for r in failed],
        "mean_loss": _mean(r.loss for r in done),
        "mean_full_loss": _mean(r.full_loss for r in done),
        "mean_heuristic_loss": {m: _mean(r.heuristic_losses.get(m) for r in done) for m in methods},
    }


def generation_means(bind: Bind, run_id: int) -> list[tuple]:
    """Per generation of a run's done labels: ``(gen, mean min, mean avg, mean max, labels)``."""
    stmt = (
        select(
            Generation.gen,
            func.avg(Generation.min),
            func.avg(Generation.avg),
            func.avg(Generation.max),
            func.count(),
        )
        .join(Label, Generation.label_id == Label.id)
        .where(Label.run_id == run_id, Label.status == "done")
        .group_by(Generation.gen)
        .order_by(Generation.gen)
    )
    with _tx(bind) as session:
        return [tuple(r) for r in session.execute(stmt).all()]


def count_labels(bind: Bind, run_id: int, status: str = "done") -> int:
    """How many labels of a run have ``status`` (progress of a running flow)."""
    stmt = (
        select(func.count())
        .select_from(Label)
        .where(Label.run_id == run_id, Label.status == status)
    )
    with _tx(bind) as session:
        return int(session.scalar(stmt))
