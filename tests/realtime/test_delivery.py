import asyncio
import contextlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from app.db import get_engine
from app.realtime import service, stream
from app.realtime.service import (
    SubscriptionNotFound,
    create_subscription,
    delete_subscription,
    get_subscription,
    list_subscriptions,
    prune_changes,
)
from app.realtime.stream import Subscriber, SubscriptionClosed, next_events
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from tests.conftest import PostgresHandle
from tests.realtime.helpers import (
    create_items,
    delete_items,
    insert_audit_row_with_lone_surrogate,
    insert_items,
    update_items,
)

load_tools()


def rows(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"name": f"row-{i}", "n": i} for i in range(start, stop)]


async def collect(subscriber: Subscriber, count: int) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async for batch in subscriber.batches():
        received.extend(batch)
        if len(received) >= count:
            break
    return received


async def test_two_filters_get_own_changes(database_url: str) -> None:
    create_items(database_url)
    low = create_subscription(database_url, "items", filter_text="n=lt.50")
    even = create_subscription(
        database_url, "items", filter_text="n=in.(0,10,20,30,40,50,60,70,80,90)"
    )
    async with (
        Subscriber(database_url, low.subscription_id) as low_stream,
        Subscriber(database_url, even.subscription_id) as even_stream,
    ):
        insert_items(database_url, rows(0, 100))
        low_events = await collect(low_stream, 50)
        even_events = await collect(even_stream, 10)
    assert [e["new"]["n"] for e in low_events] == list(range(50))
    assert [e["new"]["n"] for e in even_events] == list(range(0, 100, 10))
    assert get_subscription(database_url, low.subscription_id).cursor > 0


async def test_update_and_delete_events(database_url: str) -> None:
    started = datetime.now(UTC)
    create_items(database_url)
    insert_items(database_url, [{"name": "kept", "n": 1}, {"name": "gone", "n": 2}])
    deletes = create_subscription(database_url, "items", event="DELETE")
    updates = create_subscription(
        database_url, "items", event="UPDATE", filter_text="n=gt.5"
    )
    update_items(database_url, "kept", n=10)
    update_items(database_url, "gone", n=3)
    delete_items(database_url, "gone")
    deleted, _ = await next_events(database_url, deletes.subscription_id)
    updated, _ = await next_events(database_url, updates.subscription_id)
    assert len(deleted) == 1
    assert deleted[0]["eventType"] == "DELETE"
    assert deleted[0]["old"]["name"] == "gone"
    assert deleted[0]["new"] == {}
    assert deleted[0]["table"] == "items"
    # ISO 8601 in UTC on both databases, and not before the test started.
    stamp = deleted[0]["commit_timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3,6}Z", stamp), stamp
    assert datetime.fromisoformat(stamp) >= started - timedelta(seconds=5)
    assert [e["new"]["name"] for e in updated] == ["kept"]
    assert updated[0]["old"]["n"] == 1


async def test_resume_after_disconnect(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=7)
    insert_items(database_url, rows(0, 30))
    async with Subscriber(database_url, sub.subscription_id) as first:
        seen = await collect(first, 14)
    insert_items(database_url, rows(30, 60))
    async with Subscriber(database_url, sub.subscription_id) as second:
        seen += await collect(second, 60 - len(seen))
    numbers = [e["new"]["n"] for e in seen]
    assert numbers == list(range(60))
    assert get_subscription(database_url, sub.subscription_id).delivered == 60


