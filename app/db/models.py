"""Tables of the foundation. Capabilities keep their tables in their own modules
and import them from `app.db.all_models` so Alembic sees one metadata."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index
from sqlmodel import Field, SQLModel


def utc_now() -> datetime:
    return datetime.now(UTC)


class AuditEvent(SQLModel, table=True):
    """One tool call: who called what, with which (masked) arguments, and how
    it ended."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_created_at", "created_at"),
        Index("ix_audit_log_tool", "tool"),
        Index("ix_audit_log_user_id", "user_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    user_id: str = Field(max_length=200)
    key_id: str | None = Field(default=None, max_length=100)
    tool: str = Field(max_length=100)
    arguments: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    outcome: str = Field(max_length=20)
    error: str | None = None
    duration_ms: float
    ids: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
