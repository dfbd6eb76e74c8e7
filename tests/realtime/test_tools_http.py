import gzip as gzip_module
import json
import re

import httpx
import pytest
from fastapi import FastAPI
from temporalio.testing import ActivityEnvironment

from activities.realtime import RealtimeActivities
from app.contracts.realtime import ConsumeChangesInput
from app.db import session_scope
from app.realtime.http import build_realtime_router
from app.realtime.output import append_output
from app.realtime.service import create_subscription, get_subscription, prune_changes
from app.sandbox.models import SandboxRecord
from app.settings import Settings
from app.tools import ToolContext, ToolError, get_tool, invoke_tool, load_tools
from tests.realtime.helpers import create_items, insert_items

load_tools()


async def test_tools_subscribe_read_unsubscribe(settings: Settings) -> None:
    ctx = ToolContext(settings)
    url = settings.effective_database_url
    create_items(url)
    created = await invoke_tool(
        ctx, "realtime_subscribe", {"table": "items", "filter": "n=gte.3"}
    )
    insert_items(url, [{"name": f"r{i}", "n": i} for i in range(6)])
    batch = await invoke_tool(
        ctx, "realtime_events", {"subscription_id": created["subscription_id"]}
    )
    assert [e["new"]["n"] for e in batch["events"]] == [3, 4, 5]
    listed = await invoke_tool(ctx, "realtime_list", {})
    mine = [
        s
        for s in listed["subscriptions"]
        if s["subscription_id"] == created["subscription_id"]
    ]
    assert mine[0]["lag"] == 0
    assert mine[0]["delivered"] == 3
    assert mine[0]["created_at"].endswith("Z")
    await invoke_tool(
        ctx, "realtime_unsubscribe", {"subscription_id": created["subscription_id"]}
    )
    with pytest.raises(ToolError, match="not found"):
        await invoke_tool(
            ctx, "realtime_events", {"subscription_id": created["subscription_id"]}
        )


async def test_subscribe_rejects_bad_filter(settings: Settings) -> None:
    create_items(settings.effective_database_url)
    with pytest.raises(ToolError, match="unknown column 'colour'"):
        await invoke_tool(
            ToolContext(settings),
            "realtime_subscribe",
            {"table": "items", "filter": "colour=eq.red"},
        )


async def test_audit_log_enabled_by_default(settings: Settings) -> None:
    ctx = ToolContext(settings)
    created = await invoke_tool(
        ctx,
        "realtime_subscribe",
        {"table": "audit_log", "filter": "tool=eq.realtime_list"},
    )
    await invoke_tool(ctx, "realtime_list", {})
    batch = await invoke_tool(
        ctx,
        "realtime_events",
        {"subscription_id": created["subscription_id"], "wait_ms": 5000},
    )
    assert [e["new"]["tool"] for e in batch["events"]] == ["realtime_list"]


async def test_execution_stream_of_sandbox(settings: Settings) -> None:
    ctx = ToolContext(settings)
    url = settings.effective_database_url
    append_output(url, "sandbox", "sbx-1", "first\n")
    append_output(url, "sandbox", "other", "not mine\n")
    created = await invoke_tool(
        ctx, "execution_stream_subscribe", {"sandbox_id": "sbx-1"}
    )
    append_output(url, "sandbox", "sbx-1", "second\n", stream="stderr", final=True)
    batch = await invoke_tool(
        ctx, "realtime_events", {"subscription_id": created["subscription_id"]}
    )
    assert [e["new"]["text"] for e in batch["events"]] == ["first\n", "second\n"]
    assert batch["events"][1]["new"]["stream"] == "stderr"
    status = await invoke_tool(
        ctx,
        "execution_stream_status",
        {"subscription_id": created["subscription_id"]},
    )
    assert status["chunks"] == 2
    assert status["finished"] is True
    assert status["last_chunk"] == "second\n"
    # In the form of every other time of the tools.
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", status["last_output_at"]
    ), status["last_output_at"]
    assert status["subscriptions"][0]["lag"] == 0


