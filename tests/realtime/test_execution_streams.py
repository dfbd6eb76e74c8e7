"""Execution streams fed by real runs: sandbox programs on the local backend
and workflow executions, read through the realtime tools."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from temporalio.client import Client

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.contracts.sandbox import ExecuteRequest
from app.db import get_engine
from app.realtime import output as realtime_output
from app.realtime.output import MAX_CHUNK_CHARS, OutputWriter, wait_for_output_writes
from app.sandbox import runtime
from app.sandbox.local import LocalBackend
from app.sandbox.output_stream import ExecutionStream, StreamRedactor
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from tests.conftest import running_workers

load_tools()

SECRET = "tok-4f9c-very-secret-e21b"


async def call(ctx: ToolContext, tool: str, /, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, tool, arguments)


@pytest.fixture
async def sandbox_ctx(client: Client, settings: Settings) -> AsyncIterator[ToolContext]:
    async with running_workers(client, settings, [ORCHESTRATION, SANDBOX]):
        yield ToolContext(settings, user_id="test", temporal_client=client)


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """A local backend with the sandbox `box` created, deleted afterwards."""
    local = LocalBackend(tmp_path / "sandboxes")
    await local.create("box", template="base", timeout=300, env={}, metadata={})
    try:
        yield local
    finally:
        await local.delete("box")
        await local.close()


def stored_chunks(url: str, kind: str, stream_id: str) -> list[tuple[str, str, bool]]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT stream, text, final FROM execution_output WHERE "
                "stream_kind = :kind AND stream_id = :sid ORDER BY id"
            ),
            {"kind": kind, "sid": stream_id},
        ).all()
    return [(row[0], row[1], bool(row[2])) for row in rows]


def joined(chunks: list[tuple[str, str, bool]], stream: str) -> str:
    return "".join(chunk_text for label, chunk_text, _ in chunks if label == stream)


async def read_until_final(
    ctx: ToolContext, subscription_id: str, timeout: float = 60
) -> list[tuple[float, dict[str, Any]]]:
    """Read a stream's events until its final chunk; each with its arrival."""
    received: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await call(
            ctx, "realtime_events", subscription_id=subscription_id, wait_ms=1000
        )
        received += [(time.monotonic(), event["new"]) for event in batch["events"]]
        if received and received[-1][1]["final"]:
            return received
    raise AssertionError(f"no final chunk within {timeout} s: {received}")


