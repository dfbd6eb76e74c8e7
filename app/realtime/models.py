"""Tables of realtime: the change log, subscriptions, enabled tables and
execution output."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer
from sqlmodel import Field, SQLModel

from app.db.models import utc_now

# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Plain `json` on PostgreSQL too: see migration realtime_0002.
JsonDocument = JSON()


class RealtimeChange(SQLModel, table=True):
    """One committed INSERT, UPDATE or DELETE, appended by a trigger in the
    transaction of the change; `id` orders changes in commit order."""

    __tablename__ = "realtime_changes"
    __table_args__ = (Index("ix_realtime_changes_table_id", "table_name", "id"),)

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    schema_name: str = Field(max_length=100)
    table_name: str = Field(max_length=100)
    event_type: str = Field(max_length=10)
    record: dict[str, Any] | None = Field(default=None, sa_column=Column(JsonDocument))
    old_record: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JsonDocument)
    )
    committed_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class RealtimeTable(SQLModel, table=True):
    """A table whose changes are captured into the change log."""

    __tablename__ = "realtime_tables"

    table_name: str = Field(primary_key=True, max_length=100)
    enabled_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class RealtimeSubscription(SQLModel, table=True):
    """A subscription with its durable cursor: the id of the last change it
    has been given."""

    __tablename__ = "realtime_subscriptions"

    id: str = Field(primary_key=True, max_length=40)
    table_name: str = Field(max_length=100)
    event_type: str = Field(max_length=10)
    filter: str = ""
    cursor: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    delivered: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    batch_size: int = 100
    buffer_timeout_ms: int = 1000
    max_buffer_size: int = 10000
    user_id: str = Field(default="local", max_length=200)
    # The API key that owns it; None for the CLI and local calls.
    key_id: str | None = Field(default=None, max_length=32)
    stream_kind: str | None = Field(default=None, max_length=20)
    stream_id: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class ExecutionOutput(SQLModel, table=True):
    """A chunk of output of a sandbox or a workflow execution."""

    __tablename__ = "execution_output"
    __table_args__ = (
        Index("ix_execution_output_stream", "stream_kind", "stream_id", "id"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    stream_kind: str = Field(max_length=20)
    stream_id: str = Field(max_length=200)
    stream: str = Field(default="stdout", max_length=20)
    text: str
    final: bool = False
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
