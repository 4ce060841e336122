"""Claims: workers of one label run never search the same sample twice; lapsed leases are taken over.

Unit level on SQLite and the real PostgreSQL (racing processes included); the whole
`evocomp label` path with concurrent and killed processes is in tests/test_work_sharing.py.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from evocomp.store import (
    claim,
    dispose_engines,
    get_engine,
    get_or_create_run,
    release_claims,
    renew_claims,
    searches,
    write_label,
)
from tests.test_store import record, seeded, sid, store_url  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _fresh_engines():
    yield
    dispose_engines()


def test_a_claim_is_exclusive_until_it_lapses_or_the_sample_is_done(store_url):  # noqa: F811
    engine, _ = seeded(store_url, n=3)
    run = get_or_create_run(engine, "m", {"p": 1}, "v")
    assert claim(engine, run, sid(0), "a", 60) == "claimed"
    assert claim(engine, run, sid(0), "b", 60) == "held"  # a's lease runs
    assert claim(engine, run, sid(0), "a", 60) == "claimed"  # a retries its own sample
    assert renew_claims(engine, "a", [(run, sid(0))], 60) == 1
    assert renew_claims(engine, "b", [(run, sid(0))], 60) == 0  # not b's to renew
    release_claims(engine, "a", [(run, sid(0))])
    time.sleep(0.01)
    assert claim(engine, run, sid(0), "b", 60) == "claimed"  # lapsed: b takes it over
    write_label(engine, run, sid(0), record(0))
    assert claim(engine, run, sid(0), "c", 60) == "done"  # never searched again in the run
    assert claim(engine, run, sid(1), "c", 0.05) == "claimed"
    time.sleep(0.1)
    assert claim(engine, run, sid(1), "a", 60) == "claimed"  # a killed worker's lease lapsed
    assert searches(engine, run) == {sid(0): 3, sid(1): 2}
    other = get_or_create_run(engine, "m", {"p": 2}, "v")
    assert claim(engine, other, sid(0), "c", 60) == "claimed"  # claims are per run


def _racer(url: str, run: int, worker: str, n: int, barrier, out) -> None:
    engine = get_engine(url)
    barrier.wait()
    out.put([i for i in range(n) if claim(engine, run, sid(i), worker, 60) == "claimed"])


def test_racing_processes_split_the_samples(store_url):  # noqa: F811
    """Four processes claim the same 40 samples at once: each sample goes to exactly one."""
    n, k = 40, 4
    engine, _ = seeded(store_url, n=n)
    run = get_or_create_run(engine, "m", {"p": 1}, "v")
    dispose_engines()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(store_url, run, f"w{j}", n, barrier, out))
        for j in range(k)
    ]
    for p in procs:
        p.start()
    won = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(i for w in won for i in w) == list(range(n))  # each exactly once
    assert set(searches(get_engine(store_url), run).values()) == {1}
