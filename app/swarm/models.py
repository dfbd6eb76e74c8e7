"""Database mirror of swarms: fast listing and a change stream of events.

The swarm workflow is the truth; these rows are written by its activities.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index
from sqlmodel import Field, SQLModel


class SwarmRow(SQLModel, table=True):
    __tablename__ = "swarms"
    __table_args__ = (Index("ix_swarms_status_created", "status", "created_at"),)

    swarm_id: str = Field(primary_key=True, max_length=64)
    workflow_id: str = Field(max_length=200)
    topology: str = Field(max_length=20)
    strategy: str = Field(max_length=20)
    max_agents: int
    status: str = Field(max_length=20)
    agent_count: int = 0
    task_count: int = 0
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    destroyed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class AgentRow(SQLModel, table=True):
    __tablename__ = "agents"
    __table_args__ = (Index("ix_agents_swarm_id", "swarm_id"),)

    agent_id: str = Field(primary_key=True, max_length=64)
    swarm_id: str = Field(max_length=64)
    type: str = Field(max_length=20)
    name: str = Field(max_length=200)
    capabilities: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    status: str = Field(max_length=20)
    sandbox_id: str | None = Field(default=None, max_length=100)
    tasks_completed: int = 0
    tasks_failed: int = 0
    joined_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))


class SwarmEventRow(SQLModel, table=True):
    __tablename__ = "swarm_events"
    __table_args__ = (
        Index("ix_swarm_events_swarm_seq", "swarm_id", "seq"),
        Index("ix_swarm_events_created_at", "created_at"),
    )

    event_id: str = Field(primary_key=True, max_length=100)
    swarm_id: str = Field(max_length=64)
    seq: int
    kind: str = Field(max_length=30)
    agent_id: str | None = Field(default=None, max_length=64)
    task_id: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
