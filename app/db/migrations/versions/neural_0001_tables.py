"""Neural tables: jobs, epochs, models, clusters, nodes, sessions, round events.

Revision ID: neural_0001_tables
Revises: 0001_foundation
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "neural_0001_tables"
down_revision: str | Sequence[str] | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = ("neural",)
depends_on: str | Sequence[str] | None = None


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "neural_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("architecture", sa.String(40), nullable=False),
        sa.Column("tier", sa.String(20), nullable=False),
        sa.Column("dataset", sa.String(300), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("epochs_requested", sa.Integer(), nullable=False),
        sa.Column("epochs_completed", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("training_time", sa.Float(), nullable=True),
        sa.Column("jit", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _created(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "neural_epochs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("val_accuracy", sa.Float(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        _created(),
    )
    op.create_index("ix_neural_epochs_run_id", "neural_epochs", ["run_id"])
    op.create_table(
        "neural_models",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("session_id", sa.String(64), nullable=True),
        sa.Column("cluster_id", sa.String(64), nullable=True),
        sa.Column("node_id", sa.String(64), nullable=True),
        sa.Column("architecture", sa.String(40), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("dataset", sa.String(300), nullable=False),
        sa.Column("storage_path", sa.String(500), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        _created(),
    )
    op.create_index("ix_neural_models_cluster_id", "neural_models", ["cluster_id"])
    op.create_table(
        "neural_clusters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("topology", sa.String(20), nullable=False),
        sa.Column("architecture", sa.String(40), nullable=False),
        sa.Column("wasm_optimization", sa.Boolean(), nullable=False),
        sa.Column("daa_enabled", sa.Boolean(), nullable=False),
        sa.Column("consensus", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _created(),
        sa.Column("terminated_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "neural_nodes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("cluster_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(40), nullable=False),
        sa.Column("model", sa.String(20), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("autonomy", sa.Float(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("task_queue", sa.String(200), nullable=False),
        sa.Column("parent_id", sa.String(64), nullable=True),
        sa.Column("connections", sa.JSON(), nullable=False),
        _created(),
    )
    op.create_index("ix_neural_nodes_cluster_id", "neural_nodes", ["cluster_id"])
    op.create_table(
        "neural_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("cluster_id", sa.String(64), nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("rounds_total", sa.Integer(), nullable=False),
        sa.Column("rounds_completed", sa.Integer(), nullable=False),
        sa.Column("rounds_rejected", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(64), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("samples_per_second", sa.Float(), nullable=True),
        sa.Column("training_time", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _created(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_neural_sessions_cluster_id", "neural_sessions", ["cluster_id"])
    op.create_table(
        "neural_round_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        _created(),
    )
    op.create_index(
        "ix_neural_round_events_session_id", "neural_round_events", ["session_id"]
    )


def downgrade() -> None:
    for table in (
        "neural_round_events",
        "neural_sessions",
        "neural_nodes",
        "neural_clusters",
        "neural_models",
        "neural_epochs",
        "neural_jobs",
    ):
        op.drop_table(table)
