"""Alembic environment of the label store: migrates on a given connection or on the default URL.

``evocomp.store.upgrade(url)`` passes its connection in ``config.attributes["connection"]``;
``alembic -c evocomp/store/alembic.ini upgrade head`` uses ``sqlalchemy.url`` if set, else
``$EVOCOMP_DB_URL`` / the default SQLite store.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from evocomp.store.engine import default_db_url, get_engine
from evocomp.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL of the migrations instead of running them (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or default_db_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a fresh engine for the CLI."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Only the command line configures logging: a library call must not reset the app's loggers.
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = get_engine(config.get_main_option("sqlalchemy.url") or None)
    with engine.begin() as conn:
        _run(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
