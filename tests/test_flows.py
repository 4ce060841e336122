"""The label flow end to end on a tiny LLaVA, with Prefect (one test server) and SQLite.

Covers: one label per sample, re-runs that skip before any model work, a grown
selection labelling only what is new, a corrupt image stored as failed without
stopping the flow (exit status 1), crash-resume after SIGKILL, and the retrain flow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from prefect.states import Failed
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

import flows.label as fl
from evocomp.config import LabelParams
from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset
from evocomp.labeling import steps, worker
from evocomp.labeling.run import plan_batches
from evocomp.labeling.selection import select_samples

SMALL = LabelParams(population=8, parents=4, generations=2, splits=("train", "test"), workers=2)


@pytest.fixture(scope="module")
def prefect_api():
    """One temporary Prefect server for this module (~5-17 s); yields its API URL."""
    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def prepare_copy(shapes_data: Path, tmp: Path) -> Path:
    """A private copy of the dataset (tests corrupt its images), prepared under ``tmp``."""
    raw = shutil.copytree(shapes_data, tmp / "raw")
    write_prepared(read_dataset(raw), tmp / "prepared", str(raw))
    return tmp / "prepared"


def labels(db_url: str) -> pd.DataFrame:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        df = pd.read_sql(
            "SELECT id, run_id, sample_id, status, error, seconds, updated_at FROM labels", conn
        )
    engine.dispose()
    return df


def done_count(db_url: str) -> int:
    """Done labels so far; 0 while the store is still being created."""
    try:
        return int((labels(db_url)["status"] == "done").sum())
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError):
        return 0


def run(tmp: Path, data: Path, model: Path, params: LabelParams = SMALL, **kw) -> dict:
    return fl.label_dataset(
        data=str(data), model=str(model), params=params, features_dir=str(tmp / "features"),
        db_url=f"sqlite:///{tmp / 'store.db'}", labels_out=str(tmp / "labels.parquet"),
        metrics_out=str(tmp / "labels.json"), **kw,
    )  # fmt: skip


def test_flow_labels_each_sample_once_and_reruns_skip_model_work(
    prefect_api, tiny_llava, shapes_data, tmp_path
):
    data = prepare_copy(shapes_data, tmp_path)
    params = SMALL.model_copy(update={"max_samples": 3})
    expected = {s.id for split in params.splits for s in load_prepared(data, split, 3)}

    first = run(tmp_path, data, tiny_llava, params)
    assert (first["selected"], first["done"], first["failed"], first["searched"]) == (6, 6, 0, 6)
    df = labels(f"sqlite:///{tmp_path / 'store.db'}")
    assert set(df["sample_id"]) == expected and len(df) == len(expected)
    assert (df["status"] == "done").all()
    export = pd.read_parquet(tmp_path / "labels.parquet")
    assert sorted(export["sample_id"]) == sorted(expected)
    metrics = json.loads((tmp_path / "labels.json").read_text())
    assert metrics["samples"] == 6 and metrics["failed"] == 0
    assert set(metrics["mean_heuristic_loss"]) == set(SMALL.heuristics)
    assert 0 < metrics["mean_kept_fraction"] < 1 and metrics["median_groups"] >= 1

    worker._models.clear()  # a re-run must not even load the model
    loads = worker.model_loads
    again = run(tmp_path, data, tiny_llava, params)
    assert (again["searched"], again["skipped"], again["done"]) == (0, 6, 6)
    assert worker.model_loads == loads
    pd.testing.assert_frame_equal(labels(f"sqlite:///{tmp_path / 'store.db'}"), df)

    grown = run(tmp_path, data, tiny_llava, params.model_copy(update={"max_samples": 4}))
    assert (grown["selected"], grown["skipped"], grown["searched"]) == (8, 6, 2)
    after = labels(f"sqlite:///{tmp_path / 'store.db'}").set_index("sample_id")
    assert len(after) == 8
    assert after.loc[df["sample_id"], "seconds"].tolist() == df["seconds"].tolist()


def test_corrupt_image_fails_one_sample_not_the_flow(
    prefect_api, tiny_llava, shapes_data, tmp_path
):
    from evocomp.cli import app

    data = prepare_copy(shapes_data, tmp_path)
    samples = load_prepared(data, "test")
    victim = samples[0]
    victim.image.write_bytes(b"this is not a png")  # corrupt after prepare
    hit = {s.id for s in samples if s.image == victim.image}
    (tmp_path / "params.yaml").write_text(
        "label: {population: 8, parents: 4, generations: 2, splits: [test]}\n"
    )
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["label", "--data", str(data), "--model", str(tiny_llava), "--params", str(tmp_path / "params.yaml"),
            "--features", str(tmp_path / "features"), "--db-url", db_url, "--workers", "2",
            "--out", str(tmp_path / "labels.parquet"), "--metrics", str(tmp_path / "labels.json")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert victim.id in result.output and "corrupt or unreadable image" in result.output
    df = labels(db_url).set_index("sample_id")
    assert len(df) == len(samples)  # every sample has its row, failed or done
    assert set(df.index[df["status"] == "failed"]) == hit
    assert df.loc[victim.id, "error"].startswith("DatasetError: corrupt or unreadable image")
    assert json.loads((tmp_path / "labels.json").read_text())["failed"] == len(hit)
    assert len(pd.read_parquet(tmp_path / "labels.parquet")) == len(samples) - len(hit)
    # Prefect's record says so too: the flow run is Failed, with the count in its message
    flow_run_id = re.search(r"Prefect flow run ([0-9a-f-]{36})", result.output).group(1)
    state = flow_run_state(flow_run_id)
    assert state.type.value == "FAILED", state
    assert f"{len(hit)} of {len(samples)} samples failed" in state.message
    assert store_flow_run_state(db_url, flow_run_id) == "failed"


def flow_run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def store_flow_run_state(db_url: str, flow_run_id: str) -> str:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        state = conn.execute(
            sa.text("SELECT state FROM flow_runs WHERE flow_run_id = :f"), {"f": flow_run_id}
        ).scalar()
    engine.dispose()
    return state


def test_nan_features_are_a_failed_label_with_its_reason(tiny_llava, shapes_data, tmp_path):
    import torch

    from evocomp import store
    from evocomp.features.cache import FeatureStore
    from evocomp.features.compute import ensure_features

    data = prepare_copy(shapes_data, tmp_path)
    sample = load_prepared(data, "test", 1)[0]
    ref = worker.model_ref(tiny_llava)
    feats = ensure_features(worker.worker_mllm(ref), [sample], tmp_path / "f").get(sample.id)
    bad = dataclasses.replace(feats, tokens=torch.full_like(feats.tokens, float("nan")))
    FeatureStore(tmp_path / "nan", ref.model_id).put({sample.id: bad})
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    run_id, _ = steps.open_run(db_url, str(data), [sample], ref.model_id, SMALL.search(), "test")
    out = steps.label_batch([sample], ref, SMALL.search(), str(tmp_path / "nan"), db_url, run_id)
    assert out == {sample.id: "failed"}
    summary = store.run_summary(store.get_engine(db_url), run_id)
    assert "NaN" in summary["failures"][0]["error"]


@pytest.mark.parametrize(
    "exc, retried",
    [(sa.exc.OperationalError("INSERT", {}, Exception("database is locked")), True),
     (OSError("stale NFS handle"), True), (ValueError("bad sample"), False),
     (KeyError("no features"), False)],
)  # fmt: skip
def test_only_io_errors_are_retried(exc, retried):
    assert fl._on_io_error(None, None, Failed(data=exc)) is retried


@pytest.mark.parametrize(
    "n, workers, batch_size, sizes",
    [
        (0, 2, None, []),
        (5, 2, None, [1] * 5),  # fewer samples than 4 tasks per worker: one each
        (200, 2, None, [25] * 8),  # four tasks per worker
        (960, 1, None, [128] * 7 + [64]),  # capped at MAX_BATCH
        (10, 2, 4, [4, 4, 2]),  # --batch-size wins
    ],
)
def test_plan_batches(n, workers, batch_size, sizes):
    samples = list(range(n))
    batches = plan_batches(samples, workers, batch_size)
    assert [len(b) for b in batches] == sizes
    assert [x for b in batches for x in b] == samples  # every sample once, in order


@pytest.mark.parametrize("n", [1, 3])
def test_shards_partition_the_samples(shapes_data, tmp_path, n):
    data = prepare_copy(shapes_data, tmp_path)
    everything = [s.id for s in select_samples(data, ["train", "val", "test"])]
    parts = [
        [s.id for s in select_samples(data, ["train", "val", "test"], shard=(i, n))]
        for i in range(n)
    ]
    assert sorted(sum(parts, [])) == sorted(everything)
    if n > 1:
        assert all(parts)  # 80 samples: no shard is empty
    with pytest.raises(ValueError, match="0 <= i < n"):
        select_samples(data, ["train"], shard=(n, n))


def test_crash_resume_loses_and_duplicates_nothing(prefect_api, tiny_llava, shapes_data, tmp_path):
    """SIGKILL `evocomp label` mid-run; the re-run finishes without re-searching stored labels."""
    data = prepare_copy(shapes_data, tmp_path)
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    total = len(load_prepared(data, "train", 24))
    (tmp_path / "params.yaml").write_text(
        "label: {splits: [train], max_samples: 24}\n"
    )  # the paper search settings
    cmd = [str(Path(sys.executable).parent / "evocomp"), "label", "--data", str(data), "--model", str(tiny_llava),
           "--features", str(tmp_path / "features"), "--db-url", db_url, "--workers", "1",
           "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "labels.parquet"),
           "--metrics", str(tmp_path / "labels.json")]  # fmt: skip
    env = os.environ | {"PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if done_count(db_url) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the label run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = labels(db_url).set_index("sample_id")
    assert 3 <= len(before) < total, "the kill should land mid-run"
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        (killed,) = conn.execute(sa.text("SELECT flow_run_id FROM flow_runs")).scalars().all()
    engine.dispose()
    assert flow_run_state(killed).type.value == "RUNNING"  # what Prefect believes after kill -9

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    searched, skipped = map(
        int, re.search(r"\((\d+) searched, (\d+) already", rerun.stdout).groups()
    )
    assert (searched, skipped) == (total - len(before), len(before))
    after = labels(db_url).set_index("sample_id")
    assert len(after) == total and after.index.is_unique and (after["status"] == "done").all()
    assert after["run_id"].nunique() == 1
    kept = after.loc[before.index]  # labelled before the kill: the very same rows, not re-searched
    assert kept[["id", "seconds", "updated_at"]].equals(before[["id", "seconds", "updated_at"]])
    assert len(pd.read_parquet(tmp_path / "labels.parquet")) == total
    # the re-run found the killed flow run and marked it Crashed, in Prefect and in the store
    state = flow_run_state(killed)
    assert state.type.value == "CRASHED" and "stopped without finishing" in state.message
    assert store_flow_run_state(db_url, killed) == "crashed"


def test_retrain_runs_dvc_repro(prefect_api, tmp_path):
    from flows.pipeline import retrain

    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    stage = ["stage", "add", "-q", "-n", "hello", "-o", "out.txt", "echo retrained > out.txt"]
    subprocess.run([*dvc, *stage], cwd=tmp_path, check=True)
    retrain(workspace=str(tmp_path))
    assert (tmp_path / "out.txt").read_text().strip() == "retrained"
    (tmp_path / "dvc.yaml").write_text("stages:\n  broken:\n    cmd: exit 3\n")
    with pytest.raises(RuntimeError, match="exit status"):
        retrain(workspace=str(tmp_path))


def test_run_streamed_logs_each_line(tmp_path):
    from flows.pipeline import run_streamed

    class Log:
        lines: list[str] = []

        def info(self, msg):
            self.lines.append(msg)

    cmd = [
        sys.executable,
        "-c",
        "import sys; print('one'); print('two', file=sys.stderr); sys.exit(3)",
    ]
    assert run_streamed(cmd, tmp_path, Log()) == 3
    assert Log.lines[1:] == ["one", "two"]


def test_flow_overhead_bench_runs(prefect_api, tiny_llava, tmp_path, bench_module):
    """Smoke run of bench/flow_overhead.py (figures are for bench/, not for tests)."""
    flow_overhead = bench_module("flow_overhead")

    out = tmp_path / "bench.json"
    argv = ["--samples", "4", "--repeats", "1", "--model", str(tiny_llava), "--out", str(out)]
    report = flow_overhead.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["samples"] == 4 and report["samples_small"] == 1
    assert set(report["seconds_all"]) == {f"{side}_{size}" for side in ("direct", "loop", "flow")
                                          for size in ("small", "large")}  # fmt: skip
    assert report["seconds_flow"] > 0 and report["command"].split()[1] == "bench/flow_overhead.py"


def test_task_size_and_runner_do_not_change_the_label_set(
    prefect_api, tiny_llava, shapes_data, tmp_path
):
    """The same samples labelled with 1 and 5 samples per task, and in-process: the same labels."""
    from evocomp.labelset import label_set_hash, load_label_set

    data = prepare_copy(shapes_data, tmp_path)
    params = SMALL.model_copy(update={"max_samples": 5})
    sets = {}
    for name, kw in {"batch_1": {"batch_size": 1}, "batch_5": {"batch_size": 5},
                     "in_process": {"in_process": True}}.items():  # fmt: skip
        out = tmp_path / name
        fl.run_label(data=str(data), model=str(tiny_llava), params=params, features_dir=str(tmp_path / "features"),
                     db_url=f"sqlite:///{out}.db", labels_out=f"{out}.parquet", metrics_out=f"{out}.json", **kw)  # fmt: skip
        sets[name] = load_label_set(f"{out}.parquet")
    first = sets["batch_1"]
    assert len(first) == sum(len(load_prepared(data, sp, 5)) for sp in params.splits) > 5
    for df in sets.values():
        assert label_set_hash(df) == label_set_hash(first)
        assert df["kept"].map(list).tolist() == first["kept"].map(list).tolist()  # not only counts
        assert df["loss"].tolist() == first["loss"].tolist()
