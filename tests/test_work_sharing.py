"""Several `evocomp label` processes on one run: each sample searched once, a killed one's work taken over.

Real processes (the CLI, in-process mode so no Prefect server is needed), overlapping
selections, SQLite and the PostgreSQL the tests start. Searches are counted by the store's
claims (one granted claim = one search started), not by label rows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset
from evocomp.store import dispose_engines, get_engine, searches

pytestmark = pytest.mark.slow
EVOCOMP = str(Path(sys.executable).parent / "evocomp")
PARAMS = "label: {population: 24, parents: 6, generations: 6, lease_seconds: %s}\n"


@pytest.fixture
def job(tiny_llava, shapes_data, tmp_path):
    write_prepared(read_dataset(shapes_data), tmp_path / "prepared", str(shapes_data))
    ids = sorted(s.id for s in load_prepared(tmp_path / "prepared"))
    return tmp_path, tiny_llava, ids


def start(tmp: Path, model: Path, db_url: str, ids: list[str], name: str, lease: float = 30):
    (tmp / f"{name}.ids").write_text("\n".join(ids) + "\n")
    (tmp / f"{name}.yaml").write_text(PARAMS % lease)
    cmd = [EVOCOMP, "label", "--in-process", "--data", str(tmp / "prepared"),
           "--model", str(model), "--features", str(tmp / "features"), "--db-url", db_url,
           "--ids", str(tmp / f"{name}.ids"), "--params", str(tmp / f"{name}.yaml"),
           "--out", str(tmp / f"{name}.parquet"), "--metrics", str(tmp / f"{name}.json")]  # fmt: skip
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(
        cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc, tmp: Path, name: str, timeout: float = 300) -> str:
    assert proc.wait(timeout=timeout) == 0, (tmp / f"{name}.log").read_text()[-3000:]
    return (tmp / f"{name}.log").read_text()


def store_state(db_url: str) -> tuple[dict[str, int], set[str]]:
    """(searches per sample, samples with a done label) of the store's one run."""
    engine = get_engine(db_url)
    with engine.connect() as conn:
        (run,) = conn.execute(sa.text("SELECT id FROM label_runs")).scalars().all()
        done = set(
            conn.execute(
                sa.text("SELECT sample_id FROM labels WHERE status = 'done' AND run_id = :r"),
                {"r": run},
            ).scalars()
        )
    counts = searches(engine, run)
    dispose_engines()
    return counts, done


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_overlapping_processes_search_each_sample_once(job, backend, request):
    tmp, model, ids = job
    db_url = (
        f"sqlite:///{tmp / 'store.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    third = len(ids) // 3
    selections = {"a": ids[: 2 * third], "b": ids[third:], "c": ids}  # overlapping, union = all
    procs = {name: start(tmp, model, db_url, sel, name) for name, sel in selections.items()}
    logs = {name: finish(p, tmp, name) for name, p in procs.items()}
    counts, done = store_state(db_url)
    assert done == set(ids)
    assert counts == dict.fromkeys(ids, 1), "a sample was searched by two processes"
    searched = [int(re.search(r"\((\d+) searched", log).group(1)) for log in logs.values()]
    assert sum(searched) == len(ids), logs  # the processes split the work between them


def test_a_killed_worker_s_samples_are_finished_by_the_others(job):
    tmp, model, ids = job
    db_url = f"sqlite:///{tmp / 'store.db'}"
    victim = start(tmp, model, db_url, ids, "victim", lease=2)
    other = start(tmp, model, db_url, ids, "other", lease=2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill the victim once both are labelling
        try:
            counts, _ = store_state(db_url)
        except (sa.exc.SQLAlchemyError, ValueError):
            counts = {}
        if len(counts) >= 6:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the victim finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    finish(other, tmp, "other")
    counts, done = store_state(db_url)
    assert done == set(ids)  # the survivor finished everything, the victim's claims included
    twice = [sid for sid, n in counts.items() if n > 1]
    assert len(twice) <= 1 and set(counts.values()) <= {1, 2}  # at most the one in flight
