"""The database mirror of sandboxes, for `sandbox_list`.

It holds env var names only, never values; the truth is the session
workflow and the backend.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index
from sqlmodel import Field, SQLModel

from app.db.models import utc_now


class SandboxRecord(SQLModel, table=True):
    """One sandbox session as last recorded by its activities."""

    __tablename__ = "sandboxes"
    __table_args__ = (Index("ix_sandboxes_status", "status"),)

    id: str = Field(primary_key=True, max_length=100)
    name: str | None = Field(default=None, max_length=200)
    template: str = Field(max_length=50)
    status: str = Field(max_length=20)
    backend: str = Field(max_length=20)
    backend_id: str | None = Field(default=None, max_length=200)
    timeout: int
    recreated: int = 0
    env_var_names: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    sandbox_metadata: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("metadata", JSON)
    )
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
