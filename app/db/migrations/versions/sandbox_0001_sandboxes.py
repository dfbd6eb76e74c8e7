"""Sandbox mirror table.

Revision ID: sandbox_0001_sandboxes
Revises: 0001_foundation
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "sandbox_0001_sandboxes"
down_revision: str | Sequence[str] | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = ("sandbox",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("template", sa.String(50), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("backend_id", sa.String(200), nullable=True),
        sa.Column("timeout", sa.Integer(), nullable=False),
        sa.Column("recreated", sa.Integer(), nullable=False),
        sa.Column("env_var_names", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sandboxes_status", "sandboxes", ["status"])


def downgrade() -> None:
    op.drop_table("sandboxes")
