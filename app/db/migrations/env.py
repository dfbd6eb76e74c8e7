"""Alembic environment: one metadata, batch mode on SQLite, a lock on PostgreSQL."""

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
        if connection.dialect.name == "postgresql":
            # Several workers may start at once; one migrates, the rest wait.
            connection.execute(text("SELECT pg_advisory_xact_lock(7233001)"))
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    with get_engine(config.get_main_option("sqlalchemy.url") or "").begin() as conn:
        _run(conn)
