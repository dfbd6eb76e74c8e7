"""Tables of the HTTP API: API keys, stored only as salted hashes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column, DateTime
from sqlmodel import Field, SQLModel

from app.db.models import utc_now


class ApiKey(SQLModel, table=True):
    """One API key. The secret itself is never stored: `secret_hash` is
    HMAC-SHA256 of the secret under the key's own random `salt`."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=200)
    salt: str = Field(max_length=64)
    secret_hash: str = Field(max_length=128)
    # Tool groups this key may call; None allows every group.
    groups: list[str] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    replaced_by: str | None = Field(default=None, max_length=32)
