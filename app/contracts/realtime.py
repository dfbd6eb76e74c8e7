"""Contracts of realtime: subscriptions, change events and the streaming
activity."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.contracts.types import UtcDateTime

EventType = Literal["INSERT", "UPDATE", "DELETE", "*"]


class SubscriptionInfo(BaseModel):
    """A subscription and its delivery state."""

    subscription_id: str
    table: str
    event: EventType
    filter: str
    cursor: int = Field(
        description="Id of the last change the subscriber confirmed: the stored "
        "cursor, where a stream without Last-Event-ID starts."
    )
    delivered: int = Field(
        description="Distinct events the stored cursor has passed: each event "
        "counts once, however often it was handed out."
    )
    batch_size: int
    buffer_timeout: int = Field(description="Milliseconds.")
    max_buffer_size: int
    stream_kind: str | None = None
    stream_id: str | None = None
    user_id: str = Field("local", description="The caller that created it.")
    key_id: str | None = Field(
        None,
        description="Id of the API key that created it, which alone may use it "
        "(a rotation hands it to the new key); null for the CLI and local calls.",
    )
    created_at: UtcDateTime
    updated_at: UtcDateTime
    head: int | None = Field(
        None, description="Id of the newest change in the log, any table."
    )
    lag: int | None = Field(
        None,
        description="Events after the cursor that match the subscription's event "
        "and filter, i.e. still to deliver. A filtered subscription counts them "
        "among the first 10,000 changes of its table after the cursor; "
        "`lag_exact` is false when more changes wait beyond those.",
    )
    lag_exact: bool | None = Field(
        None, description="False when `lag` is a lower bound (see `lag`)."
    )
    missed_chunks: int | None = Field(
        None,
        description="Execution streams, when subscribed: the run's earliest "
        "chunks whose changes were pruned from the change log before the "
        "subscription, so it does not deliver them.",
    )


class ConsumeChangesInput(BaseModel):
    """Consume a subscription from a workflow: up to `max_events` events,
    stopping early after `idle_ms` without a new change."""

    subscription_id: str
    # Collected events travel in heartbeat details, which Temporal limits in
    # size, so one activity collects at most 10,000.
    max_events: int = Field(1000, ge=1, le=10_000)
    idle_ms: int = Field(2000, ge=0, le=600_000)


class ConsumeChangesResult(BaseModel):
    subscription_id: str
    events: list[dict[str, Any]]
    cursor: int
    resumed_from: int = Field(
        description="Cursor the activity started from: its heartbeat, else the "
        "subscription's stored cursor."
    )