async def test_execution_stream_counts_pruned_chunks(settings: Settings) -> None:
    """A stream subscribed after its run's first chunks were pruned from the
    change log reports how many it misses, and delivers the rest."""
    ctx = ToolContext(settings)
    url = settings.effective_database_url
    for index in range(3):
        append_output(url, "sandbox", "sbx_old", f"old {index}\n")
    append_output(url, "sandbox", "sbx_other", "other\n")
    fresh = await invoke_tool(
        ctx, "execution_stream_subscribe", {"sandbox_id": "sbx_old"}
    )
    assert fresh["missed_chunks"] == 0

    await invoke_tool(
        ctx, "realtime_unsubscribe", {"subscription_id": fresh["subscription_id"]}
    )
    assert prune_changes(url, retention_seconds=0) >= 4
    append_output(url, "sandbox", "sbx_old", "new\n", final=True)
    created = await invoke_tool(
        ctx, "execution_stream_subscribe", {"sandbox_id": "sbx_old"}
    )
    assert created["missed_chunks"] == 3
    assert created["lag"] == 1
    batch = await invoke_tool(
        ctx, "realtime_events", {"subscription_id": created["subscription_id"]}
    )
    assert [e["new"]["text"] for e in batch["events"]] == ["new\n"]
    status = await invoke_tool(
        ctx, "execution_stream_status", {"sandbox_id": "sbx_old"}
    )
    assert status["chunks"] == 4

    # Nothing of a run is left in the log: every chunk is missed.
    assert prune_changes(url, retention_seconds=0) >= 1
    other = await invoke_tool(
        ctx, "execution_stream_subscribe", {"sandbox_id": "sbx_other"}
    )
    assert other["missed_chunks"] == 1
    assert other["lag"] == 0


async def test_execution_stream_needs_one_target(settings: Settings) -> None:
    with pytest.raises(ToolError, match="exactly one of sandbox_id and execution_id"):
        await invoke_tool(
            ToolContext(settings),
            "execution_stream_subscribe",
            {"sandbox_id": "a", "workflow_id": "b"},
        )


def sse_batches(body: str) -> list[tuple[int, list[dict[str, object]]]]:
    batches = []
    for message in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in message.splitlines() if ": " in line
        )
        if fields.get("event") == "changes":
            batches.append((int(fields["id"]), json.loads(fields["data"])))
    return batches


