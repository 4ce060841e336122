"""Tests of the label store on SQLite and on a real PostgreSQL: idempotence, concurrency, export."""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, insert, inspect, select, text

from evocomp.errors import StoreError
from evocomp.store import (
    Base,
    Elite,
    Generation,
    Label,
    LabelRecord,
    LabelRun,
    SampleRow,
    budget_of,
    default_db_url,
    dispose_engines,
    ensure_dataset,
    export_labels,
    finish_run,
    get_engine,
    get_or_create_run,
    labelled_sample_ids,
    params_hash,
    run_summary,
    session_scope,
    upgrade,
    upsert_samples,
    write_failure,
    write_label,
)
from evocomp.store import export as export_module

PARAMS = {"mode": "budget", "population": 48, "generations": 10, "seed": 0}


def sid(i: int) -> str:
    """A content-hash-shaped sample id."""
    return hashlib.sha256(f"sample-{i}".encode()).hexdigest()


def sample_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "id": sid(i),
            "split": ("train", "val", "test")[i % 3],
            "qtype": "color" if i % 2 else None,
            "question": f"What colour is object {i}?",
            "answer": "red",
            "image": f"images/{i}.png",
            "meta": {"i": i} if i % 2 else None,
        }
        for i in range(start, start + n)
    ]


