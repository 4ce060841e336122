"""The label store: SQLAlchemy models, engines, Alembic migrations and idempotent queries.

Typical use::

    from evocomp.store import get_engine, upgrade, get_or_create_run, write_label

    upgrade()                       # $EVOCOMP_DB_URL or sqlite:///./data/evocomp.db
    engine = get_engine()
    run_id = get_or_create_run(engine, model_id, params, code_version)
    write_label(engine, run_id, sample_id, record)
"""

from __future__ import annotations

from evocomp.store.claims import (
    claim,
    claim_holder,
    release_claims,
    renew_claims,
    searches,
)
from evocomp.store.engine import (
    DB_URL_ENV,
    default_db_url,
    dispose_engines,
    get_engine,
    mask_url,
    session_scope,
    upgrade,
)
from evocomp.store.export import budget_of, export_labels
from evocomp.store.flowruns import (
    beat_flow_run,
    finish_flow_run,
    register_flow_run,
    running_flow_runs,
)
from evocomp.store.models import (
    Base,
    Claim,
    Dataset,
    Elite,
    FlowRun,
    Generation,
    Label,
    LabelRun,
    SampleRow,
)
from evocomp.store.queries import (
    count_labels,
    ensure_dataset,
    finish_run,
    generation_means,
    get_or_create_run,
    labelled_sample_ids,
    params_hash,
    run_key,
    run_summary,
    upsert_samples,
    write_failure,
    write_label,
)
from evocomp.store.records import LabelRecord

__all__ = [
    "FlowRun",
    "beat_flow_run",
    "finish_flow_run",
    "register_flow_run",
    "running_flow_runs",
    "Claim",
    "claim",
    "claim_holder",
    "release_claims",
    "renew_claims",
    "searches",
    "count_labels",
    "DB_URL_ENV",
    "Base",
    "Dataset",
    "Elite",
    "Generation",
    "Label",
    "LabelRecord",
    "LabelRun",
    "SampleRow",
    "budget_of",
    "default_db_url",
    "dispose_engines",
    "ensure_dataset",
    "export_labels",
    "finish_run",
    "generation_means",
    "get_engine",
    "get_or_create_run",
    "labelled_sample_ids",
    "mask_url",
    "params_hash",
    "run_key",
    "run_summary",
    "session_scope",
    "upgrade",
    "upsert_samples",
    "write_failure",
    "write_label",
]
