"""Metadata of stored objects."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime
from sqlmodel import Field, SQLModel

from app.db.models import utc_now


class StoredObject(SQLModel, table=True):
    """Size, sha256 and content type of one object, written with its bytes."""

    __tablename__ = "storage_objects"

    bucket: str = Field(primary_key=True, max_length=63)
    path: str = Field(primary_key=True, max_length=1024)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    content_type: str = Field(max_length=200)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