def record(seed: int = 0, n_tokens: int = 16, gens: int = 3, elite: int = 2) -> LabelRecord:
    kept = sorted({(seed + 3 * j) % n_tokens for j in range(4)})
    return LabelRecord(
        kept=kept,
        k=len(kept),
        n_tokens=n_tokens,
        soft=[1.0 if t in kept else 0.25 for t in range(n_tokens)],
        groups=[t // 4 for t in range(n_tokens)],
        loss=0.5 + seed,
        full_loss=0.25,
        heuristic_losses={"fastv": 1.5 + seed, "random": 2.0, "divprune": float("nan")},
        margin=1.0,
        agreement=0.75,
        n_groups=4,
        converged_gen=gens - 1,
        n_forwards=gens + 1,
        seconds=0.125,
        logbook=[
            {"gen": g, "nevals": 8, "min": 1.0 - g / 10, "avg": 2.0, "max": 3.0, "std": 0.5}
            for g in range(gens)
        ],
        elite=[(kept, 0.5 + seed + r / 10) for r in range(elite)],
        heuristic_kept={"fastv": [3, 0, 1, 2], "random": [15, 4, 8, 12]},
        group_words=["sky", "red", "circle", "grass"],
    )


def counts(engine: Engine) -> tuple[int, int, int]:
    with session_scope(engine) as s:
        return tuple(
            s.scalar(select(func.count()).select_from(m)) for m in (Label, Generation, Elite)
        )


@pytest.fixture(autouse=True)
def _fresh_engines():
    yield
    dispose_engines()  # close pooled connections before a test database is dropped


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty store on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nested' / 'evocomp.db'}"  # parent dir created on connect
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


def seeded(url: str, n: int = 6) -> tuple[Engine, int]:
    engine = get_engine(url)
    ds = ensure_dataset(engine, "synthetic", "builtin")
    upsert_samples(engine, ds, sample_rows(n))
    return engine, ds


def test_round_trip(store_url: str) -> None:
    engine, ds = seeded(store_url)
    assert ensure_dataset(engine, "synthetic", "elsewhere") == ds
    upsert_samples(engine, ds, [sample_rows(1)[0] | {"split": "val"}])  # update, not duplicate
    run = get_or_create_run(engine, "tiny-llava", PARAMS, "v1", note="first")
    assert get_or_create_run(engine, "tiny-llava", dict(reversed(PARAMS.items())), "v2") == run
    other = get_or_create_run(engine, "tiny-llava", PARAMS | {"seed": 1}, "v1")
    assert other != run

    write_label(engine, run, sid(0), record(0))
    write_failure(engine, run, sid(1), "CUDA out of memory")
    write_failure(engine, run, sid(0), "must not overwrite a done label")
    finish_run(engine, run, "done")

    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(SampleRow)) == 6
        assert s.get(SampleRow, sid(0)).split == "val"
        assert s.get(SampleRow, sid(0)).meta is None and s.get(SampleRow, sid(1)).meta == {"i": 1}
        label = s.scalars(select(Label).where(Label.sample_id == sid(0))).one()
        expected = record(0)
        assert (label.status, label.error, label.kept, label.k) == ("done", None, expected.kept, 4)
        assert label.soft == expected.soft and label.groups == expected.groups
        assert label.heuristic_kept == {"fastv": [0, 1, 2, 3], "random": [4, 8, 12, 15]}
        assert label.group_words == expected.group_words
        # NaN is stored as NULL: PostgreSQL's JSON rejects it and SQLite would drop it anyway.
        assert label.heuristic_losses == {"fastv": 1.5, "random": 2.0, "divprune": None}
        gens = s.scalars(select(Generation).where(Generation.label_id == label.id)).all()
        assert sorted((g.gen, g.min) for g in gens) == [(0, 1.0), (1, 0.9), (2, 0.8)]
        elites = s.scalars(select(Elite).where(Elite.label_id == label.id)).all()
        assert sorted((e.rank, e.kept) for e in elites) == [(0, expected.kept), (1, expected.kept)]
        run_row = s.get(LabelRun, run)
        assert run_row.status == "done" and run_row.finished_at is not None
        assert run_row.code_version == "v1" and run_row.params == PARAMS
        assert run_row.params_hash == params_hash(PARAMS)

    assert labelled_sample_ids(engine, "tiny-llava", params_hash(PARAMS)) == {sid(0)}
    assert labelled_sample_ids(engine, "tiny-llava", params_hash(PARAMS), None) == {sid(0), sid(1)}
    assert labelled_sample_ids(engine, "other-model", params_hash(PARAMS)) == set()

    summary = run_summary(engine, run)
    assert (summary["done"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [{"sample_id": sid(1), "error": "CUDA out of memory"}]
    assert summary["mean_loss"] == 0.5 and summary["mean_full_loss"] == 0.25
    assert summary["mean_heuristic_loss"] == {"divprune": None, "fastv": 1.5, "random": 2.0}

    # A retried failure becomes done; reopening the run marks it running again.
    write_label(engine, run, sid(1), record(1))
    assert get_or_create_run(engine, "tiny-llava", PARAMS, "v1") == run
    summary = run_summary(engine, run)
    assert (summary["done"], summary["failed"], summary["status"]) == (2, 0, "running")


def test_rewriting_a_label_never_duplicates(store_url: str) -> None:
    engine, _ = seeded(store_url, n=2)
    run = get_or_create_run(engine, "tiny-llava", PARAMS, "v1")
    for _ in range(3):
        write_label(engine, run, sid(0), record(0, gens=5, elite=4))
    assert counts(engine) == (1, 5, 4)
    write_label(engine, run, sid(0), record(2, gens=2, elite=1))  # a shorter history replaces
    assert counts(engine) == (1, 2, 1)
    write_label(engine, run, sid(1), record(1))
    assert counts(engine) == (2, 5, 3)
    with session_scope(engine) as s:
        assert s.scalars(select(Label.loss).where(Label.sample_id == sid(0))).one() == 2.5


@pytest.mark.parametrize(
    "bad",
    [
        {"kept": [1, 99], "k": 2},  # index out of range
        {"kept": [1, 1], "k": 2},  # duplicate index
        {"kept": [1, 2], "k": 3},  # k disagrees with kept
        {"soft": [0.5] * 3},  # wrong length
        {"heuristic_kept": {"fastv": [0, 16]}},  # a heuristic's index out of range
        {"group_words": ["sky"]},  # one word for four groups
    ],
)
def test_invalid_record_is_rejected_with_the_sample_id(tmp_path: Path, bad: dict) -> None:
    url = f"sqlite:///{tmp_path / 'evocomp.db'}"
    upgrade(url)
    engine, _ = seeded(url, n=1)
    run = get_or_create_run(engine, "m", PARAMS, "v1")
    fields = {f: getattr(record(0), f) for f in LabelRecord.__dataclass_fields__} | bad
    with pytest.raises(ValueError, match=sid(0)):
        write_label(engine, run, sid(0), LabelRecord(**fields))
    assert counts(engine) == (0, 0, 0)


def _label_shard(url: str, run_id: int, ids: list[str], barrier, results) -> None:
    """Worker of the two-process test: label ``ids`` one transaction each, report errors."""
    engine = get_engine(url)
    barrier.wait()
    errors, start = [], time.monotonic()
    for i, sample_id in enumerate(ids):
        try:
            write_label(engine, run_id, sample_id, record(i % 5, gens=10, elite=4))
        except Exception as e:  # counted, not raised: the test asserts there are none
            errors.append(f"{sample_id}: {e!r}")
    results.put((os.getpid(), errors, start, time.monotonic()))


def test_two_processes_label_disjoint_shards_into_one_sqlite_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evocomp.db'}"
    upgrade(url)
    engine, _ = seeded(url, n=400)
    run = get_or_create_run(engine, "tiny-llava", PARAMS, "v1")
    dispose_engines()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    shards = [[sid(i) for i in range(0, 200)], [sid(i) for i in range(200, 400)]]
    procs = [
        ctx.Process(target=_label_shard, args=(url, run, ids, barrier, results)) for ids in shards
    ]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [e for _, errors, _, _ in reports for e in errors] == []
    (_, _, s0, e0), (_, _, s1, e1) = reports
    assert max(s0, s1) < min(e0, e1), "the two writers never overlapped"
    engine = get_engine(url)
    assert labelled_sample_ids(engine, "tiny-llava", params_hash(PARAMS)) == {
        sid(i) for i in range(400)
    }
    assert counts(engine) == (400, 4000, 1600)


def test_export_latest_run_wins_and_is_deterministic(store_url: str, tmp_path: Path) -> None:
    engine, _ = seeded(store_url, n=3)
    shallow = get_or_create_run(engine, "tiny-llava", PARAMS, "v1")
    for i in range(3):
        write_label(engine, shallow, sid(i), record(i))
    write_failure(engine, shallow, sid(2), "ignored: sample 2 is done")
    deep = get_or_create_run(engine, "tiny-llava", PARAMS | {"generations": 40}, "v1")
    write_label(engine, deep, sid(0), record(7))
    write_failure(engine, deep, sid(1), "failed labels are never exported")
    other = get_or_create_run(engine, "big-llava", PARAMS, "v1")
    write_label(engine, other, sid(1), record(9))

    out = tmp_path / "labels" / "labels.parquet"
    assert export_labels(engine, out, model_id="tiny-llava") == 3
    df = pd.read_parquet(out)
    assert list(df["sample_id"]) == sorted(sid(i) for i in range(3))
    by_id = df.set_index("sample_id")
    assert by_id.loc[sid(0), "run_id"] == deep and by_id.loc[sid(0), "loss"] == 7.5
    assert by_id.loc[sid(1), "run_id"] == shallow and by_id.loc[sid(2), "run_id"] == shallow
    assert list(by_id.loc[sid(0), "kept"]) == record(7).kept
    assert by_id.loc[sid(0), "heuristic_losses"] == (
        '{"divprune": null, "fastv": 8.5, "random": 2.0}'
    )
    assert list(df.columns) == [
        "sample_id", "split", "qtype", "question", "answer", "image", "run_id", "model_id",
        "params_hash", "n_tokens", "k", "kept", "soft", "groups", "loss", "full_loss",
        "heuristic_losses", "margin", "agreement", "n_groups",
    ]  # fmt: skip

    # Unfiltered, the most recent run wins across models; run_ids restricts the candidates.
    assert export_labels(engine, tmp_path / "all.parquet") == 3
    every_model = pd.read_parquet(tmp_path / "all.parquet").set_index("sample_id")
    assert every_model.loc[sid(1), "model_id"] == "big-llava"
    assert export_labels(engine, tmp_path / "shallow.parquet", run_ids=[shallow]) == 3
    assert set(pd.read_parquet(tmp_path / "shallow.parquet")["run_id"]) == {shallow}
    assert export_labels(engine, tmp_path / "none.parquet", run_ids=[]) == 0
    assert len(pd.read_parquet(tmp_path / "none.parquet")) == 0

    # Same store, same bytes -- even after idempotent re-writes of a label.
    first = out.read_bytes()
    write_label(engine, deep, sid(0), record(7))
    assert export_labels(engine, out, model_id="tiny-llava") == 3
    assert out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.parquet"]


def test_export_failure_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'evocomp.db'}"
    upgrade(url)
    engine, _ = seeded(url, n=2)
    run = get_or_create_run(engine, "m", PARAMS, "v1")
    write_label(engine, run, sid(0), record(0))
    out = tmp_path / "labels" / "labels.parquet"
    export_labels(engine, out)
    good = out.read_bytes()

    def crash(table, where, **kwargs) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export_module.pq, "write_table", crash)
    write_label(engine, run, sid(1), record(1))
    with pytest.raises(OSError, match="disk full"):
        export_labels(engine, out)
    assert out.read_bytes() == good  # the previous export is intact
    with pytest.raises(OSError, match="disk full"):
        export_labels(engine, tmp_path / "fresh" / "labels.parquet")
    assert list((tmp_path / "fresh").iterdir()) == []  # no partial file, no temp file left
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.parquet"]


