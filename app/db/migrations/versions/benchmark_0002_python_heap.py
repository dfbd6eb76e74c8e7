"""Benchmark samples: pymalloc's bytes in allocated blocks and its arenas.

Revision ID: benchmark_0002
Revises: benchmark_0001
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "benchmark_0002"
down_revision: str | Sequence[str] | None = "benchmark_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("benchmark_samples") as batch:
        batch.add_column(sa.Column("python_heap_used", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("python_arenas", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("benchmark_samples") as batch:
        batch.drop_column("python_arenas")
        batch.drop_column("python_heap_used")
