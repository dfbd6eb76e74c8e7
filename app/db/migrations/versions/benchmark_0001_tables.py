"""Benchmark tables: runs, phases, operations, samples and test events.

Revision ID: benchmark_0001
Revises: 0001_foundation
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "benchmark_0001"
down_revision: str | Sequence[str] | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = ("benchmark",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "benchmark_runs",
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("schedule_id", sa.String(200), nullable=True, index=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
    )
    op.create_table(
        "benchmark_phases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(50), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("operations", sa.Integer(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_index("ix_benchmark_phases_run", "benchmark_phases", ["run_id", "cycle"])
    op.create_table(
        "benchmark_operations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(50), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_benchmark_operations_run", "benchmark_operations", ["run_id", "phase"]
    )
    op.create_table(
        "benchmark_samples",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("task_queue", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("identity", sa.String(300), nullable=False),
        sa.Column("rss", sa.BigInteger(), nullable=False),
        sa.Column("heap_used", sa.BigInteger(), nullable=True),
    )
    op.create_index(
        "ix_benchmark_samples_run", "benchmark_samples", ["run_id", "taken_at"]
    )
    op.create_table(
        "extended_duration_test_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(200), nullable=False, index=True),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("test_phase", sa.String(20), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "extended_duration_test_events",
        "benchmark_samples",
        "benchmark_operations",
        "benchmark_phases",
        "benchmark_runs",
    ):
        op.drop_table(table)