def test_upgrade_twice_is_a_noop_and_matches_the_models(store_url: str) -> None:
    engine, _ = seeded(store_url, n=2)
    upgrade(store_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
            "0004"
        ]
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert conn.execute(select(func.count()).select_from(SampleRow)).scalar() == 2


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_0004_keeps_older_labels_with_null_details(backend, tmp_path, request) -> None:
    """A store labelled before revision 0004 upgrades with its labels intact (NULL new
    columns) and downgrades again."""
    from alembic import command
    from alembic.config import Config

    from evocomp.store.engine import ALEMBIC_INI, MIGRATIONS_DIR

    url = (
        f"sqlite:///{tmp_path / 'old.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    upgrade(url, "0003")
    engine, _ = seeded(url, n=1)
    run = get_or_create_run(engine, "m", PARAMS, "v1")
    with engine.begin() as conn:
        conn.execute(
            insert(Label.__table__).values(
                run_id=run, sample_id=sid(0), status="done", n_tokens=16, k=1, kept=[3],
                heuristic_losses={},
            )
        )  # fmt: skip
    upgrade(url)
    with session_scope(engine) as s:
        label = s.scalars(select(Label)).one()
        assert (label.kept, label.heuristic_kept, label.group_words) == ([3], None, None)
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("labels")}
        assert "heuristic_kept" not in columns and "group_words" not in columns
        assert conn.execute(select(Label.__table__.c.kept)).scalars().all() == [[3]]


