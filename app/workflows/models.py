"""Tables of user-defined workflows: definitions and their versions,
executions, step states and the audit trail of transitions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db.models import utc_now


class WorkflowDefinitionRow(SQLModel, table=True):
    """A definition by name; `latest_version` points at its newest version."""

    __tablename__ = "workflow_definitions"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200, unique=True)
    description: str | None = Field(default=None, sa_column=Column(Text))
    priority: int = 5
    latest_version: int = 1
    status: str = Field(default="active", max_length=20)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class WorkflowVersionRow(SQLModel, table=True):
    """One immutable version of a definition, stored whole."""

    __tablename__ = "workflow_definition_versions"
    __table_args__ = (UniqueConstraint("definition_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    definition_id: str = Field(foreign_key="workflow_definitions.id", max_length=40)
    version: int
    spec: dict[str, Any] = Field(sa_column=Column(JSON))
    spec_hash: str = Field(max_length=64)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class WorkflowExecutionRow(SQLModel, table=True):
    """One run; `id` is the Temporal workflow id."""

    __tablename__ = "workflow_executions"
    __table_args__ = (Index("ix_workflow_executions_definition", "definition_id"),)

    id: str = Field(primary_key=True, max_length=200)
    run_id: str | None = Field(default=None, max_length=100)
    definition_id: str = Field(max_length=40)
    version: int
    name: str = Field(max_length=200)
    status: str = Field(max_length=20)
    priority: int = 5
    input_data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True))
    )
    closed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class WorkflowStepRow(SQLModel, table=True):
    """The state of one step in one execution."""

    __tablename__ = "workflow_steps"
    __table_args__ = (UniqueConstraint("execution_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    execution_id: str = Field(max_length=200)
    position: int = 0
    name: str = Field(max_length=100)
    type: str = Field(max_length=100)
    status: str = Field(max_length=20)
    depends_on: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    task_queue: str | None = Field(default=None, max_length=200)
    agent: str | None = Field(default=None, max_length=200)
    agent_type: str | None = Field(default=None, max_length=100)
    agent_id: str | None = Field(default=None, max_length=200)
    attempts: int = 0
    started_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True))
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True))
    )
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text))


class WorkflowAuditRow(SQLModel, table=True):
    """One transition of an execution or step, in the order it happened."""

    __tablename__ = "workflow_audit_events"
    __table_args__ = (
        Index("ix_workflow_audit_events_definition", "definition_id", "id"),
        Index("ix_workflow_audit_events_execution", "execution_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    definition_id: str | None = Field(default=None, max_length=40)
    execution_id: str = Field(max_length=200)
    step: str | None = Field(default=None, max_length=100)
    event: str = Field(max_length=50)
    status: str = Field(max_length=20)
    at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    attempt: int | None = None
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
