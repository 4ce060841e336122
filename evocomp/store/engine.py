"""Engines, sessions and schema migrations for the label store.

SQLite by default (``data/evocomp.db`` under the working directory, WAL mode so several
processes can label at once); set ``EVOCOMP_DB_URL=postgresql+psycopg://user@host/db`` to
share one PostgreSQL store across a team or a Dask cluster.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from evocomp.errors import StoreError

DB_URL_ENV = "EVOCOMP_DB_URL"
PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
LOCK_KEY = 7_330_000_001  # PostgreSQL advisory lock taken while the schema is migrated
CONNECT_TIMEOUT_S = 5  # an unreachable server must fail fast, not hang a flow

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def default_db_url() -> str:
    """Return ``$EVOCOMP_DB_URL`` if set, else an absolute SQLite URL for ``./data/evocomp.db``."""
    url = os.environ.get(DB_URL_ENV, "").strip()
    if url:
        return url
    return f"sqlite:///{Path.cwd().resolve() / 'data' / 'evocomp.db'}"


def mask_url(url: str | URL) -> str:
    """Render a URL with its password replaced by ``***`` (safe for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _normalise(url: str | URL) -> URL:
    """Parse ``url``; plain ``postgresql://`` and ``postgres://`` use the installed psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError(
            f"invalid store URL {url!r}: expected e.g. sqlite:///path/to/evocomp.db or "
            "postgresql+psycopg://user@host:5432/db"
        ) from e
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_file(url: URL) -> Path | None:
    """Return the database file of a file-backed SQLite URL, None for in-memory ones."""
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(db).expanduser().resolve()


def _set_sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside one writer; busy_timeout makes a second writer wait
    # instead of failing; NORMAL sync is durable enough in WAL mode and much faster.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _build_engine(url: URL) -> Engine:
    masked = mask_url(url)
    if url.get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(
                    f"cannot create the directory {path.parent} for the SQLite store {masked}: "
                    f"{e.strerror or e}"
                ) from e
        engine = create_engine(url)
        event.listen(engine, "connect", _set_sqlite_pragmas)
    else:
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        try:
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except (ImportError, SQLAlchemyError) as e:
            raise StoreError(f"cannot use the store URL {masked}: {e}") from e
    try:
        # The first connection switches a new SQLite file to WAL, which needs an exclusive
        # lock that SQLite refuses at once (no busy wait) to a second process switching too.
        with _sqlite_file_lock(engine), engine.connect():
            pass
    except SQLAlchemyError as e:
        engine.dispose()
        raise StoreError(f"cannot connect to the store at {masked}: {_cause(e)}") from e
    return engine


def _cause(e: BaseException) -> str:
    """The driver's message of a database error, without SQLAlchemy's boilerplate."""
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def get_engine(url: str | None = None) -> Engine:
    """Return the process's engine for ``url`` (default :func:`default_db_url`), connecting once.

    Raises:
        StoreError: the URL is invalid or the database cannot be reached or created.
    """
    parsed = _normalise(url or default_db_url())
    key = parsed.render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _build_engine(parsed)
    return engine


def dispose_engines() -> None:
    """Close and forget every cached engine (tests, or before handing a process to a pool)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _forget_engines_in_child() -> None:
    # A forked child must not reuse the parent's pooled connections (SQLAlchemy pooling docs).
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_engines_in_child)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on any exception."""
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the store at ``url`` to ``revision`` with the packaged Alembic scripts (idempotent).

    Raises:
        StoreError: the store cannot be reached or a migration fails.
    """
    from alembic import command
    from alembic.config import Config

    engine = get_engine(url)
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with _sqlite_file_lock(engine), engine.begin() as connection:
            if engine.dialect.name == "postgresql":  # released when this transaction ends
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            _refuse_newer_schema(connection, config, engine)
            # env.py migrates on this connection: no URL round trip through the ini file
            # (where '%' in passwords breaks interpolation) and the SQLite pragmas apply.
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as e:
        raise StoreError(f"cannot migrate the store at {mask_url(engine.url)}: {_cause(e)}") from e


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Serialise a file-backed SQLite store's setup across the processes of one machine.

    Workers starting together on a new store must neither switch it to WAL at once nor create
    its tables twice: on SQLite a file lock beside the database, on PostgreSQL an advisory
    lock (:func:`upgrade`); other stores need none."""
    path = _sqlite_file(engine.url) if engine.dialect.name == "sqlite" else None
    if path is None:
        yield
        return
    try:
        fh = (path.parent / f".{path.name}.migrate.lock").open("w")
    except OSError:  # a read-only folder: nobody there can create or convert the store either
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _refuse_newer_schema(connection, config, engine: Engine) -> None:
    """A store migrated by a newer evocomp has a revision these scripts do not know."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    current = MigrationContext.configure(connection).get_current_revision()
    scripts = ScriptDirectory.from_config(config)
    known = {rev.revision for rev in scripts.walk_revisions()}
    if current is not None and current not in known:
        raise StoreError(
            f"the store at {mask_url(engine.url)} was created by a newer evocomp (schema "
            f"revision {current}; this one knows up to {scripts.get_current_head()}): "
            "upgrade evocomp"
        )