def test_closed_postgres_port_raises_store_error_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once the socket is closed
    url = f"postgresql+psycopg://evo:s3cret@127.0.0.1:{port}/evocomp"
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        upgrade(url)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "***" in message and "s3cret" not in message
    assert "connect" in message.lower()


@pytest.mark.parametrize(
    "where",
    ["under_a_file", "proc", "a_directory", "read_only_dir"],
)
def test_unusable_sqlite_path_raises_store_error(tmp_path: Path, where: str) -> None:
    if where == "under_a_file":
        (tmp_path / "afile").write_text("not a directory")
        path = tmp_path / "afile" / "sub" / "evocomp.db"
    elif where == "proc":
        if not sys.platform.startswith("linux"):
            pytest.skip("/proc is Linux-only")
        path = Path("/proc/evocomp-no-such-dir/evocomp.db")
    elif where == "a_directory":  # the directory exists; opening the database fails
        path = tmp_path / "evocomp.db"
        path.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write to a read-only directory")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        path = ro / "evocomp.db"
    with pytest.raises(StoreError, match="evocomp.db") as info:
        get_engine(f"sqlite:///{path}")
    assert "sqlite" in str(info.value).lower()


def test_invalid_url_raises_store_error() -> None:
    with pytest.raises(StoreError, match="invalid store URL"):
        get_engine("not a url")


