"""SSE delivery through a real HTTP server: the stored cursor moves only to
what a client confirms, and an unsubscribe ends open streams."""

from __future__ import annotations

import httpx
import pytest

from app.realtime.service import (
    create_subscription,
    delete_subscription,
    get_subscription,
    prune_changes,
)
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from tests.realtime.helpers import (
    create_items,
    insert_audit_row_with_lone_surrogate,
    insert_items,
)
from tests.realtime.sse import Message, RealtimeServer, SseReader

load_tools()

TIMEOUT = httpx.Timeout(30.0)


def numbers(messages: list[Message]) -> list[int]:
    return [event["new"]["n"] for message in messages for event in message.data]


async def read_batches(
    http: httpx.AsyncClient, path: str, count: int, headers: dict[str, str]
) -> list[Message]:
    async with http.stream(
        "GET", path, params={"max_batches": str(count)}, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        reader = SseReader(response)
        return [await reader.next_batch() for _ in range(count)]


async def test_client_that_reads_one_batch_and_disconnects(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=3)
    insert_items(database_url, [{"name": f"r{i}", "n": i} for i in range(12)])
    with RealtimeServer(Settings(database_url=database_url)) as server:
        path = server.stream_path(sub.subscription_id)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
            async with http.stream("GET", path) as response:
                first = await SseReader(response).next_batch()
            assert numbers([first]) == [0, 1, 2]
            await server.wait_idle()
            # Nothing was confirmed: the stored cursor has not moved.
            stored = get_subscription(database_url, sub.subscription_id)
            assert stored.cursor == sub.cursor
            assert stored.delivered == 0
            assert prune_changes(database_url, retention_seconds=0) == 0

            # Without Last-Event-ID the unconfirmed events come again.
            again = await read_batches(http, path, 4, {})
            assert numbers(again) == list(range(12))
            await server.wait_idle()

            # With Last-Event-ID: exactly the rest, and that id is confirmed.
            rest = await read_batches(http, path, 3, {"Last-Event-ID": str(first.id)})
            assert numbers(rest) == list(range(3, 12))
            stored = get_subscription(database_url, sub.subscription_id)
            assert (stored.cursor, stored.delivered) == (first.id, 3)

            # An explicit acknowledgement confirms the last batch.
            ack = await http.post(
                path.removesuffix("/stream") + "/ack", json={"cursor": rest[-1].id}
            )
            assert ack.status_code == 200, ack.text
            assert ack.json()["cursor"] == rest[-1].id
            assert ack.json()["delivered"] == 12
            await server.wait_idle()
    stored = get_subscription(database_url, sub.subscription_id)
    assert (stored.cursor, stored.delivered) == (rest[-1].id, 12)


async def test_last_event_id_is_checked(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=2)
    insert_items(database_url, [{"name": f"r{i}", "n": i} for i in range(4)])
    head = get_subscription(database_url, sub.subscription_id).cursor + 4
    with RealtimeServer(Settings(database_url=database_url)) as server:
        path = server.stream_path(sub.subscription_id)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
            beyond = await http.get(path, headers={"Last-Event-ID": str(head + 1)})
            assert beyond.status_code == 400
            detail = beyond.json()["detail"]
            assert f"Last-Event-ID {head + 1}" in detail
            assert f"newest change is {head}" in detail
            ack = await http.post(
                path.removesuffix("/stream") + "/ack", json={"cursor": head + 1}
            )
            assert ack.status_code == 400
            assert f"cursor {head + 1}" in ack.json()["detail"]
            # Nothing moved, and the head itself is a valid id.
            assert get_subscription(database_url, sub.subscription_id).cursor == (
                sub.cursor
            )
            both = await read_batches(http, path, 2, {})
            assert numbers(both) == [0, 1, 2, 3]
            await server.wait_idle()
    stored = get_subscription(database_url, sub.subscription_id)
    assert stored.cursor == sub.cursor


async def read_until_end(reader: SseReader) -> list[Message]:
    messages = []
    while (message := await reader.next()) is not None:
        if not message.comment:
            messages.append(message)
    return messages


async def test_unsubscribe_ends_open_stream(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    ctx = ToolContext(settings)
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "items"})
    with RealtimeServer(settings) as server:
        path = server.stream_path(created["subscription_id"])
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
            async with http.stream("GET", path) as response:
                reader = SseReader(response)
                insert_items(url, [{"name": "before", "n": 1}])
                assert numbers([await reader.next_batch()]) == [1]
                await invoke_tool(
                    ctx,
                    "realtime_unsubscribe",
                    {"subscription_id": created["subscription_id"]},
                )
                insert_items(url, [{"name": "after", "n": 2}])
                rest = await read_until_end(reader)
            assert [(m.event, m.data) for m in rest] == [("closed", {})]
            await server.wait_idle()


async def test_deletion_by_another_process_ends_stream(database_url: str) -> None:
    create_items(database_url)
    sub = create_subscription(database_url, "items")
    with RealtimeServer(Settings(database_url=database_url)) as server:
        path = server.stream_path(sub.subscription_id)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
            async with http.stream("GET", path) as response:
                reader = SseReader(response)
                insert_items(database_url, [{"name": "before", "n": 1}])
                assert numbers([await reader.next_batch()]) == [1]
                # No in-process notice: as if another process deleted it.
                assert delete_subscription(database_url, sub.subscription_id)
                rest = await read_until_end(reader)
            assert [m.event for m in rest][-1:] == ["closed"]
            await server.wait_idle()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stream_of_missing_subscription(database_url: str) -> None:
    with RealtimeServer(Settings(database_url=database_url)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
            missing = await http.get(server.stream_path("sub_nope"))
            assert missing.status_code == 404
            ack = await http.post(
                "/realtime/v1/subscriptions/sub_nope/ack", json={"cursor": 1}
            )
            assert ack.status_code == 404
            assert "realtime_list" in ack.json()["detail"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stream_replaces_stored_lone_surrogate(database_url: str) -> None:
    sub = create_subscription(database_url, "audit_log")
    insert_audit_row_with_lone_surrogate(database_url, "older-server")
    with RealtimeServer(Settings(database_url=database_url)) as server:
        path = server.stream_path(sub.subscription_id)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as http:
            (batch,) = await read_batches(http, path, 1, {})
        await server.wait_idle()
    assert batch.data[0]["new"]["user_id"] == "older-server"
    # As a strict JSON parser reads it: no lone surrogate escape is left.
    assert batch.data[0]["new"]["arguments"] == {"user_id": "\ufffd"}
