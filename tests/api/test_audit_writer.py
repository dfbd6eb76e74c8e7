"""The batched audit writer against a real database, and its shutdown in a
real uvicorn server."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from app.api.http import create_app
from app.contracts.system import AuditRecord
from app.db import get_engine
from app.services import audit_writer
from app.services.audit import MASK, TRUNCATION_MARKER, list_calls
from app.services.audit_writer import AuditWriter
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from tests.api.conftest import ApiServer, ThreadedServer, free_port
from tests.conftest import PostgresHandle, postgres_stopped
from workers.run import worker_audit


def _event(tool: str = "system_health", **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "user_id": "key:writer-test",
        "tool": tool,
        "arguments": {},
        "outcome": "success",
        "duration_ms": 1.0,
    }
    fields.update(overrides)
    return fields


async def test_queued_events_share_one_transaction(database_url: str) -> None:
    commits = 0

    def count_commit(_: Any) -> None:
        nonlocal commits
        commits += 1

    engine = get_engine(database_url)
    event.listen(engine, "commit", count_commit)
    writer = AuditWriter(database_url)
    try:
        # No await between the submits, so the task finds all 50 queued.
        for index in range(50):
            writer.submit(**_event(arguments={"index": index}))
        assert writer.pending == 50
        await writer.flush()
    finally:
        event.remove(engine, "commit", count_commit)
        await writer.close()
    assert commits == 1
    assert writer.pending == 0
    rows = list_calls(database_url, user_id="key:writer-test", limit=100)
    assert [row.arguments["index"] for row in rows] == list(range(49, -1, -1))


async def test_secrets_masked_before_queueing(database_url: str) -> None:
    writer = AuditWriter(database_url)
    writer.submit(**_event(arguments={"api_key": "s3cret", "limit": 1}))
    assert "s3cret" not in repr(writer._pending)
    await writer.close()
    row = list_calls(database_url, user_id="key:writer-test", limit=1)[0]
    assert row.arguments == {"api_key": MASK, "limit": 1}


async def test_unencodable_values_made_storable(database_url: str) -> None:
    writer = AuditWriter(database_url)
    writer.submit(
        **_event(
            arguments={
                "user_id": "a\ud800b",
                "limit": float("inf"),
                "\udc00name": [float("nan"), float("-inf")],
            },
            error="invalid \ud800",
            ids={"run_id": "r\udfff"},
        )
    )
    await writer.close()
    row = list_calls(database_url, user_id="key:writer-test", limit=1)[0]
    assert row.arguments == {
        "user_id": "a\ufffdb",
        "limit": "inf",
        "\ufffdname": ["nan", "-inf"],
    }
    assert row.error == "invalid \ufffd"
    assert row.ids == {"run_id": "r\ufffd"}


async def test_close_writes_every_queued_event(database_url: str) -> None:
    writer = AuditWriter(database_url, max_batch=7)
    for index in range(40):
        writer.submit(**_event(arguments={"index": index}))
    await writer.close()
    rows = list_calls(database_url, user_id="key:writer-test", limit=100)
    assert len(rows) == 40
    # An event after close is written at once.
    writer.submit(**_event(arguments={"index": 40}))
    rows = list_calls(database_url, user_id="key:writer-test", limit=100)
    assert len(rows) == 41


async def test_overlong_caller_shortened_not_dropped(database_url: str) -> None:
    """PostgreSQL rejects a user id longer than its column, so the event
    is shortened to fit instead of being lost."""
    user_id = "key:" + "n" * 300
    writer = AuditWriter(database_url)
    writer.submit(**_event("long_caller", user_id=user_id, key_id="k" * 150))
    await writer.close()
    rows = list_calls(database_url, tool="long_caller")
    assert len(rows) == 1
    assert len(rows[0].user_id) == 200
    assert rows[0].user_id.startswith("key:nnn")
    assert rows[0].user_id.endswith(TRUNCATION_MARKER)
    assert rows[0].key_id is not None
    assert len(rows[0].key_id) == 100


class _FailingWrites:
    """`write_events` that raises for its first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self._real = audit_writer.write_events

    def __call__(self, url: str, events: list[dict[str, Any]]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError("disk I/O error (forced by the test)")
        self._real(url, events)


def _writer_failing_first(
    monkeypatch: pytest.MonkeyPatch, database_url: str, failures: int
) -> tuple[AuditWriter, _FailingWrites]:
    """A writer whose first `failures` writes fail while the database does not
    respond either, so each failed batch stays queued."""
    writes = _FailingWrites(failures)
    monkeypatch.setattr(audit_writer, "write_events", writes)
    monkeypatch.setattr(audit_writer, "_database_responds", lambda _: False)
    return AuditWriter(database_url, retry_seconds=0.01), writes


async def test_failed_write_is_retried(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, writes = _writer_failing_first(monkeypatch, database_url, 2)
    for index in range(3):
        writer.submit(**_event(arguments={"index": index}))
    await writer.flush()
    await writer.close()
    rows = list_calls(database_url, user_id="key:writer-test", limit=100)
    assert sorted(row.arguments["index"] for row in rows) == [0, 1, 2]
    assert writes.attempts >= 3


async def test_rejected_event_does_not_block_others(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = audit_writer.write_events

    def reject_bad(url: str, events: list[dict[str, Any]]) -> None:
        if any(item["tool"] == "bad" for item in events):
            raise ValueError("value too long for column (forced by the test)")
        real_write(url, events)

    monkeypatch.setattr(audit_writer, "write_events", reject_bad)
    writer = AuditWriter(database_url)
    writer.submit(**_event("good_before"))
    writer.submit(**_event("bad"))
    writer.submit(**_event("good_after"))
    await writer.flush()
    await writer.close()
    tools = [row.tool for row in list_calls(database_url, user_id="key:writer-test")]
    assert tools == ["good_after", "good_before"]


async def test_server_shutdown_loses_no_event(api_server: ApiServer) -> None:
    """Calls answered by a server are all in the audit log once it stopped."""
    settings = api_server.settings
    port = free_port()
    calls = 60
    with ThreadedServer(create_app(settings), port):
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=api_server.headers
        ) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/api/tools/audit_log",
                        json={"limit": 1, "tool": f"shutdown-{index}"},
                    )
                    for index in range(calls)
                )
            )
    assert [r.status_code for r in responses] == [200] * calls
    rows = list_calls(
        settings.effective_database_url,
        tool="audit_log",
        user_id="key:tests",
        limit=1000,
    )
    recorded = {
        row.arguments.get("tool")
        for row in rows
        if str(row.arguments.get("tool", "")).startswith("shutdown-")
    }
    assert recorded == {f"shutdown-{index}" for index in range(calls)}


