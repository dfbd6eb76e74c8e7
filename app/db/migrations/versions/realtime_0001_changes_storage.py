"""Realtime change log, subscriptions, execution output and storage metadata.

Revision ID: realtime_0001
Revises: 0001_foundation
Create Date: 2026-12-05

The capture triggers are not created here: `app.db.migrate.upgrade` enables
realtime on every table in `app.realtime.triggers.DEFAULT_TABLES` after all
branches have migrated, because other branches create some of those tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "realtime_0001"
down_revision: str | Sequence[str] | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = ("realtime",)
depends_on: str | Sequence[str] | None = None

_big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "realtime_changes",
        sa.Column("id", _big_id, primary_key=True, autoincrement=True),
        sa.Column("schema_name", sa.String(100), nullable=False),
        sa.Column("table_name", sa.String(100), nullable=False),
        sa.Column("event_type", sa.String(10), nullable=False),
        sa.Column("record", _json, nullable=True),
        sa.Column("old_record", _json, nullable=True),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_realtime_changes_table_id", "realtime_changes", ["table_name", "id"]
    )
    op.create_table(
        "realtime_tables",
        sa.Column("table_name", sa.String(100), primary_key=True),
        sa.Column("enabled_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "realtime_subscriptions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("table_name", sa.String(100), nullable=False),
        sa.Column("event_type", sa.String(10), nullable=False),
        sa.Column("filter", sa.Text(), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("buffer_timeout_ms", sa.Integer(), nullable=False),
        sa.Column("max_buffer_size", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("stream_kind", sa.String(20), nullable=True),
        sa.Column("stream_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "execution_output",
        sa.Column("id", _big_id, primary_key=True, autoincrement=True),
        sa.Column("stream_kind", sa.String(20), nullable=False),
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("stream", sa.String(20), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_execution_output_stream",
        "execution_output",
        ["stream_kind", "stream_id", "id"],
    )
    op.create_table(
        "storage_objects",
        sa.Column("bucket", sa.String(63), primary_key=True),
        sa.Column("path", sa.String(1024), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("storage_objects")
    op.drop_table("execution_output")
    op.drop_table("realtime_subscriptions")
    op.drop_table("realtime_tables")
    op.drop_table("realtime_changes")
