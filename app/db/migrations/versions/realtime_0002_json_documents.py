"""Realtime change log: documents as `json` in place of `jsonb` on PostgreSQL.

Revision ID: realtime_0002
Revises: realtime_0001
Create Date: 2026-12-05

The capture triggers write each row with `to_json`, and every stream read
sends the documents as text. `jsonb` made PostgreSQL parse each document
into its binary form on insert and print it again on every read; nothing
queries inside the documents. On SQLite the columns hold JSON text already.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "realtime_0002"
down_revision: str | Sequence[str] | None = "realtime_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("record", "old_record")


def _retype(kind: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in _COLUMNS:
        op.execute(
            f"ALTER TABLE realtime_changes ALTER COLUMN {column} "
            f"TYPE {kind} USING {column}::{kind}"
        )


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    _retype("jsonb")
