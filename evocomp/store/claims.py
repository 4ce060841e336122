"""Work sharing: workers of one label run claim each sample before searching it.

    status = claim(engine, run_id, sample_id, worker, lease_s=30)   # claimed | done | held

A claim is a lease: the worker renews it while it searches (a heartbeat), and a killed
worker's claims lapse within one lease, after which any worker of the run may take the
sample over. A sample with a done label is never claimed again within its run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import literal, select, update
from sqlalchemy import tuple_ as sa_tuple

from evocomp.store.models import Claim, Label
from evocomp.store.queries import Bind, _insert, _tx


def claim(bind: Bind, run_id: int, sample_id: str, worker: str, lease_s: float) -> str:
    """Claim (run, sample) for ``worker`` for ``lease_s`` seconds: ``claimed``, ``done`` or ``held``.

    ``claimed``: the caller may search it (no claim, a lapsed one, or the caller's own);
    ``done``: some worker already stored its done label; ``held``: another worker's lease
    runs. One atomic ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` per sample: PostgreSQL
    locks the conflicting row, so of two racing workers exactly one gets it (what
    ``SELECT ... FOR UPDATE SKIP LOCKED`` would give a queue), and SQLite serialises writers.
    """
    now = time.time()
    done = (
        select(Label.id)
        .where(Label.run_id == run_id, Label.sample_id == sample_id, Label.status == "done")
        .exists()
    )
    with _tx(bind) as session:
        stmt = _insert(session, Claim)
        values = select(
            literal(run_id), literal(sample_id), literal(worker), literal(now + lease_s), literal(1)
        ).where(~done)
        cols = ["run_id", "sample_id", "worker", "lease_until", "searches"]
        table = Claim.__table__
        stmt = stmt.from_select(cols, values).on_conflict_do_update(
            index_elements=["run_id", "sample_id"],
            set_={
                "worker": worker,
                "lease_until": now + lease_s,
                "searches": table.c.searches + 1,
            },
            where=(table.c.lease_until < now) | (table.c.worker == worker),
        )
        if session.execute(stmt.returning(table.c.worker)).first() is not None:
            return "claimed"
        return "done" if session.scalar(select(done)) else "held"


def renew_claims(bind: Bind, worker: str, keys: Iterable[tuple[int, str]], lease_s: float) -> int:
    """Extend ``worker``'s leases on (run, sample) ``keys``; returns how many it still held."""
    keys = list(keys)
    if not keys:
        return 0
    with _tx(bind) as session:
        table = Claim.__table__
        result = session.execute(
            update(table)
            .where(table.c.worker == worker)
            .where(sa_tuple(table.c.run_id, table.c.sample_id).in_(keys))
            .values(lease_until=time.time() + lease_s)
        )
        return result.rowcount


def searches(bind: Bind, run_id: int) -> dict[str, int]:
    """Searches started per sample of a run (claims granted): 1 each when no work repeated."""
    stmt = select(Claim.sample_id, Claim.searches).where(Claim.run_id == run_id)
    with _tx(bind) as session:
        return {sid: int(n) for sid, n in session.execute(stmt).all()}


def release_claims(bind: Bind, worker: str, keys: Iterable[tuple[int, str]]) -> int:
    """End ``worker``'s leases on ``keys`` now (a failed sample may be retried at once)."""
    return renew_claims(bind, worker, keys, 0.0)


def claim_holder(bind: Bind, run_id: int, sample_id: str) -> str | None:
    """The worker that holds (or last held) the claim on (run, sample), if any."""
    stmt = select(Claim.worker).where(Claim.run_id == run_id, Claim.sample_id == sample_id)
    with _tx(bind) as session:
        return session.scalar(stmt)
