"""Alembic environment: one metadata, batch mode on SQLite, and a lock that
lets one of several starting processes migrate at a time."""

from alembic import context
from sqlalchemy import Connection, text
from sqlmodel import SQLModel

import app.db.all_models  # noqa: F401  (fills the metadata)
from app.db.engine import get_engine

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,
    )
    with context.begin_transaction():
        # Several workers may start at once; one migrates, the rest wait, and
        # then find the version table at its heads.
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(7233001)"))
        elif is_sqlite and not getattr(
            connection.connection.dbapi_connection, "in_transaction", True
        ):
            # pysqlite begins a transaction only at its first write, so two
            # processes would both read an empty version table. The write
            # lock makes the others wait, up to the engine's busy timeout.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    with get_engine(config.get_main_option("sqlalchemy.url") or "").begin() as conn:
        _run(conn)
