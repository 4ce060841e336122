"""SQLAlchemy models of the label store: datasets, samples, label runs, labels and search history.

One label per (run, sample) is the store's central invariant
(``uq_labels_run_id_sample_id``); every write is an upsert on a unique key, so repeating or
resuming a run never duplicates a row.
Columns holding lists or dicts use ``JSON`` (``JSONB`` on PostgreSQL).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so Alembic migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# none_as_null: Python None is stored as SQL NULL, not as the JSON literal 'null'.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata and naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Mapped[datetime]:
    # Server clock, so rows written by several machines into one PostgreSQL order consistently.
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Dataset(Base):
    """A named collection of samples (a LLaVA JSON file, the synthetic benchmark, ...)."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    source: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = _created_at()


class SampleRow(Base):
    """One (image, question, answer) sample; ``id`` is its content hash."""

    __tablename__ = "samples"
    __table_args__ = (Index("ix_samples_dataset_id_split", "dataset_id", "split"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(16))
    qtype: Mapped[str | None] = mapped_column(String(64))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    image: Mapped[str] = mapped_column(String(1024))  # path relative to the dataset root
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = _created_at()


class LabelRun(Base):
    """One labelling configuration: a model and a search-params hash (``key`` = their sha256)."""

    __tablename__ = "label_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    params_hash: Mapped[str] = mapped_column(String(64))
    code_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # running | done | failed
    note: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Label(Base):
    """The search result of one sample in one run (or why it failed)."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("run_id", "sample_id"),
        Index("ix_labels_sample_id", "sample_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("label_runs.id", ondelete="CASCADE"))
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))  # done | failed
    error: Mapped[str | None] = mapped_column(Text)
    n_tokens: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    kept: Mapped[list[int]] = mapped_column(JSONType)  # sorted visual-token indices
    soft: Mapped[list[float] | None] = mapped_column(JSONType)  # (n_tokens,) elite keep rate
    groups: Mapped[list[int] | None] = mapped_column(JSONType)  # (n_tokens,) group id
    loss: Mapped[float | None] = mapped_column(Float)
    full_loss: Mapped[float | None] = mapped_column(Float)
    heuristic_losses: Mapped[dict[str, float]] = mapped_column(JSONType)
    margin: Mapped[float | None] = mapped_column(Float)
    agreement: Mapped[float | None] = mapped_column(Float)
    n_groups: Mapped[int | None] = mapped_column(Integer)
    converged_gen: Mapped[int | None] = mapped_column(Integer)
    n_forwards: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float)
    # NULL on labels written before migration 0004
    heuristic_kept: Mapped[dict[str, list[int]] | None] = mapped_column(JSONType)  # method -> kept
    group_words: Mapped[list[str] | None] = mapped_column(JSONType)  # (n_groups,) word per group
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


class Generation(Base):
    """Logbook statistics of one generation of a label's search."""

    __tablename__ = "generations"
    __table_args__ = (UniqueConstraint("label_id", "gen"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"))
    gen: Mapped[int] = mapped_column(Integer)
    nevals: Mapped[int] = mapped_column(Integer)
    # Nullable because a non-finite statistic (an all-failed generation) is stored as NULL.
    min: Mapped[float | None] = mapped_column(Float)
    avg: Mapped[float | None] = mapped_column(Float)
    max: Mapped[float | None] = mapped_column(Float)
    std: Mapped[float | None] = mapped_column(Float)


class Elite(Base):
    """One candidate of a label's final elite (rank 0 = lowest loss)."""

    __tablename__ = "elites"
    __table_args__ = (UniqueConstraint("label_id", "rank"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    kept: Mapped[list[int]] = mapped_column(JSONType)
    loss: Mapped[float | None] = mapped_column(Float)


class Claim(Base):
    """A worker's claim on searching one sample of a run, held until ``lease_until``.

    Workers that share a run (processes, Dask workers, machines on one PostgreSQL) claim each
    sample before searching it, so none searches what another holds or has finished; a
    killed worker's claims lapse with their lease. ``searches`` counts the claims granted
    (searches started) for the pair.
    """

    __tablename__ = "claims"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("label_runs.id", ondelete="CASCADE"), primary_key=True
    )
    sample_id: Mapped[str] = mapped_column(
        ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True
    )
    worker: Mapped[str] = mapped_column(String(255))
    # Epoch seconds on the claiming worker's clock: leases are tens of seconds, so clocks
    # a few seconds apart across machines only shorten or stretch a lapse a little.
    lease_until: Mapped[float] = mapped_column(Float)
    searches: Mapped[int] = mapped_column(Integer)


class FlowRun(Base):
    """A Prefect flow run that works on a label run: whose it is and whether it is alive.

    A ``kill -9`` leaves its Prefect flow run RUNNING; the next flow of the same label run
    finds it here (its process gone, or its heartbeat older than a minute) and marks it
    Crashed, in Prefect and here.
    """

    __tablename__ = "flow_runs"

    flow_run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("label_runs.id", ondelete="CASCADE"))
    worker: Mapped[str] = mapped_column(String(255))
    heartbeat: Mapped[float] = mapped_column(Float)  # epoch seconds, the flow process's clock
    state: Mapped[str] = mapped_column(String(16))  # running | completed | failed | crashed
    created_at: Mapped[datetime] = _created_at()
