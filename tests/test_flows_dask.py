"""Scale-out: the label flow on a Dask LocalCluster with PostgreSQL and a real Prefect server,
and `evocomp serve` registering its scheduled deployment on that server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from evocomp.config import LabelParams
from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset
from tests import servers

pytestmark = pytest.mark.postgres
EVOCOMP = str(Path(sys.executable).parent / "evocomp")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the API URL."""
    with servers.prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture
def use_server(prefect_server, monkeypatch):
    """Point this process (settings) and its children (environment) at the server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield prefect_server


def test_label_flow_on_dask_with_postgres(
    use_server, postgres_url, tiny_llava, shapes_data, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import flows.label as fl
    from evocomp.labeling import worker

    write_prepared(read_dataset(shapes_data), tmp_path / "prepared", str(shapes_data))
    samples = [
        s for split in ("train", "test") for s in load_prepared(tmp_path / "prepared", split, 4)
    ]
    loads = worker.model_loads
    params = LabelParams(population=8, parents=4, generations=2, splits=("train", "test"),
                         max_samples=4, workers=2)  # fmt: skip
    summary = fl.run_label(
        runner="dask", dask_workers=2, data=str(tmp_path / "prepared"), model=str(tiny_llava),
        params=params, features_dir=str(tmp_path / "features"), db_url=postgres_url,
        labels_out=str(tmp_path / "labels.parquet"), metrics_out=str(tmp_path / "labels.json"),
    )  # fmt: skip
    assert (summary["selected"], summary["done"], summary["failed"]) == (8, 8, 0)
    assert worker.model_loads == loads  # features and labels were computed in the Dask workers

    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT sample_id, status FROM labels")).all()
    engine.dispose()
    assert sorted(r.sample_id for r in rows) == sorted(s.id for s in samples)
    assert {r.status for r in rows} == {"done"}

    async def read_runs():
        async with get_client() as client:
            flow_run = await client.read_flow_run(summary["flow_run_id"])
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
            return flow_run, runs

    flow_run, task_runs = asyncio.run(read_runs())
    assert flow_run.state.type.value == "COMPLETED"
    labelled = [t for t in task_runs if t.name.startswith("label-")]
    assert 1 <= len(labelled) <= 8 and all(t.state.type.value == "COMPLETED" for t in labelled)


def test_serve_registers_the_cron_deployment(use_server, tmp_path):
    from prefect.client.orchestration import get_client

    proc = subprocess.Popen([EVOCOMP, "serve", "--cron", "0 2 * * *", "--name", "nightly-test"],
                            cwd=Path(__file__).resolve().parents[1], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip

    async def find():
        async with get_client() as client:
            try:
                return await client.read_deployment_by_name("retrain/nightly-test")
            except Exception:  # noqa: BLE001 - not registered yet
                return None

    try:
        deadline = time.monotonic() + 90
        deployment = None
        while deployment is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            deployment = asyncio.run(find())
        assert deployment is not None, (
            f"no deployment; serve said: {proc.stderr.read() if proc.poll() is not None else ''}"
        )
        crons = [s.schedule.cron for s in deployment.schedules]
        assert crons == ["0 2 * * *"] and all(s.active for s in deployment.schedules)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_label_on_a_running_dask_cluster_into_postgres(
    use_server, postgres_url, tiny_llava, shapes_data, tmp_path
):
    """`dask scheduler` and `dask worker` as separate processes, as a team runs them: the
    CLI labels through them into PostgreSQL, and Prefect records the flow."""
    write_prepared(read_dataset(shapes_data), tmp_path / "prepared", str(shapes_data))
    (tmp_path / "params.yaml").write_text(
        "label: {population: 8, parents: 4, generations: 2, splits: [test], max_samples: 6}\n"
    )
    expected = {s.id for s in load_prepared(tmp_path / "prepared", "test", 6)}
    with servers.dask_cluster(tmp_path, workers=2) as address:
        cmd = [EVOCOMP, "label", "--prefect", "--task-runner", "dask", "--dask-address", address,
               "--data", str(tmp_path / "prepared"), "--model", str(tiny_llava),
               "--params", str(tmp_path / "params.yaml"), "--db-url", postgres_url,
               "--features", str(tmp_path / "features"), "--out", str(tmp_path / "l.parquet"),
               "--metrics", str(tmp_path / "l.json")]  # fmt: skip
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        from distributed import Client

        with Client(address) as client:
            worker_pids = {str(pid) for pid in client.run(os.getpid).values()}
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Prefect flow run" in res.stdout
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        done = set(
            conn.execute(sa.text("SELECT sample_id FROM labels WHERE status = 'done'")).scalars()
        )
        workers = set(conn.execute(sa.text("SELECT worker FROM claims")).scalars())
    engine.dispose()
    assert done == expected
    assert {w.split(":")[1] for w in workers} <= worker_pids  # searched in the Dask workers


def test_a_running_cluster_without_a_prefect_server_is_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from evocomp.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(app, ["label", "--task-runner", "dask", "--dask-address",
                                   "tcp://127.0.0.1:1", "--data", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and "need one Prefect server" in res.output