async def test_sandbox_stream_delivers_while_running(sandbox_ctx: ToolContext) -> None:
    created = await call(sandbox_ctx, "sandbox_create", template="python")
    sandbox_id = created["sandbox_id"]
    try:
        subscribed = await call(
            sandbox_ctx, "execution_stream_subscribe", sandbox_id=sandbox_id
        )
        code = (
            "import time\n"
            "for i in range(3):\n"
            "    print(f'line {i}', flush=True)\n"
            "    time.sleep(1.0)\n"
        )
        execution = asyncio.create_task(
            call(sandbox_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code)
        )
        received = await read_until_final(sandbox_ctx, subscribed["subscription_id"])
        result = await execution
        ended_at = received[-1][0]
        chunks = [new for _, new in received]

        assert result["stdout"] == "line 0\nline 1\nline 2\n"
        labels = [chunk["stream"] for chunk in chunks]
        assert labels[0] == "start"
        assert labels[-1] == "exit"
        assert set(labels[1:-1]) == {"stdout"}
        stdout_texts = [
            chunk["text"] for chunk in chunks if chunk["stream"] == "stdout"
        ]
        assert "".join(stdout_texts) == result["stdout"]
        assert len(stdout_texts) >= 2, "the lines came in one chunk, at the end"
        first_output_at = next(at for at, new in received if new["stream"] == "stdout")
        assert ended_at - first_output_at > 1.0, "no output came before the end"
        assert [chunk["final"] for chunk in chunks].count(True) == 1
        start = json.loads(chunks[0]["text"])
        assert start["run"] == 1
        assert start["call_id"].startswith("execute-")
        exit_event = json.loads(chunks[-1]["text"])
        assert exit_event["status"] == "completed"
        assert exit_event["exit_code"] == 0
        assert exit_event["call_id"] == start["call_id"]

        status = await call(
            sandbox_ctx,
            "execution_stream_status",
            subscription_id=subscribed["subscription_id"],
        )
        assert status["finished"] is True
        assert status["chunks"] == len(chunks)
        assert status["subscriptions"][0]["lag"] == 0
    finally:
        await call(sandbox_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_sandbox_stream_never_stores_secret(sandbox_ctx: ToolContext) -> None:
    url = sandbox_ctx.settings.effective_database_url
    created = await call(
        sandbox_ctx,
        "sandbox_create",
        template="python",
        env_vars={"SERVICE_TOKEN": SECRET},
    )
    sandbox_id = created["sandbox_id"]
    # The value whole, on both streams, and split by a pause longer than the
    # flush interval, so its halves would land in two writes.
    code = (
        "import os, sys, time\n"
        "value = os.environ['SERVICE_TOKEN']\n"
        "print('whole', value, flush=True)\n"
        "print('err', value, file=sys.stderr, flush=True)\n"
        "sys.stdout.write('split ' + value[:9])\n"
        "sys.stdout.flush()\n"
        "time.sleep(1.0)\n"
        "print(value[9:] + ' end', flush=True)\n"
    )
    try:
        result = await call(
            sandbox_ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code
        )
    finally:
        await call(sandbox_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    await wait_for_output_writes()
    chunks = stored_chunks(url, "sandbox", sandbox_id)

    assert result["stdout"] == "whole ********\nsplit ******** end\n"
    assert joined(chunks, "stdout") == result["stdout"]
    assert joined(chunks, "stderr") == result["stderr"]
    for _, chunk_text, _ in chunks:
        assert SECRET not in chunk_text
        assert SECRET[:9] not in chunk_text
        assert SECRET[9:] not in chunk_text
    with get_engine(url).connect() as connection:
        log = connection.execute(
            text(
                "SELECT record FROM realtime_changes "
                "WHERE table_name = 'execution_output'"
            )
        ).scalars()
        logged = " ".join(json.dumps(record) for record in log)
    assert "split" in logged
    assert SECRET[:9] not in logged
    assert SECRET[9:] not in logged


async def test_stream_matches_truncated_output(
    box: LocalBackend, database_url: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, sandbox_output_limit=8192)
    writer = OutputWriter(database_url, "sandbox", "sbx_big")
    stream = ExecutionStream(writer, [], "call-big")
    # One write beyond a row's size, then more than the output limit.
    code = "import sys; sys.stdout.write('x' * 6000); print('y' * 20000)"

    result = await runtime.execute(
        box, "box", ExecuteRequest(code=code), {}, settings, stream=stream
    )
    await wait_for_output_writes()
    chunks = stored_chunks(database_url, "sandbox", "sbx_big")

    assert result.stdout_dropped_bytes == 6000 + 20001 - 8192
    assert result.stdout.endswith("[output truncated: 17809 bytes dropped]")
    assert joined(chunks, "stdout") == result.stdout
    sizes = [len(chunk_text) for label, chunk_text, _ in chunks if label == "stdout"]
    assert len(sizes) == 3
    assert max(sizes) == MAX_CHUNK_CHARS
    assert chunks[-1][0] == "exit"
    assert chunks[-1][2] is True
    assert json.loads(chunks[-1][1])["stdout_dropped_bytes"] == 17809


async def test_failed_stream_write_keeps_result(
    box: LocalBackend,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def reject_write(*_args: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(realtime_output, "append_chunks", reject_write)
    writer = OutputWriter(database_url, "sandbox", "sbx_down", flush_interval=0.05)
    stream = ExecutionStream(writer, [], "call-down")
    code = "import time\nprint('a', flush=True)\ntime.sleep(0.3)\nprint('b')\n"

    with caplog.at_level(logging.WARNING, logger="app.realtime.output"):
        result = await runtime.execute(
            box,
            "box",
            ExecuteRequest(code=code),
            {},
            Settings(data_dir=tmp_path),
            stream=stream,
        )
        await wait_for_output_writes()

    assert result.status == "completed"
    assert result.stdout == "a\nb\n"
    assert stored_chunks(database_url, "sandbox", "sbx_down") == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sandbox sbx_down failed" in message for message in warnings)
    assert any("were not written" in message for message in warnings)
    assert len(warnings) == 2, warnings


async def test_call_made_again_appends_again(
    box: LocalBackend, database_url: str, tmp_path: Path
) -> None:
    """A call whose first start was cut short (as by a worker that died) runs
    its program again, and the stream shows both starts."""
    settings = Settings(data_dir=tmp_path)
    request = ExecuteRequest(
        code="import time\nprint('working', flush=True)\ntime.sleep(30)\n",
        call_id="call-again",
    )
    first = asyncio.create_task(
        runtime.execute(
            box,
            "box",
            request,
            {},
            settings,
            stream=ExecutionStream(
                OutputWriter(database_url, "sandbox", "sbx_again"), [], "call-again"
            ),
        )
    )
    deadline = time.monotonic() + 20
    while not joined(stored_chunks(database_url, "sandbox", "sbx_again"), "stdout"):
        assert time.monotonic() < deadline, "the first start wrote no output"
        await asyncio.sleep(0.1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    quick = request.model_copy(update={"code": "print('working')"})
    second = await runtime.execute(
        box,
        "box",
        quick,
        {},
        settings,
        stream=ExecutionStream(
            OutputWriter(database_url, "sandbox", "sbx_again"), [], "call-again"
        ),
    )
    await wait_for_output_writes()
    chunks = stored_chunks(database_url, "sandbox", "sbx_again")

    assert second.runs == 2
    assert [label for label, _, _ in chunks] == [
        "start",
        "stdout",
        "exit",
        "start",
        "stdout",
        "exit",
    ]
    assert [json.loads(chunks[i][1])["run"] for i in (0, 3)] == [1, 2]
    assert json.loads(chunks[2][1])["status"] == "cancelled"
    assert json.loads(chunks[5][1])["status"] == "completed"
    assert [final for _, _, final in chunks] == [False, False, True] * 2


async def test_cut_secret_masked_in_result_and_stream(
    box: LocalBackend, database_url: str, tmp_path: Path
) -> None:
    """Where the output limit cuts a secret, the start that was kept is masked
    in the result and in the stream, as the whole secret would be."""
    secret = "S3CAPWDsecret-7"
    settings = Settings(data_dir=tmp_path, sandbox_output_limit=8192)
    writer = OutputWriter(database_url, "sandbox", "sbx_cut")
    stream = ExecutionStream(writer, [secret], "call-cut")
    code = (
        "import os, sys\n"
        "sys.stdout.write('x' * (8192 - 10) + os.environ['DB_PASSWORD'] + '\\n')\n"
    )
    result = await runtime.execute(
        box,
        "box",
        ExecuteRequest(code=code),
        {"DB_PASSWORD": secret},
        settings,
        stream=stream,
    )
    await wait_for_output_writes()
    chunks = stored_chunks(database_url, "sandbox", "sbx_cut")
    assert result.stdout_dropped_bytes == len(secret) - 10 + 1
    assert result.stdout.endswith("x********\n[output truncated: 6 bytes dropped]")
    assert secret[:3] not in result.stdout
    assert joined(chunks, "stdout") == result.stdout


def test_cut_inside_character_of_secret_masked() -> None:
    """A cut inside a character of a secret leaves U+FFFD after its start;
    the start is masked all the same."""
    secret = "pässwörd-LONGSECRET-42"
    cut = "AAApässw\ufffd\n[output truncated: 18 bytes dropped]"
    assert runtime.redact(cut, [secret]) == (
        "AAA********\n[output truncated: 18 bytes dropped]"
    )
    first_cut = "AAA\ufffd\n[output truncated: 3 bytes dropped]"
    assert runtime.redact(first_cut, ["ösecret-value"]).startswith("AAA********")
    # Output cut inside an unrelated character keeps its replacement.
    assert runtime.redact(first_cut, ["plain-secret"]) == first_cut


def test_redactor_matches_redact_on_any_split() -> None:
    secrets = ["abcd", "bcde", "aaaa", "abcdabcd", "cdXY", "dabc", "ab"]
    rng = random.Random(7)
    for _ in range(5000):
        chosen = rng.sample(secrets, rng.randint(1, 4))
        whole = "".join(rng.choice("abcdXY ") for _ in range(rng.randint(0, 40)))
        redactor = StreamRedactor(chosen)
        pieces = []
        start = 0
        while start < len(whole):
            end = start + rng.randint(1, 6)
            pieces.append(redactor.push(whole[start:end]))
            start = end
        pieces.append(redactor.finish())
        assert "".join(pieces) == runtime.redact(whole, chosen), (chosen, whole)


def test_redactor_masks_secret_lines_on_any_split() -> None:
    """The lines of a multi-line secret are masked however the stream splits
    them, as `redact` masks them in the whole text."""
    secret = "abcdXYab\ncdcdXYXY\r\nab"
    rng = random.Random(11)
    for _ in range(3000):
        parts = ["abcdXYab", "cdcdXYXY", secret, "ab", "\n", " ", "cd"]
        whole = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        redactor = StreamRedactor([secret])
        pieces = []
        start = 0
        while start < len(whole):
            end = start + rng.randint(1, 6)
            pieces.append(redactor.push(whole[start:end]))
            start = end
        pieces.append(redactor.finish())
        streamed = "".join(pieces)
        assert streamed == runtime.redact(whole, [secret]), whole
        assert "abcdXYab" not in streamed, whole
        assert "cdcdXYXY" not in streamed, whole


async def subscribe_execution(ctx: ToolContext, execution_id: str) -> dict[str, Any]:
    """Subscribe at once, before the run's first activity records it: the
    run exists in Temporal, which is enough."""
    return await call(ctx, "execution_stream_subscribe", execution_id=execution_id)


async def test_workflow_stream_shows_steps_and_end(
    client: Client, settings: Settings
) -> None:
    ctx = ToolContext(settings, user_id="test", temporal_client=client)
    async with running_workers(client, settings):
        created = await call(
            ctx,
            "workflow_create",
            name="streamed",
            steps=[
                {"name": "first", "type": "echo", "params": {"n": 1}},
                {
                    "name": "save",
                    "type": "storage",
                    "depends_on": ["first"],
                    "params": {
                        "operation": "put",
                        "bucket": "streams",
                        "path": "a.txt",
                        "content": "x" * 3000,
                    },
                },
                {
                    "name": "missing",
                    "type": "storage",
                    "depends_on": ["save"],
                    "params": {"operation": "get", "bucket": "streams", "path": "b"},
                },
                {"name": "after", "type": "echo", "depends_on": ["missing"]},
            ],
        )
        ran = await call(ctx, "workflow_execute", workflow_id=created["workflow_id"])
        subscribed = await subscribe_execution(ctx, ran["execution_id"])
        received = await read_until_final(ctx, subscribed["subscription_id"])
        status = await call(
            ctx, "execution_stream_status", execution_id=ran["execution_id"]
        )
    chunks = [new for _, new in received]
    events = [json.loads(chunk["text"]) for chunk in chunks]

    assert [(e["event"], e.get("step")) for e in events] == [
        ("execution.started", None),
        ("step.running", "first"),
        ("step.completed", "first"),
        ("step.running", "save"),
        ("step.completed", "save"),
        ("step.running", "missing"),
        ("step.failed", "missing"),
        ("step.skipped", "after"),
        ("execution.failed", None),
    ]
    assert [chunk["stream"] for chunk in chunks] == ["execution"] + ["step"] * 7 + [
        "execution"
    ]
    assert [chunk["final"] for chunk in chunks] == [False] * 8 + [True]
    assert json.loads(events[2]["output_summary"]) == {"n": 1}
    assert events[4]["output_summary"].startswith('{"bucket": "streams"')
    assert "not found" in events[6]["error"]
    assert events[6]["attempt"] == 1
    assert "missing" in events[8]["error"]
    assert status["finished"] is True
    assert status["chunks"] == 9
