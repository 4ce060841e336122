"""A throwaway PostgreSQL server for tests, started once per pytest session.

Use from any test file (or import both names into ``tests/conftest.py`` once)::

    from tests.pg import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)

    @pytest.mark.postgres
    def test_something(postgres_url: str) -> None:  # a fresh, empty database per test
        ...

The server runs the machine's PostgreSQL binaries (``/usr/lib/postgresql/*/bin``, or
``$EVOCOMP_PG_BIN``) from a temporary directory, on 127.0.0.1 and a free port, with trust
auth and fsync off. ``initdb`` refuses root, so as root it runs as user ``postgres``. Tests
are skipped, with the reason, when no binaries are found.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

PG_BIN_ENV = "EVOCOMP_PG_BIN"
START_ATTEMPTS = 3  # a free port can be taken between probing it and binding it


@dataclass(frozen=True)
class PostgresServer:
    """A running test server: where it listens and how to make databases on it."""

    host: str
    port: int
    user: str
    data_dir: Path

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL of database ``dbname`` on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        )

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing any connection a test left open."""
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def find_pg_bin() -> Path | None:
    """Directory holding ``initdb`` and ``pg_ctl``: $EVOCOMP_PG_BIN, the newest Debian one, PATH."""
    candidates = [os.environ.get(PG_BIN_ENV, "")]
    versions = [p for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p).parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(str(Path(initdb).parent) if initdb else "")
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    """Prefix ``cmd`` so it runs as user postgres when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", subprocess.list2cmdline(cmd)]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(_as_owner(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")


def _stop(bin_dir: Path, data_dir: Path) -> None:
    """Stop the server with ``pg_ctl stop``; kill the postmaster PID if that fails."""
    try:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"], "stop")
        return
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    pid_file = data_dir / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGQUIT)


@contextlib.contextmanager
def running_postgres(bin_dir: Path) -> Iterator[PostgresServer]:
    """Initialise a cluster in a temp dir, start it on a free port, and stop and delete it after."""
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    # Not pytest's tmp_path: its parents are 0700 root-owned, which user postgres cannot enter.
    base = Path(tempfile.mkdtemp(prefix="evocomp-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data_dir = base / "data"
    started = False
    try:
        _run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            "initdb",
        )  # fmt: skip
        for attempt in range(START_ATTEMPTS):
            port = _free_port()
            opts = (
                f"-h 127.0.0.1 -p {port} -k {base} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            cmd = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(base / "log"),
                   "-o", opts, "-w", "-t", "60", "start"]  # fmt: skip
            try:
                _run(cmd, "pg_ctl start")
                started = True
                break
            except RuntimeError:
                if attempt == START_ATTEMPTS - 1:
                    log = base / "log"
                    raise RuntimeError(
                        f"PostgreSQL did not start: {log.read_text() if log.exists() else ''}"
                    ) from None
                time.sleep(0.5)
        yield PostgresServer(host="127.0.0.1", port=port, user="postgres", data_dir=data_dir)
    finally:
        if started:
            _stop(bin_dir, data_dir)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test session (skips if PostgreSQL is not installed)."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip(
            f"PostgreSQL binaries not found (looked in ${PG_BIN_ENV}, /usr/lib/postgresql/*/bin "
            "and PATH); install postgresql to run the PostgreSQL tests"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb as")
    with running_postgres(bin_dir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a fresh, empty database on the session's server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
