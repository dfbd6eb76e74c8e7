"""Field types shared by the contracts."""

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator


def _as_utc(value: datetime) -> datetime:
    # SQLite drops the offset of a stored datetime and every writer here
    # stores UTC, so a naive value read back is UTC. Aware values from
    # PostgreSQL come in the session's zone; one zone keeps outputs comparable.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]
"""A datetime that is always timezone-aware UTC (serialized with `Z`)."""
