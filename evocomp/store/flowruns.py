"""The Prefect flow runs working on each label run, with a heartbeat (crash detection).

register_flow_run(engine, flow_run_id, run_id, worker)     # at the start of a flow
beat_flow_run(engine, flow_run_id)                          # every few seconds
finish_flow_run(engine, flow_run_id, "completed")           # completed | failed | crashed
"""

from __future__ import annotations

import time

from sqlalchemy import select, update

from evocomp.store.models import FlowRun
from evocomp.store.queries import Bind, _insert, _tx


def register_flow_run(bind: Bind, flow_run_id: str, run_id: int, worker: str) -> None:
    with _tx(bind) as session:
        stmt = _insert(session, FlowRun).values(
            flow_run_id=flow_run_id, run_id=run_id, worker=worker, heartbeat=time.time(),
            state="running",
        )  # fmt: skip
        session.execute(stmt.on_conflict_do_nothing(index_elements=["flow_run_id"]))


def beat_flow_run(bind: Bind, flow_run_id: str) -> None:
    with _tx(bind) as session:
        session.execute(
            update(FlowRun).where(FlowRun.flow_run_id == flow_run_id).values(heartbeat=time.time())
        )


def finish_flow_run(bind: Bind, flow_run_id: str, state: str) -> None:
    with _tx(bind) as session:
        session.execute(
            update(FlowRun).where(FlowRun.flow_run_id == flow_run_id).values(state=state)
        )


def running_flow_runs(bind: Bind, run_id: int) -> list[tuple[str, str, float]]:
    """``(flow run id, worker, heartbeat)`` of the flow runs of a label run still marked running."""
    stmt = select(FlowRun.flow_run_id, FlowRun.worker, FlowRun.heartbeat).where(
        FlowRun.run_id == run_id, FlowRun.state == "running"
    )
    with _tx(bind) as session:
        return [tuple(r) for r in session.execute(stmt).all()]
