"""`python -m app mcp` driven line by line over pipes: lines the SDK cannot
parse, and stdin closing while a call runs.

The tools called here (audit_log, storage) need no Temporal, so no worker
runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from app.api import stdio
from app.services.audit import list_calls
from app.settings import Settings
from app.storage.local import storage_for
from tests.api.conftest import REPO_ROOT, server_env
from tests.conftest import TEST_ENCRYPTION_KEY

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        # Nothing listens there; no tool called here connects to Temporal.
        temporal_address="127.0.0.1:1",
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
    )


def start_server(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "mcp"],
        cwd=REPO_ROOT,
        env=server_env(settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def responses(stdout: bytes) -> dict[Any, dict[str, Any]]:
    parsed = [json.loads(text) for text in stdout.splitlines()]
    return {message.get("id"): message for message in parsed}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lone_surrogate_line_answered(settings: Settings) -> None:
    call = (
        b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":'
        b'"audit_log","arguments":{"tool":"\\ud800"}}}\n'
    )
    ping = line({"jsonrpc": "2.0", "id": 4, "method": "ping"})
    process = start_server(settings)
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + call + ping, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    by_id = responses(stdout)
    error = by_id[3]["error"]
    assert error["code"] == -32700
    assert "params.arguments.tool" in error["message"]
    assert "lone UTF-16 surrogate" in error["message"]
    assert "line 1 column" in error["message"]
    assert error["data"]["errors"][0]["field"] == "params.arguments.tool"
    assert by_id[4]["result"] == {}
    events = list_calls(settings.effective_database_url, tool="mcp")
    assert len(events) == 1
    assert events[0].outcome == "error"
    assert events[0].error is not None
    assert events[0].error.startswith("rejected with -32700: ")
    assert "params.arguments.tool" in events[0].error


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_invalid_lines_answered(settings: Settings) -> None:
    sent = b"not json\n" + b'{"jsonrpc":"2.0","id":5,"method":"ping"' + b"\n"
    sent += b'{"jsonrpc":"2.0","id":"\xff","method":"ping"}\n'
    sent += line({"id": 6, "method": "ping"})
    sent += line({"jsonrpc": "2.0", "id": 7, "method": "ping"})
    process = start_server(settings)
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + b"\n" + sent, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    answered = [json.loads(text) for text in stdout.splitlines()]
    # Each line got exactly one response, in order; the blank line none.
    assert len(answered) == 6
    not_json, truncated, not_utf8, not_jsonrpc = answered[1:5]
    assert not_json["id"] is None
    assert not_json["error"]["code"] == -32700
    assert "line 1 column 1" in not_json["error"]["message"]
    assert truncated["id"] is None
    assert truncated["error"]["code"] == -32700
    assert not_utf8["error"]["code"] == -32700
    assert "not valid UTF-8" in not_utf8["error"]["message"]
    assert not_jsonrpc["id"] == 6
    assert not_jsonrpc["error"]["code"] == -32600
    assert answered[5] == {"jsonrpc": "2.0", "id": 7, "result": {}}
    events = list_calls(settings.effective_database_url, tool="mcp")
    assert len(events) == 4
    assert all(event.outcome == "error" for event in events)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_call_in_flight_finishes_at_eof(settings: Settings) -> None:
    upload = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {
            "name": "storage_upload",
            "arguments": {
                "bucket": "tst-bucket",
                "path": "eof-test.txt",
                "content": "written?",
            },
        },
    }
    process = start_server(settings)
    # communicate() closes stdin right after the call, while it runs.
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + line(upload), timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    result = responses(stdout)[3]["result"]
    assert result["isError"] is False
    assert result["structuredContent"]["size"] == len("written?")
    stored = storage_for(settings).get("tst-bucket", "eof-test.txt")
    assert stored == b"written?"
    events = list_calls(settings.effective_database_url, tool="storage_upload")
    assert [event.outcome for event in events] == ["success"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_call_finishes_after_stdout_closed(settings: Settings) -> None:
    upload = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {
            "name": "storage_upload",
            "arguments": {"bucket": "tst-bucket", "path": "gone.txt", "content": "x"},
        },
    }
    process = start_server(settings)
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + line(upload), timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    assert storage_for(settings).get("tst-bucket", "gone.txt") == b"x"
    events = list_calls(settings.effective_database_url, tool="storage_upload")
    assert [event.outcome for event in events] == ["success"]


async def test_unanswered_request_stops_after_drain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A request the server never answers must not keep the transport open
    # forever once stdin has closed.
    monkeypatch.setattr(stdio, "EOF_DRAIN_SECONDS", 0.2)
    ping = line({"jsonrpc": "2.0", "id": 7, "method": "ping"})
    wire_in = io.BytesIO(ping)
    wire_out = io.BytesIO()
    audit = stdio._RejectionAudit("sqlite:///unused.db", "test")
    received = []
    with anyio.fail_after(30):
        async with stdio.stdio_transport(wire_in, wire_out, audit) as (read, _):
            async for message in read:
                received.append(message)
    assert len(received) == 1
    assert "1 request(s) are still running" in caplog.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_invalid_params_name_the_field(settings: Settings) -> None:
    secret = "sk-ant-not-to-be-repeated"
    calls = [
        {"name": "audit_log", "arguments": [secret]},
        {"arguments": {}},
        "audit_log",
    ]
    sent = b"".join(
        line({"jsonrpc": "2.0", "id": 10 + index, "method": "tools/call", "params": p})
        for index, p in enumerate(calls)
    )
    process = start_server(settings)
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + sent, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    answered = responses(stdout)
    array, missing, not_object = (answered[10 + index]["error"] for index in range(3))
    assert array["code"] == -32602
    assert "params.arguments: a JSON array is invalid" in array["message"]
    assert '{"name": TOOL, "arguments": {...}}' in array["message"]
    assert array["data"]["errors"][0]["field"] == "params.arguments"
    assert secret not in stdout.decode() + stderr.decode()
    assert missing["code"] == -32602
    assert "params.name: it is missing" in missing["message"]
    audited = [
        event.error or ""
        for event in list_calls(settings.effective_database_url, tool="mcp")
    ]
    assert any(
        error.startswith("rejected with -32602: Invalid params of tools/call: ")
        and "params.arguments" in error
        for error in audited
    ), audited
    assert not any(secret in error for error in audited)
    # JSON-RPC itself requires params to be an object or an array.
    assert not_object["code"] == -32600
    assert '"params": {...}' in not_object["message"]


def test_fresh_data_folder_gets_its_tables(tmp_path: Path) -> None:
    """`nexus mcp` and `nexus call` on a data folder that `nexus up` never
    opened create the tables before the first tool reads them."""
    for command in ("mcp", "call"):
        fresh = Settings(
            data_dir=tmp_path / command,
            temporal_address="127.0.0.1:1",
            encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
        )
        argv = [sys.executable, "-m", "app", command]
        sent = b""
        if command == "call":
            argv += ["storage_list", '{"bucket": "fresh"}']
        else:
            call = {"name": "storage_list", "arguments": {"bucket": "fresh"}}
            sent = line(INITIALIZE) + line(INITIALIZED)
            sent += line(
                {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}
            )
        process = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=server_env(fresh),
            input=sent,
            capture_output=True,
            timeout=60,
        )
        assert process.returncode == 0, process.stderr.decode()
        if command == "call":
            result = json.loads(process.stdout)
        else:
            reply = responses(process.stdout)[2]["result"]
            assert not reply.get("isError"), reply
            result = reply["structuredContent"]
        assert result["count"] == 0, result


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_deep_nesting_answered_and_log_readable(settings: Settings) -> None:
    """Over stdio the whole line is checked; through `nexus tool` the tool
    layer rejects the arguments, and the audit log keeps 64 levels."""
    too_deep = (
        b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":'
        b'"audit_log","arguments":{"tool":' + b"[" * 450 + b"]" * 450 + b"}}}\n"
    )
    # Beyond orjson's limit of 1024 levels.
    deeper = too_deep.replace(b'"id":2', b'"id":4').replace(b"[" * 450, b"[" * 2000)
    deeper = deeper.replace(b"]" * 450, b"]" * 2000)
    ping = line({"jsonrpc": "2.0", "id": 3, "method": "ping"})
    process = start_server(settings)
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + too_deep + deeper + ping, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    answered = responses(stdout)
    assert answered[2]["error"]["code"] == -32700
    assert "more than 64 levels deep" in answered[2]["error"]["message"]
    assert answered[4]["error"]["code"] == -32700
    assert "more than 64 levels deep" in answered[4]["error"]["message"]
    field = answered[4]["error"]["data"]["errors"][0]["field"]
    assert field.startswith("params.arguments.tool.0.0")
    assert answered[3] == {"jsonrpc": "2.0", "id": 3, "result": {}}

    # `nexus call` parses its JSON as strictly as stdio does, but a JSON
    # object option of `nexus tool` reaches the tool layer, which rejects it.
    too_deep_data = '{"a": ' + "[" * 70 + "]" * 70 + "}"
    called = subprocess.run(
        [
            *(sys.executable, "-m", "app", "tool", "workflow_execute"),
            *("--workflow-id", "wf_absent", "--input-data", too_deep_data),
        ],
        cwd=REPO_ROOT,
        env=server_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 1
    assert "more than 64 levels deep" in called.stderr
    stored = list_calls(
        settings.effective_database_url, tool="workflow_execute", limit=1
    )[0]
    value = stored.arguments["input_data"]["a"]
    for _ in range(62):
        value = value[0]
    assert value == "[nested deeper than 64 levels]"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_wrong_version_and_repeated_keys_named(settings: Settings) -> None:
    old = b'{"jsonrpc":"1.0","id":8,"method":"ping"}\n'
    repeated = b'{"jsonrpc":"2.0","id":9,"method":"ping","id":10}\n'
    process = start_server(settings)
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + old + repeated, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    answered = [json.loads(text) for text in stdout.splitlines()]
    version, twice = answered[1]["error"], answered[2]["error"]
    assert version["code"] == -32600
    assert "jsonrpc: '1.0' is invalid: send \"2.0\"" in version["message"]
    assert "pydantic" not in version["message"]
    assert twice["code"] == -32700
    assert "the key 'id' appears more than once" in twice["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_invalid_request_ids_answered(settings: Settings) -> None:
    invalid_ids: list[Any] = [True, {"a": 1}, None, 1.5, [1]]
    sent = b"".join(
        line({"jsonrpc": "2.0", "id": request_id, "method": "tools/list"})
        for request_id in invalid_ids
    )
    upload = {
        "name": "storage_upload",
        "arguments": {"bucket": "stdio-ids", "path": "a.txt", "content": "hi"},
    }
    sent += line(
        {"jsonrpc": "2.0", "id": 8.5, "method": "tools/call", "params": upload}
    )
    sent += line({"jsonrpc": "2.0", "id": "ok", "method": "ping"})
    process = start_server(settings)
    stdout, stderr = process.communicate(
        line(INITIALIZE) + line(INITIALIZED) + sent, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    answered = [json.loads(text) for text in stdout.splitlines()]
    # The initialize response, one error per invalid id, then the ping.
    assert len(answered) == 1 + len(invalid_ids) + 2, answered
    for rejected in answered[1:-1]:
        assert rejected["id"] is None
        assert rejected["error"]["code"] == -32600
        assert rejected["error"]["message"].startswith("Invalid request: id: ")
    assert answered[-1] == {"jsonrpc": "2.0", "id": "ok", "result": {}}
    assert storage_for(settings).list("stdio-ids") == []
    events = list_calls(settings.effective_database_url, tool="mcp")
    assert len(events) == len(invalid_ids) + 1
    for event in events:
        assert (event.error or "").startswith("rejected with -32600: id: ")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_request_before_initialize_explained(settings: Settings) -> None:
    early = line({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    ping = line({"jsonrpc": "2.0", "id": 2, "method": "ping"})
    later = line({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    initialize = line({**INITIALIZE, "id": 4})
    process = start_server(settings)
    stdout, stderr = process.communicate(
        early + ping + initialize + line(INITIALIZED) + later, timeout=60
    )
    assert process.returncode == 0, stderr.decode()
    by_id = responses(stdout)
    error = by_id[1]["error"]
    assert error["code"] == -32602
    assert error["message"].startswith("tools/list was sent before initialize: ")
    assert "send an initialize request first" in error["message"]
    assert by_id[2]["result"] == {}
    assert by_id[3]["result"]["tools"]
    [event] = list_calls(settings.effective_database_url, tool="mcp")
    assert (event.error or "").startswith(
        "rejected with -32602: tools/list was sent before initialize"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("closed_fd, name", [(0, "stdin"), (1, "stdout")])
def test_closed_standard_stream_one_line_error(
    settings: Settings, closed_fd: int, name: str
) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "app", "mcp"],
        cwd=REPO_ROOT,
        env=server_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Runs in the child after its pipes are set up, as `nexus mcp <&-`.
        preexec_fn=lambda: os.close(closed_fd),
        timeout=60,
    )
    stderr = finished.stderr.decode()
    assert finished.returncode == 2, stderr
    assert stderr.startswith(f"error: {name} is closed; ")
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
