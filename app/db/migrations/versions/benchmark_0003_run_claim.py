"""Benchmark claims: the run that holds the one-run-at-a-time slot.

Revision ID: benchmark_0003_run_claim
Revises: benchmark_0002
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "benchmark_0003_run_claim"
down_revision: str | Sequence[str] | None = "benchmark_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "benchmark_claims",
        sa.Column("slot", sa.String(50), primary_key=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("benchmark_claims")