async def test_events_tool_resumes(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", filter_text="n=gte.10")
    insert_items(database_url, rows(0, 40))
    seen: list[int] = []
    while True:
        events, _ = await next_events(database_url, sub.subscription_id, limit=8)
        if not events:
            break
        seen += [e["new"]["n"] for e in events]
    assert seen == list(range(10, 40))
    listed = {s.subscription_id: s for s in list_subscriptions(database_url)}
    assert listed[sub.subscription_id].lag == 0


async def test_events_wait_for_change(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items")

    async def insert_later() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(insert_items, database_url, rows(0, 1))

    task = asyncio.create_task(insert_later())
    events, _ = await next_events(database_url, sub.subscription_id, wait_ms=20_000)
    await task
    assert [e["new"]["name"] for e in events] == ["row-0"]


async def test_stalled_subscriber_stays_bounded(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=10, max_buffer_size=50)
    insert_items(database_url, rows(0, 600))
    async with Subscriber(database_url, sub.subscription_id) as stream:
        batches = stream.batches()
        first = await anext(batches)
        # The consumer stalls; the reader fills the buffer and must stop there.
        while stream.buffered < 50:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert stream.buffered == 50
        assert stream.max_buffered <= 50
        lag = {s.subscription_id: s.lag for s in list_subscriptions(database_url)}
        assert lag[sub.subscription_id] == 600
        received = list(first)
        async for batch in batches:
            received.extend(batch)
            if len(received) >= 600:
                break
        await batches.aclose()
    assert [e["new"]["n"] for e in received] == list(range(600))
    assert stream.max_buffered <= 50


async def test_prune_keeps_unread_changes(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items")
    insert_items(database_url, rows(0, 10))
    assert prune_changes(database_url, retention_seconds=0) == 0
    events, _ = await next_events(database_url, sub.subscription_id, limit=4)
    assert len(events) == 4
    assert prune_changes(database_url, retention_seconds=0) == 4
    assert prune_changes(database_url, retention_seconds=3600) == 0
    rest, _ = await next_events(database_url, sub.subscription_id)
    assert [e["new"]["n"] for e in rest] == list(range(4, 10))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgres_restart_loses_nothing(
    database_url: str, restartable: PostgresHandle
) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=5)
    received: list[dict[str, Any]] = []
    async with Subscriber(database_url, sub.subscription_id) as stream:

        async def consume() -> None:
            async for batch in stream.batches():
                received.extend(batch)
                if len(received) >= 100:
                    return

        consumer = asyncio.create_task(consume())
        insert_items(database_url, rows(0, 50))
        while len(received) < 20:
            await asyncio.sleep(0.05)
        assert restartable.server is not None
        await asyncio.to_thread(restartable.server.pg_ctl, "restart")
        for attempt in range(50):
            try:
                await asyncio.to_thread(insert_items, database_url, rows(50, 100))
                break
            except Exception:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)
        try:
            await asyncio.wait_for(consumer, 120)
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    numbers = [e["new"]["n"] for e in received]
    assert numbers == list(range(100))


async def test_table_without_realtime_rejected(database_url: str) -> None:
    with get_engine(database_url).begin() as connection:
        connection.execute(text("CREATE TABLE plain (id INTEGER PRIMARY KEY)"))
    with pytest.raises(ValueError, match="realtime is not enabled on table 'plain'"):
        create_subscription(database_url, "plain")


async def test_failed_consumer_gets_its_batch_again(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=3)
    insert_items(database_url, rows(0, 9))
    with pytest.raises(RuntimeError, match="processing failed"):
        async with Subscriber(database_url, sub.subscription_id) as first:
            async for batch in first.batches():
                if batch[0]["new"]["n"] == 3:
                    raise RuntimeError("processing failed")
    # The first batch was acknowledged by asking for the second; the second
    # was not, so it comes again.
    stored = get_subscription(database_url, sub.subscription_id)
    assert stored.delivered == 3
    async with Subscriber(database_url, sub.subscription_id) as second:
        again = await collect(second, 6)
    assert [e["new"]["n"] for e in again] == list(range(3, 9))
    assert get_subscription(database_url, sub.subscription_id).delivered == 9


async def test_replay_counts_each_event_once(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=4)
    insert_items(database_url, rows(0, 8))
    async with Subscriber(database_url, sub.subscription_id) as first:
        await collect(first, 8)
    assert get_subscription(database_url, sub.subscription_id).delivered == 8
    insert_items(database_url, rows(8, 10))
    # Start before the stored cursor: 8 events again, then 2 new ones.
    async with Subscriber(
        database_url, sub.subscription_id, start_after=sub.cursor
    ) as replay:
        seen = await collect(replay, 10)
    assert [e["new"]["n"] for e in seen] == list(range(10))
    stored = get_subscription(database_url, sub.subscription_id)
    assert stored.delivered == 10
    assert stored.cursor == seen[-1]["id"]


async def test_unsubscribe_ends_subscriber(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    ctx = ToolContext(settings)
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "items"})
    insert_items(url, rows(0, 1))
    async with Subscriber(url, created["subscription_id"]) as stream:
        batches = stream.batches()
        assert [e["new"]["n"] for e in await anext(batches)] == [0]
        await invoke_tool(
            ctx, "realtime_unsubscribe", {"subscription_id": created["subscription_id"]}
        )
        insert_items(url, rows(1, 2))
        with pytest.raises(SubscriptionClosed):
            await anext(batches)


