"""Streaming activities: consume a subscription for a workflow, and prune the
change log."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from app.contracts.realtime import ConsumeChangesInput, ConsumeChangesResult
from app.realtime.service import (
    SubscriptionNotFound,
    advance_cursor,
    get_subscription,
    prune_changes,
)
from app.realtime.stream import Subscriber
from app.settings import Settings


class RealtimeActivities:
    """Activities on the `nexus-streaming` queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="consume_changes")
    async def consume_changes(
        self, request: ConsumeChangesInput
    ) -> ConsumeChangesResult:
        """Collect up to `max_events` events of a subscription.

        Heartbeat details are `[cursor, events so far]` after every batch, so
        a retried attempt resumes after the last batch it had collected
        instead of at the subscription's stored cursor. The stored cursor
        moves when the activity completes.
        """
        url = self.settings.effective_database_url
        try:
            info = await asyncio.to_thread(
                get_subscription, url, request.subscription_id
            )
        except SubscriptionNotFound as error:
            raise ApplicationError(
                str(error), type="SubscriptionNotFound", non_retryable=True
            ) from None
        details = activity.info().heartbeat_details
        events: list[dict[str, Any]] = []
        start = info.cursor
        if details:
            start = int(details[0])
            if len(details) > 1:
                events = list(details[1])
            activity.logger.info(
                "resuming subscription %s from heartbeat cursor %d with %d events",
                request.subscription_id,
                start,
                len(events),
            )
        cursor = start
        subscriber = Subscriber(
            url,
            request.subscription_id,
            start_after=start,
            batch_size=min(request.max_events, info.batch_size),
            store_cursor=False,
        )
        async with subscriber:
            batches = subscriber.batches()
            try:
                while len(events) < request.max_events:
                    try:
                        async with asyncio.timeout(request.idle_ms / 1000 or None):
                            batch = await anext(batches)
                    except (TimeoutError, StopAsyncIteration):
                        break
                    room = request.max_events - len(events)
                    taken = batch[:room]
                    events.extend(taken)
                    cursor = (
                        taken[-1]["id"]
                        if len(taken) < len(batch)
                        else (subscriber.cursor)
                    )
                    activity.heartbeat(cursor, list(events))
                    if len(taken) < len(batch):
                        break
            finally:
                with contextlib.suppress(Exception):
                    await batches.aclose()
        ids = [int(event["id"]) for event in events]

        def counted(stored: int) -> int:
            # Events at or before the stored cursor were delivered before.
            return len(ids) - bisect.bisect_right(ids, stored)

        await asyncio.to_thread(
            advance_cursor, url, request.subscription_id, cursor, counted
        )
        return ConsumeChangesResult(
            subscription_id=request.subscription_id,
            events=events,
            cursor=cursor,
            resumed_from=start,
        )

    @activity.defn(name="prune_realtime_changes")
    async def prune_realtime_changes(self) -> int:
        """Delete changes every subscription has passed, past the retention."""
        return await asyncio.to_thread(
            prune_changes,
            self.settings.effective_database_url,
            self.settings.realtime_retention_seconds,
        )