def test_default_db_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EVOCOMP_DB_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_db_url() == f"sqlite:///{tmp_path.resolve()}/data/evocomp.db"
    monkeypatch.setenv("EVOCOMP_DB_URL", "postgresql+psycopg://u@h/db")
    assert default_db_url() == "postgresql+psycopg://u@h/db"


def _migrate(url: str, barrier, out) -> None:
    barrier.wait()
    try:
        upgrade(url)
        out.put("ok")
    except StoreError as err:
        out.put(str(err))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_workers_starting_together_migrate_a_new_store_once(backend, tmp_path, request) -> None:
    """Several label processes started at once on an empty store: one migrates, none fails."""
    url = (
        f"sqlite:///{tmp_path / 'new.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_migrate, args=(url, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == ["ok"] * 4


def test_a_new_sqlite_file_is_first_opened_under_the_setup_lock(tmp_path: Path) -> None:
    """The first connection switches the file to WAL, which SQLite refuses at once (no busy
    wait) to a second process doing the same: it waits for the lock beside the file."""
    db = tmp_path / "new.db"
    with (tmp_path / ".new.db.migrate.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process setting the store up
        opening = threading.Thread(target=get_engine, args=(f"sqlite:///{db}",))
        opening.start()
        opening.join(0.5)
        assert opening.is_alive() and not db.exists()  # waiting, nothing created yet
    opening.join(60)
    assert not opening.is_alive() and db.exists()
    dispose_engines()


def test_a_store_whose_folder_refuses_the_lock_file_still_opens(tmp_path, monkeypatch) -> None:
    # e.g. a read-only share that the dashboard reads: no lock file, no setup to guard
    url = f"sqlite:///{tmp_path / 'evocomp.db'}"
    upgrade(url)
    dispose_engines()
    real_open = Path.open

    def refuse_lock(self, *args, **kwargs):
        if self.name.endswith(".migrate.lock"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_lock)
    assert counts(get_engine(url)) == (0, 0, 0)
    dispose_engines()


def test_export_keeps_one_budget(store_url: str, tmp_path: Path) -> None:
    # A label at 48 tokens is not a deeper search of one at 16: runs of another budget never
    # supersede a label, and an export that would mix budgets is refused.
    engine, _ = seeded(store_url, n=2)
    ninth = get_or_create_run(engine, "m", PARAMS | {"keep_ratio": 0.111}, "v1")
    third = get_or_create_run(engine, "m", PARAMS | {"keep_ratio": 0.333}, "v1")
    paper = get_or_create_run(engine, "m", PARAMS | {"mode": "paper", "keep_ratio": 0.333}, "v1")
    for i in range(2):
        write_label(engine, ninth, sid(i), record(i))
        write_label(engine, third, sid(i), record(10 + i))
    write_label(engine, paper, sid(0), record(20))
    out = tmp_path / "labels.parquet"
    assert export_labels(engine, out, budget=budget_of(PARAMS | {"keep_ratio": 0.111})) == 2
    assert set(pd.read_parquet(out)["run_id"]) == {ninth}  # the later 1/3 run does not win
    assert (
        export_labels(engine, out, budget=budget_of({"mode": "budget", "keep_ratio": 1 / 3})) == 2
    )
    assert set(pd.read_parquet(out)["run_id"]) == {third}
    assert export_labels(engine, out, budget=budget_of({"mode": "paper", "keep_ratio": 0.9})) == 1
    before = out.read_bytes()
    mixed = r"several budgets \(keep ratio 0.111, keep ratio 0.333, paper mode\)"
    with pytest.raises(ValueError, match=mixed):
        export_labels(engine, out)
    assert out.read_bytes() == before  # nothing written
