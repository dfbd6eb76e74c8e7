"""Workflow tables: definitions, versions, executions, steps, audit events.

Revision ID: workflows_0001
Revises: 0001_foundation
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "workflows_0001"
down_revision: str | Sequence[str] | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = ("workflows",)
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "workflow_definitions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _time("created_at", False),
        _time("updated_at", False),
    )
    op.create_table(
        "workflow_definition_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "definition_id",
            sa.String(40),
            sa.ForeignKey("workflow_definitions.id"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        _time("created_at", False),
        sa.UniqueConstraint("definition_id", "version"),
    )
    op.create_table(
        "workflow_executions",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("run_id", sa.String(100), nullable=True),
        sa.Column("definition_id", sa.String(40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("input_data", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _time("started_at"),
        _time("closed_at"),
        _time("updated_at", False),
    )
    op.create_index(
        "ix_workflow_executions_definition", "workflow_executions", ["definition_id"]
    )
    op.create_table(
        "workflow_steps",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("execution_id", sa.String(200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("depends_on", sa.JSON(), nullable=False),
        sa.Column("task_queue", sa.String(200), nullable=True),
        sa.Column("agent", sa.String(200), nullable=True),
        sa.Column("agent_type", sa.String(100), nullable=True),
        sa.Column("agent_id", sa.String(200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _time("started_at"),
        _time("finished_at"),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("execution_id", "name"),
    )
    op.create_table(
        "workflow_audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("definition_id", sa.String(40), nullable=True),
        sa.Column("execution_id", sa.String(200), nullable=False),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("event", sa.String(50), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _time("at", False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index(
        "ix_workflow_audit_events_definition",
        "workflow_audit_events",
        ["definition_id", "id"],
    )
    op.create_index(
        "ix_workflow_audit_events_execution", "workflow_audit_events", ["execution_id"]
    )


def downgrade() -> None:
    op.drop_table("workflow_audit_events")
    op.drop_table("workflow_steps")
    op.drop_table("workflow_executions")
    op.drop_table("workflow_definition_versions")
    op.drop_table("workflow_definitions")