async def test_deletion_elsewhere_ends_idle_subscriber(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", filter_text="n=gt.100")
    async with Subscriber(database_url, sub.subscription_id) as stream:
        batches = stream.batches()
        insert_items(database_url, rows(0, 3))  # nothing matches
        # As another process would: no notice to this one.
        delete_subscription(database_url, sub.subscription_id)
        with pytest.raises(SubscriptionClosed):
            await anext(batches)


async def test_unsubscribe_ends_events_wait(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    ctx = ToolContext(settings)
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "items"})
    subscription_id = created["subscription_id"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(next_events(url, subscription_id, wait_ms=10_000))
    await asyncio.sleep(0.5)
    await invoke_tool(ctx, "realtime_unsubscribe", {"subscription_id": subscription_id})
    with pytest.raises(SubscriptionNotFound, match="was deleted while"):
        await waiting
    assert loop.time() - started < 2.0
    assert subscription_id not in stream._open


async def test_deletion_elsewhere_ends_events_wait(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items")
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(
        next_events(database_url, sub.subscription_id, wait_ms=10_000)
    )
    await asyncio.sleep(0.3)
    # As another process would: no notice to this one.
    delete_subscription(database_url, sub.subscription_id)
    with pytest.raises(SubscriptionNotFound, match="was deleted while"):
        await waiting
    elapsed = loop.time() - started
    assert elapsed < stream.SUBSCRIPTION_CHECK_SECONDS + 2.0


async def test_events_with_lone_surrogate_encodable(database_url: str) -> None:
    sub = create_subscription(database_url, "audit_log")
    insert_audit_row_with_lone_surrogate(database_url, "first")
    insert_audit_row_with_lone_surrogate(database_url, "second")
    events, cursor = await next_events(database_url, sub.subscription_id)
    assert [e["new"]["user_id"] for e in events] == ["first", "second"]
    assert events[0]["new"]["arguments"] == {"user_id": "\ufffd"}
    assert orjson.loads(orjson.dumps(events)) == events
    assert get_subscription(database_url, sub.subscription_id).cursor == cursor


async def test_lag_counts_matching_events(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_items(database_url)
    even = create_subscription(database_url, "items", filter_text="n=in.(0,2,4,6)")
    inserts = create_subscription(database_url, "items", event="INSERT")
    insert_items(database_url, rows(0, 10))
    update_items(database_url, "row-1", n=2)

    def listed() -> dict[str, Any]:
        return {s.subscription_id: s for s in list_subscriptions(database_url)}

    now = listed()
    assert (now[even.subscription_id].lag, now[even.subscription_id].lag_exact) == (
        5,
        True,
    )
    assert now[inserts.subscription_id].lag == 10
    assert now[even.subscription_id].head == now[inserts.subscription_id].head
    # A filtered count reads a bounded number of changes and reports that.
    monkeypatch.setattr(service, "LAG_SCAN_CHANGES", 4)
    bounded = listed()[even.subscription_id]
    assert (bounded.lag, bounded.lag_exact) == (2, False)


async def test_notifications_coalesce_into_held_wake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Notifications within the interval after a wake-up give one more
    wake-up once it has passed; the first one after a quiet spell wakes at
    once."""
    # Long enough that a stalled test process cannot pass it by accident.
    monkeypatch.setattr(stream, "NOTIFY_COALESCE_SECONDS", 0.3)
    listener = stream._SharedListener("postgresql+psycopg://unused")
    wake = asyncio.Event()
    listener.wakes.add(wake)
    loop = asyncio.get_running_loop()

    listener.notified()
    assert wake.is_set()
    first = loop.time()
    wake.clear()
    for _ in range(20):
        listener.notified()
    assert not wake.is_set()

    await asyncio.wait_for(wake.wait(), 5.0)
    assert loop.time() - first >= 0.29
    wake.clear()
    await asyncio.sleep(0.6)
    assert not wake.is_set()  # the 20 notifications gave one wake-up
    listener.notified()
    assert wake.is_set()
    listener.stop()


async def test_stopped_listener_drops_held_wake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream, "NOTIFY_COALESCE_SECONDS", 0.3)
    listener = stream._SharedListener("postgresql+psycopg://unused")
    wake = asyncio.Event()
    listener.wakes.add(wake)
    listener.notified()
    wake.clear()
    listener.notified()
    listener.stop()
    await asyncio.sleep(0.6)
    assert not wake.is_set()