@pytest.mark.parametrize("compressed", [False, True])
async def test_sse_stream_resumes(database_url: str, compressed: bool) -> None:
    settings = Settings(database_url=database_url)
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=4)
    insert_items(database_url, [{"name": f"r{i}", "n": i} for i in range(10)])
    app = FastAPI()
    app.include_router(build_realtime_router(settings))
    path = f"/realtime/v1/subscriptions/{sub.subscription_id}/stream"
    params = {"max_batches": "1", "gzip": "true" if compressed else "false"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        first = await http.get(path, params=params)
        assert first.status_code == 200
        if compressed:
            assert first.headers["content-encoding"] == "gzip"
        batches = sse_batches(first.text)
        assert [e["new"]["n"] for e in batches[0][1]] == [0, 1, 2, 3]
        # Resume from Last-Event-ID; the rest arrives, nothing twice.
        second = await http.get(
            path,
            params={"max_batches": "2"},
            headers={"Last-Event-ID": str(batches[0][0])},
        )
        rest = [e["new"]["n"] for _, batch in sse_batches(second.text) for e in batch]
        assert rest == [4, 5, 6, 7, 8, 9]
        missing = await http.get("/realtime/v1/subscriptions/sub_nope/stream")
        assert missing.status_code == 404
    # Only the Last-Event-ID was confirmed; the second stream's batches wait
    # for a confirmation.
    assert get_subscription(database_url, sub.subscription_id).cursor == (batches[0][0])
    assert gzip_module  # decoding is done by httpx from Content-Encoding


async def test_consume_activity_resumes_from_heartbeat(database_url: str) -> None:
    settings = Settings(database_url=database_url)
    create_items(database_url)
    sub = create_subscription(database_url, "items", batch_size=5)
    insert_items(database_url, [{"name": f"r{i}", "n": i} for i in range(20)])
    activities = RealtimeActivities(settings)
    heartbeats: list[tuple[object, ...]] = []
    first_env = ActivityEnvironment()
    first_env.on_heartbeat = lambda *details: heartbeats.append(details)
    first = await first_env.run(
        activities.consume_changes,
        ConsumeChangesInput(subscription_id=sub.subscription_id, max_events=8),
    )
    assert [e["new"]["n"] for e in first.events] == list(range(8))
    assert heartbeats
    # A retried attempt after the second heartbeat of a lost run: it must
    # start from that heartbeat, not from the stored cursor.
    cursor, events = heartbeats[0]
    retry_env = ActivityEnvironment()
    retry_env.info = retry_env.info.__class__(
        **{**retry_env.info.__dict__, "heartbeat_details": [cursor, events]}
    )
    retried = await retry_env.run(
        activities.consume_changes,
        ConsumeChangesInput(
            subscription_id=sub.subscription_id, max_events=20, idle_ms=500
        ),
    )
    assert retried.resumed_from == cursor
    assert [e["new"]["n"] for e in retried.events] == list(range(20))
    assert get_subscription(database_url, sub.subscription_id).cursor == (
        retried.cursor
    )


async def test_execution_stream_needs_an_existing_run(settings: Settings) -> None:
    ctx = ToolContext(settings)
    with pytest.raises(ToolError) as missing:
        await invoke_tool(
            ctx, "execution_stream_subscribe", {"sandbox_id": "sbx_does_not_exist"}
        )
    assert missing.value.kind == "not_found"
    assert "sandbox 'sbx_does_not_exist' not found" in missing.value.message
    assert "sandbox_list" in missing.value.message
    with pytest.raises(ToolError) as no_run:
        await invoke_tool(ctx, "execution_stream_subscribe", {"workflow_id": "wf_x"})
    assert no_run.value.kind == "not_found"
    assert "workflow execution 'wf_x' not found" in no_run.value.message
    assert "workflow_status" in no_run.value.message
    # The published schema names the argument as the docs and errors do.
    for name in ("execution_stream_subscribe", "execution_stream_status"):
        schema = get_tool(name).input_model.model_json_schema(by_alias=True)
        assert "execution_id" in schema["properties"], schema
    with pytest.raises(ToolError) as by_name:
        await invoke_tool(ctx, "execution_stream_subscribe", {"execution_id": "wf_y"})
    assert "workflow execution 'wf_y' not found" in by_name.value.message
    assert await invoke_tool(ctx, "realtime_list", {}) == {
        "subscriptions": [],
        "count": 0,
    }
    # A recorded sandbox without output yet can be followed from its start.
    with session_scope(settings.effective_database_url) as session:
        session.add(
            SandboxRecord(
                id="sbx_quiet",
                template="base",
                status="running",
                backend="local",
                timeout=60,
            )
        )
    created = await invoke_tool(
        ctx, "execution_stream_subscribe", {"sandbox_id": "sbx_quiet"}
    )
    assert created["stream_id"] == "sbx_quiet"


async def test_execution_stream_status_unknown_run(settings: Settings) -> None:
    ctx = ToolContext(settings)
    with pytest.raises(ToolError) as missing:
        await invoke_tool(
            ctx, "execution_stream_status", {"sandbox_id": "sbx_does_not_exist"}
        )
    assert missing.value.kind == "not_found"
    assert "sandbox_id: sandbox 'sbx_does_not_exist' not found" in (
        missing.value.message
    )
    with pytest.raises(ToolError) as no_run:
        await invoke_tool(ctx, "execution_stream_status", {"execution_id": "wf_x"})
    assert no_run.value.kind == "not_found"
    assert "execution_id: workflow execution 'wf_x' not found" in (no_run.value.message)
    # A run with output but no record is still a stream to report.
    append_output(settings.effective_database_url, "sandbox", "sbx_out", "hi\n")
    status = await invoke_tool(
        ctx, "execution_stream_status", {"sandbox_id": "sbx_out"}
    )
    assert status["chunks"] == 1


async def test_execution_stream_lag_counts_its_own_chunks(settings: Settings) -> None:
    ctx = ToolContext(settings)
    url = settings.effective_database_url
    append_output(url, "sandbox", "sbx_A", "start\n")
    created = await invoke_tool(
        ctx, "execution_stream_subscribe", {"sandbox_id": "sbx_A"}
    )
    # The run's earlier chunk is still to read, and the result counts it.
    assert created["lag"] == 1
    assert created["head"] >= created["cursor"]
    for i in range(3):
        append_output(url, "sandbox", "sbx_A", f"a{i}\n")
    for i in range(20):
        append_output(url, "sandbox", "sbx_B", f"b{i}\n")
    status = await invoke_tool(
        ctx,
        "execution_stream_status",
        {"subscription_id": created["subscription_id"]},
    )
    assert status["subscriptions"][0]["lag"] == 4
    assert status["subscriptions"][0]["lag_exact"] is True


async def test_subscribe_reports_head_and_lag(settings: Settings) -> None:
    ctx = ToolContext(settings)
    url = settings.effective_database_url
    create_items(url)
    insert_items(url, [{"name": "old", "n": 1}])
    created = await invoke_tool(ctx, "realtime_subscribe", {"table": "items"})
    assert created["head"] == created["cursor"]
    assert created["head"] > 0
    assert (created["lag"], created["lag_exact"]) == (0, True)