async def test_server_checkpoints_sqlite_in_background(api_server: ApiServer) -> None:
    """While the server runs, its commits leave WAL checkpoints to a thread,
    and connections opened after it stopped checkpoint on commit again."""
    settings = api_server.settings
    url = settings.effective_database_url

    def autocheckpoint() -> int:
        with get_engine(url).connect() as connection:
            return int(
                connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
            )

    if not url.startswith("sqlite"):
        pytest.skip("checkpoints are SQLite's")
    port = free_port()
    with ThreadedServer(create_app(settings), port):
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=api_server.headers
        ) as http:
            response = await http.post("/api/tools/audit_log", json={"limit": 1})
        assert response.status_code == 200
        assert autocheckpoint() == 0
    assert autocheckpoint() == 1000


async def test_concurrent_reads_share_query(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_list = audit_writer.list_calls
    reads = 0

    def counting_list(url: str, **filters: Any) -> list[AuditRecord]:
        nonlocal reads
        reads += 1
        return real_list(url, **filters)

    monkeypatch.setattr(audit_writer, "list_calls", counting_list)
    writer = AuditWriter(database_url)
    try:
        writer.submit(**_event("shared"))
        results = await asyncio.gather(
            *(
                writer.list_calls(limit=5, user_id="key:writer-test", tool="shared")
                for _ in range(10)
            )
        )
        assert reads == 1
        assert all([row.tool for row in rows] == ["shared"] for rows in results)
        # Other filters get their own query.
        await writer.list_calls(limit=5, user_id=None, tool="shared")
        assert reads == 2
    finally:
        await writer.close()


async def test_read_started_earlier_not_shared(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_list = audit_writer.list_calls
    release = threading.Event()
    reads = 0

    def first_read_waits(url: str, **filters: Any) -> list[AuditRecord]:
        nonlocal reads
        reads += 1
        rows = real_list(url, **filters)
        if reads == 1:
            release.wait(timeout=30)
        return rows

    monkeypatch.setattr(audit_writer, "list_calls", first_read_waits)
    writer = AuditWriter(database_url)
    filters: dict[str, Any] = {"limit": 5, "user_id": "key:writer-test", "tool": None}
    try:
        early = asyncio.create_task(writer.list_calls(**filters))
        while reads == 0:
            await asyncio.sleep(0.01)
        # Submitted after the first query started, so a later call must not
        # get that query's result.
        writer.submit(**_event("after_first_read"))
        late = asyncio.create_task(writer.list_calls(**filters))
        while reads < 2:
            await asyncio.sleep(0.01)
        release.set()
        early_rows, late_rows = await asyncio.gather(early, late)
    finally:
        release.set()
        await writer.close()
    assert reads == 2
    assert early_rows == []
    assert [row.tool for row in late_rows] == ["after_first_read"]


async def test_linger_gathers_batch_until_flush(database_url: str) -> None:
    commits = 0

    def count_commit(_: Any) -> None:
        nonlocal commits
        commits += 1

    engine = get_engine(database_url)
    event.listen(engine, "commit", count_commit)
    # An hour of lingering: only the flush can make the task write.
    writer = AuditWriter(database_url, linger_seconds=3600)
    try:
        for index in range(5):
            writer.submit(**_event(arguments={"index": index}))
            await asyncio.sleep(0.01)
        assert commits == 0
        await writer.flush()
        assert commits == 1
        assert writer.pending == 0
    finally:
        event.remove(engine, "commit", count_commit)
        await writer.close()
    rows = list_calls(database_url, user_id="key:writer-test", limit=100)
    assert [row.arguments["index"] for row in rows] == [4, 3, 2, 1, 0]


async def test_read_shares_thread_call_with_commit(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_to_thread = asyncio.to_thread
    thread_calls: list[str] = []

    async def counting_to_thread(function: Any, /, *args: Any, **kwargs: Any) -> Any:
        # Only the writer's calls: servers of earlier tests may still run.
        called = getattr(function, "func", function)
        if called.__module__ in (audit_writer.__name__, "app.services.audit"):
            thread_calls.append(called.__name__)
        return await real_to_thread(function, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    writer = AuditWriter(database_url)
    try:
        writer.submit(**_event("before_read"))
        rows = await writer.list_calls(limit=5, user_id="key:writer-test", tool=None)
    finally:
        await writer.close()
    assert [row.tool for row in rows] == ["before_read"]
    # The commit of the pending event and the query: one thread call.
    assert thread_calls == ["_write_and_read"]


async def test_read_queued_during_write_served(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = audit_writer.write_events
    writing = threading.Event()
    release = threading.Event()

    def held_write(url: str, events: list[dict[str, Any]]) -> None:
        writing.set()
        release.wait(timeout=30)
        real_write(url, events)

    monkeypatch.setattr(audit_writer, "write_events", held_write)
    writer = AuditWriter(database_url, linger_seconds=0)
    try:
        writer.submit(**_event("in_flight"))
        while not writing.is_set():
            await asyncio.sleep(0.01)
        # Its event is in the batch being written, and nothing else is
        # pending when that write ends.
        read = asyncio.create_task(
            writer.list_calls(limit=5, user_id="key:writer-test", tool=None)
        )
        await asyncio.sleep(0.05)
        release.set()
        rows = await asyncio.wait_for(read, timeout=10)
    finally:
        release.set()
        await writer.close()
    assert [row.tool for row in rows] == ["in_flight"]


async def test_read_waits_through_failed_write(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, writes = _writer_failing_first(monkeypatch, database_url, 3)
    filters: dict[str, Any] = {"limit": 5, "user_id": "key:writer-test", "tool": None}
    try:
        writer.submit(**_event("retried"))
        first = asyncio.create_task(writer.list_calls(**filters))
        while writes.attempts == 0:
            await asyncio.sleep(0.001)
        # Queued while the first batch fails, for the same query.
        second = asyncio.create_task(writer.list_calls(**filters))
        rows = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    finally:
        await writer.close()
    assert writes.attempts >= 4
    assert [[row.tool for row in result] for result in rows] == [["retried"]] * 2


async def test_later_reads_hold_back_none(database_url: str) -> None:
    writer = AuditWriter(database_url, max_batch=2)
    filters: dict[str, Any] = {"limit": 5, "user_id": "key:writer-test", "tool": None}
    later: list[asyncio.Task[list[AuditRecord]]] = []
    try:
        writer.submit(**_event("first"))
        first = asyncio.create_task(writer.list_calls(**filters))
        # Events still queued when the first call returned: a writer that
        # made it wait for the later calls' events would leave none.
        pending_when_served: list[int] = []
        first.add_done_callback(lambda _: pending_when_served.append(writer.pending))
        await asyncio.sleep(0)  # its query waits for 1 committed event
        # More events per write than a batch takes, and calls with the same
        # filters, each waiting for more events than the one before.
        index = 0
        while writer.pending < 200 and not first.done():
            for _ in range(20):
                writer.submit(**_event("load", arguments={"index": index}))
                index += 1
            later.append(asyncio.create_task(writer.list_calls(**filters)))
            await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(first, *later), timeout=60)
    finally:
        for task in later:
            task.cancel()
        await writer.close()
    # Not a check that `first` returned within the loop: on a loaded machine
    # one commit can outlast the loop's 200 events.
    assert pending_when_served[0] > 0
    assert "first" in [row.tool for row in first.result()]


async def test_partial_retry_keeps_order(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = audit_writer.write_events
    failures_left = 4

    def first_event_fails(url: str, events: list[dict[str, Any]]) -> None:
        nonlocal failures_left
        if failures_left and any(event["tool"] == "first" for event in events):
            failures_left -= 1
            raise OSError("disk I/O error (forced by the test)")
        real_write(url, events)

    monkeypatch.setattr(audit_writer, "write_events", first_event_fails)
    monkeypatch.setattr(audit_writer, "_database_responds", lambda _: False)
    writer = AuditWriter(database_url, retry_seconds=0.05)
    try:
        writer.submit(**_event("first"))
        read = asyncio.create_task(
            writer.list_calls(limit=5, user_id="key:writer-test", tool=None)
        )
        await asyncio.sleep(0)  # the call arrives after "first" only
        writer.submit(**_event("second"))
        rows = await asyncio.wait_for(read, timeout=10)
    finally:
        await writer.close()
    # The event queued before the call is in its result, although a later
    # one could be written while it still failed.
    assert "first" in [row.tool for row in rows]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_worker_call_audited_after_outage(
    settings: Settings, restartable: PostgresHandle
) -> None:
    load_tools()
    ctx = ToolContext(settings, user_id="workflow:wfx_outage/step")
    async with worker_audit(settings) as writer:
        async with postgres_stopped(restartable):
            result = await invoke_tool(ctx, "storage_list", {"bucket": "data"})
            # The call returned after its commit wait; its event is queued.
            assert writer.pending == 1
        await asyncio.wait_for(writer.flush(), 60)
    rows = list_calls(settings.effective_database_url, user_id=ctx.user_id)
    assert result["objects"] == []
    assert [row.tool for row in rows] == ["storage_list"]
    assert rows[0].outcome == "success"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_full_queue_drops_and_logs(
    database_url: str, restartable: PostgresHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="app.services.audit_writer")
    writer = AuditWriter(database_url, retry_seconds=0.05, max_pending=2)
    try:
        async with postgres_stopped(restartable):
            for index in range(5):
                writer.submit(**_event(arguments={"index": index}))
            assert writer.pending == 2
            assert writer.dropped == 3
        await asyncio.wait_for(writer.flush(), 60)
    finally:
        await writer.close()
    rows = list_calls(database_url, user_id="key:writer-test", limit=100)
    messages = [r.getMessage() for r in caplog.records]
    full = [m for m in messages if m.startswith("the audit queue is full")]
    dropped = [m for m in messages if m.startswith("dropped 3 audit events")]
    assert sorted(row.arguments["index"] for row in rows) == [0, 1]
    assert len(full) == 1
    assert "the event of tool 'system_health' by 'key:writer-test'" in full[0]
    assert len(dropped) == 1
    assert writer.dropped == 0
