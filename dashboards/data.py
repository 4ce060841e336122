"""The dashboard's read-only queries of the label store, and where the dashboard reads from.

Every query is cached with ``st.cache_data`` (``TTL`` seconds) and keyed by plain values (the
store URL, ids), never by an engine or a session. List views read numeric columns only: the
per-label JSON (kept, soft, groups, logbook, elite) is read for one sample at a time, or for a
capped set of labels. Works on SQLite and PostgreSQL. Files and models: ``artifacts.py``.

Paths come from the environment, relative to the working directory (the repo root):
``EVOCOMP_DB_URL`` (default ``sqlite:///data/evocomp.db``), ``EVOCOMP_PARAMS`` (params.yaml),
``EVOCOMP_METRICS_DIR`` (metrics/), ``EVOCOMP_LABELS`` (data/labels/labels.parquet),
``EVOCOMP_FEATURES_DIR`` (data/features), ``EVOCOMP_COMPRESSOR`` (models/compressor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from sqlalchemy import case, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from evocomp.audit import facts
from evocomp.config import SearchParams
from evocomp.errors import StoreError
from evocomp.store import (
    Dataset,
    Elite,
    Generation,
    Label,
    LabelRun,
    SampleRow,
    default_db_url,
    get_engine,
    mask_url,
)

TTL = 30  # seconds: a running label flow shows up within half a minute
MAX_GROUP_LABELS = 2000  # labels whose JSON columns feed the keep-rate views (imbalance page)
TABLES = ("datasets", "samples", "label_runs", "labels", "generations", "elites")


@dataclass(frozen=True)
class Settings:
    db_url: str
    params: Path
    metrics: Path
    labels: Path
    features: Path
    compressor: Path


def settings() -> Settings:
    """Where the dashboard reads from (environment variables, else the pipeline's defaults)."""
    env = os.environ.get
    return Settings(
        db_url=default_db_url(),
        params=Path(env("EVOCOMP_PARAMS") or "params.yaml"),
        metrics=Path(env("EVOCOMP_METRICS_DIR") or "metrics"),
        labels=Path(env("EVOCOMP_LABELS") or "data/labels/labels.parquet"),
        features=Path(env("EVOCOMP_FEATURES_DIR") or "data/features"),
        compressor=Path(env("EVOCOMP_COMPRESSOR") or "models/compressor"),
    )


def mtime(path: Path) -> float:
    """Modification time (0 when absent): part of cache keys, so an edited file is re-read."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ---- the store ----------------------------------------------------------------------------


@st.cache_data(ttl=TTL, show_spinner=False)
def store_problem(url: str) -> str | None:
    """Why the store cannot be read (a message the user can act on), or None if it can.

    A missing SQLite file is reported, never created: the dashboard is read-only.
    """
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any parse failure is the user's URL
        return f"invalid store URL {url!r} (set EVOCOMP_DB_URL)"
    db = parsed.database
    if (
        parsed.get_backend_name() == "sqlite"
        and db not in (None, "", ":memory:")
        and not Path(db).is_file()
    ):
        return (
            f"no label store at {db}: run `evocomp label` (or `dvc repro`) to create one, "
            "or point EVOCOMP_DB_URL at yours"
        )
    try:
        names = set(inspect(get_engine(url)).get_table_names())
    except (StoreError, SQLAlchemyError) as err:
        return f"cannot read the store at {mask_url(url)}: {err}"
    missing = [t for t in TABLES if t not in names]
    if missing:
        return (
            f"the store at {mask_url(url)} has no {', '.join(missing)} table(s): run "
            "`evocomp db upgrade`"
        )
    return None


def _frame(url: str, stmt) -> pd.DataFrame:
    with get_engine(url).connect() as conn:
        result = conn.execute(stmt)
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


@st.cache_data(ttl=TTL, show_spinner=False)
def runs(url: str) -> pd.DataFrame:
    """Label runs with done / failed / pending counts (pending: samples of the run's datasets
    without a done label in it; failed ones are pending too, a re-run retries them)."""
    header = _frame(
        url,
        select(
            LabelRun.id.label("run_id"),
            LabelRun.model_id,
            LabelRun.params_hash,
            LabelRun.params,
            LabelRun.code_version,
            LabelRun.status,
            LabelRun.note,
            LabelRun.created_at,
            LabelRun.finished_at,
        ).order_by(LabelRun.id),
    )
    # what a reader needs to tell runs apart, from the run's params (``search.ga.run_spec``:
    # ``objective`` is absent at its default, ``warm_start`` holds the compressor's hash)
    spec = header.pop("params")
    objective = SearchParams.model_fields["objective"].default
    header.insert(3, "mode", spec.map(lambda p: p.get("mode")))
    header.insert(4, "objective", spec.map(lambda p: p.get("objective", objective)))
    header.insert(5, "warm_start", spec.map(lambda p: (p.get("warm_start") or "")[:12] or None))
    counts = _frame(
        url,
        select(
            Label.run_id,
            SampleRow.dataset_id,
            func.sum(case((Label.status == "done", 1), else_=0)).label("done"),
            func.sum(case((Label.status == "failed", 1), else_=0)).label("failed"),
        )
        .join(SampleRow, Label.sample_id == SampleRow.id)
        .group_by(Label.run_id, SampleRow.dataset_id),
    )
    sizes = _frame(
        url,
        select(SampleRow.dataset_id, func.count().label("samples")).group_by(SampleRow.dataset_id),
    )
    size = dict(zip(sizes["dataset_id"], sizes["samples"], strict=True))
    out = []
    for row in header.itertuples(index=False):
        mine = counts[counts["run_id"] == row.run_id]
        done, failed = int(mine["done"].sum()), int(mine["failed"].sum())
        datasets = list(mine["dataset_id"]) or (list(size) if len(size) == 1 else [])
        pending = sum(size.get(d, 0) for d in datasets) - done if datasets else None
        out.append(row._asdict() | {"done": done, "failed": failed, "pending": pending})
    cols = [*header.columns, "done", "failed", "pending"]
    return pd.DataFrame(out, columns=cols)


@st.cache_data(ttl=TTL, show_spinner=False)
def label_facts(url: str) -> pd.DataFrame:
    """One row per stored label (``evocomp.audit.facts.label_facts``)."""
    return facts.label_facts(get_engine(url))


@st.cache_data(ttl=TTL, show_spinner=False)
def sample(url: str, sample_id: str) -> dict[str, Any] | None:
    """One sample with its dataset's name and source, None if unknown."""
    stmt = (
        select(
            SampleRow.id,
            SampleRow.split,
            SampleRow.qtype,
            SampleRow.question,
            SampleRow.answer,
            SampleRow.image,
            SampleRow.meta,
            Dataset.name.label("dataset"),
            Dataset.source,
        )
        .join(Dataset, SampleRow.dataset_id == Dataset.id)
        .where(SampleRow.id == sample_id)
    )
    with get_engine(url).connect() as conn:
        row = conn.execute(stmt).first()
    return None if row is None else dict(row._mapping)


@st.cache_data(ttl=TTL, show_spinner=False)
def find_samples(url: str, prefix: str, limit: int = 50) -> list[str]:
    stmt = select(SampleRow.id).where(SampleRow.id.startswith(prefix)).order_by(SampleRow.id)
    with get_engine(url).connect() as conn:
        return list(conn.execute(stmt.limit(limit)).scalars())


@st.cache_data(ttl=TTL, show_spinner=False)
def sample_labels(url: str, sample_id: str) -> pd.DataFrame:
    """Every label of one sample, with its JSON columns, oldest run first."""
    stmt = (
        select(
            Label.id.label("label_id"),
            Label.run_id,
            LabelRun.model_id,
            LabelRun.params_hash,
            LabelRun.created_at.label("run_created"),
            Label.status,
            Label.error,
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
            Label.converged_gen,
            Label.n_forwards,
            Label.seconds,
        )
        .join(LabelRun, Label.run_id == LabelRun.id)
        .where(Label.sample_id == sample_id)
    )
    return _frame(url, stmt.order_by(LabelRun.created_at, Label.run_id))


@st.cache_data(ttl=TTL, show_spinner=False)
def token_cells(features: str | Path, model_id: str, sample_id: str) -> list[list[int]] | None:
    """Each visual token's (row, col) on its image's patch grid, from the feature cache; None
    when the sample's features are not there (the overlay then assumes a square grid)."""
    from evocomp.features.cache import FeatureStore

    try:
        store = FeatureStore(features, model_id)
        return store.get(sample_id).cells.tolist() if sample_id in store else None
    except (OSError, ValueError, KeyError):
        return None


@st.cache_data(ttl=TTL, show_spinner=False)
def generations(url: str, label_id: int) -> pd.DataFrame:
    stmt = select(
        Generation.gen,
        Generation.nevals,
        Generation.min,
        Generation.avg,
        Generation.max,
        Generation.std,
    ).where(Generation.label_id == label_id)
    return _frame(url, stmt.order_by(Generation.gen))


@st.cache_data(ttl=TTL, show_spinner=False)
def elites(url: str, label_id: int) -> pd.DataFrame:
    stmt = select(Elite.rank, Elite.loss, Elite.kept).where(Elite.label_id == label_id)
    return _frame(url, stmt.order_by(Elite.rank))


@st.cache_data(ttl=TTL, show_spinner=False)
def keep_details(url: str, label_ids: tuple[int, ...]) -> pd.DataFrame:
    """Per label (the caller caps how many): ``label_id, n_tokens, kept, groups, heuristic_kept,
    group_words`` and its sample's ``meta``, the rows ``evocomp.audit.keep`` reads.

    ``heuristic_kept`` and ``group_words`` are None on labels written before store revision
    0004, and on every label of a store not migrated to it yet (the dashboard never migrates).
    """
    newer = ("heuristic_kept", "group_words")
    have = {c["name"] for c in inspect(get_engine(url)).get_columns("labels")}
    frames = []
    for start in range(0, len(label_ids), 500):
        stmt = (
            select(Label.id.label("label_id"), Label.n_tokens, Label.kept, Label.groups)
            .add_columns(SampleRow.meta, *(getattr(Label, c) for c in newer if c in have))
            .join(SampleRow, Label.sample_id == SampleRow.id)
            .where(Label.id.in_(label_ids[start : start + 500]))
        )
        frames.append(_frame(url, stmt))
    cols = ["label_id", "n_tokens", "kept", "groups", "meta"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    return df.assign(**{c: None for c in newer if c not in df})
