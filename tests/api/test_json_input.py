"""Request bodies that Python's json module accepts but JSON does not allow
(lone surrogates, NaN, 1e400), stored rows that hold such values, and the
shapes of `/mcp` plain calls, against a real uvicorn server.

The tools called here (audit_log, realtime) need no Temporal, so the server
runs without workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from app.api.http import create_app
from app.api.keys import create_key
from app.realtime.service import create_subscription, get_subscription, log_head
from app.settings import Settings
from tests.api.conftest import ApiServer
from tests.conftest import TEST_ENCRYPTION_KEY
from tests.realtime.helpers import insert_audit_row_with_lone_surrogate
from tests.support.servers import ThreadedServer, free_port

JSONRPC_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
}


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        # Nothing listens there; no tool called here connects to Temporal.
        temporal_address="127.0.0.1:1",
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
        api_rate_limit=10_000,
        api_rate_burst=10_000,
    )
    token, info = create_key(database_url, "json-tests")
    port = free_port()
    with ThreadedServer(create_app(settings), port):
        yield ApiServer(f"http://127.0.0.1:{port}", settings, token, info.id)


async def send(
    server: ApiServer,
    path: str,
    content: str | bytes,
    headers: dict[str, str] | None = None,
    token: str | None = None,
) -> httpx.Response:
    """POST `content` as it is, so the test controls every byte of the body."""
    sent = {"Authorization": f"Bearer {token or server.token}", **(headers or {})}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        return await http.post(path, content=content, headers=sent)


async def audit_log(server: ApiServer, limit: int = 20) -> list[dict]:
    response = await send(server, "/api/tools/audit_log", f'{{"limit": {limit}}}')
    assert response.status_code == 200, response.text
    return response.json()["events"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_lone_surrogate_rejected_up_front(server: ApiServer) -> None:
    response = await send(server, "/api/tools/audit_log", '{"user_id":"\\ud800"}')
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["kind"] == "invalid_argument"
    assert "lone UTF-16 surrogate" in error["message"]
    assert "line 1 column" in error["message"]
    assert error["errors"][0]["field"] == "user_id"
    assert error["errors"][0]["value"] == '"\\ud800"'
    events = await audit_log(server)
    rejected = [e for e in events if e["outcome"] == "error"]
    assert rejected[0]["tool"] == "audit_log"
    assert "rejected with 422" in rejected[0]["error"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_lone_surrogate_from_other_group_key(
    server: ApiServer, database_url: str
) -> None:
    token, _ = create_key(database_url, "realtime-only", ["realtime"])
    response = await send(
        server, "/api/tools/audit_log", '{"user_id":"\\ud800"}', token=token
    )
    assert response.status_code == 422, response.text
    for event in await audit_log(server):
        assert "\ud800" not in orjson.dumps(event).decode()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stored_lone_surrogate_still_served(
    server: ApiServer, database_url: str
) -> None:
    insert_audit_row_with_lone_surrogate(database_url, "older-server")
    events = await audit_log(server)
    stored = next(e for e in events if e["user_id"] == "older-server")
    assert stored["arguments"] == {"user_id": "\ufffd"}
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "audit_log", "arguments": {"limit": 20}},
    }
    response = await send(server, "/mcp", orjson.dumps(call), JSONRPC_HEADERS)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert not result.get("isError"), result
    events = result["structuredContent"]["events"]
    stored = next(e for e in events if e["user_id"] == "older-server")
    assert stored["arguments"] == {"user_id": "\ufffd"}


NON_FINITE = [("1e400", "1e400"), ("NaN", "NaN"), ("-Infinity", "-Infinity")]


@pytest.mark.parametrize("number, shown", NON_FINITE)
async def test_non_finite_number_is_422(
    server: ApiServer, number: str, shown: str
) -> None:
    response = await send(server, "/api/tools/audit_log", f'{{"limit":{number}}}')
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["errors"][0]["field"] == "limit"
    assert error["errors"][0]["value"] == shown
    assert "send a finite number" in error["message"]
    plain = await send(
        server, "/mcp", f'{{"tool": "audit_log", "args": {{"limit": {number}}}}}'
    )
    assert plain.status_code == 422, plain.text
    assert plain.json()["error"]["errors"][0]["field"] == "args.limit"
    # The rejections are in the audit log, on PostgreSQL too.
    rejected = [e for e in await audit_log(server) if e["outcome"] == "error"]
    assert [e["tool"] for e in rejected[:2]] == ["mcp", "audit_log"]
    assert all(shown in e["error"] for e in rejected[:2])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_jsonrpc_with_nan_is_parse_error(server: ApiServer) -> None:
    body = (
        '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": '
        '{"name": "audit_log", "arguments": {"limit": NaN}}}'
    )
    response = await send(server, "/mcp", body, JSONRPC_HEADERS)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32700
    assert "params.arguments.limit: NaN" in error["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_integer_beyond_64_bits_stays_exact(server: ApiServer) -> None:
    response = await send(
        server, "/api/tools/audit_log", '{"limit": 18446744073709551616}'
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]["errors"][0]
    assert error["field"] == "limit"
    assert error["value"] == 18446744073709551616
    assert "less than or equal to 1000" in error["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "body, field, expected",
    [
        ("{}", "tool", "tool: missing"),
        ('"hello"', "body", "must be a JSON object, not a JSON string"),
        ("3", "body", "must be a JSON object, not a JSON number"),
        ('{"args": {"limit": 1}}', "tool", "tool: missing"),
        ('{"tool": "audit_log", "x": 1}', "x", "x: not a field of a plain call"),
    ],
)
async def test_plain_call_shape_errors(
    server: ApiServer, body: str, field: str, expected: str
) -> None:
    response = await send(server, "/mcp", body, {"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["kind"] == "invalid_argument"
    assert expected in error["message"]
    assert error["errors"][0]["field"] == field
    assert '{"tool": NAME, "args": {...}}' in error["message"]
    assert "pydantic" not in error["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_ack_reads_json_of_any_content_type(
    server: ApiServer, database_url: str
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    missing = await send(
        server, "/realtime/v1/subscriptions/sub_nope/ack", '{"cursor": 1}', form
    )
    assert missing.status_code == 404, missing.text
    sub = create_subscription(
        database_url,
        "audit_log",
        from_start=True,
        user_id="key:json-tests",
        key_id=server.key_id,
    )
    for _ in range(3):  # each call's audit row is a change in the log
        await audit_log(server)
    assert log_head(database_url) >= 2
    path = f"/realtime/v1/subscriptions/{sub.subscription_id}/ack"
    acked = await send(server, path, '{"cursor": 1}', form)
    assert acked.status_code == 200, acked.text
    assert acked.json()["cursor"] == 1
    untyped = await send(server, path, '{"cursor": 2}')
    assert untyped.status_code == 200, untyped.text
    assert get_subscription(database_url, sub.subscription_id).cursor == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "body, field, text",
    [
        ('{"cursor": 1e400}', "body.cursor", "1e400 is beyond the range"),
        ('{"cursor": NaN}', "body.cursor", "NaN is not a JSON number"),
        ('{"cursor": -1}', "body.cursor", "greater than or equal to 0"),
        ('{"cursor": 1, "extra": 2}', "body.extra", "Extra inputs"),
        ('{"cursor": true}', "body.cursor", "Input should be a valid integer"),
        ('{"cursor": "5"}', "body.cursor", "Input should be a valid integer"),
        ("", "body.cursor", "Field required"),
    ],
)
async def test_ack_invalid_body_is_422(
    server: ApiServer, body: str, field: str, text: str
) -> None:
    response = await send(server, "/realtime/v1/subscriptions/sub_nope/ack", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["kind"] == "invalid_argument"
    assert error["errors"][0]["field"] == field
    assert text in error["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_events_with_stored_lone_surrogate(
    server: ApiServer, database_url: str
) -> None:
    sub = create_subscription(
        database_url,
        "audit_log",
        filter_text="user_id=in.(older-server,older-server-2)",
        user_id="key:json-tests",
        key_id=server.key_id,
    )
    insert_audit_row_with_lone_surrogate(database_url, "older-server")
    insert_audit_row_with_lone_surrogate(database_url, "older-server-2")
    arguments = f'{{"subscription_id": "{sub.subscription_id}"}}'
    response = await send(server, "/api/tools/realtime_events", arguments)
    assert response.status_code == 200, response.text
    events = response.json()["events"]
    assert [e["new"]["user_id"] for e in events] == ["older-server", "older-server-2"]
    assert events[0]["new"]["arguments"] == {"user_id": "\ufffd"}
    stored = get_subscription(database_url, sub.subscription_id)
    assert stored.cursor == events[-1]["id"]
    assert stored.delivered == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_mcp_rejections_audited(server: ApiServer) -> None:
    plain = {"Content-Type": "application/json"}
    deep = '{"jsonrpc": "2.0", "params": ' + "[" * 5000 + "]" * 5000 + "}"
    too_large = b'{"tool": "' + b"x" * server.settings.api_max_body_bytes + b'"}'
    requests = [
        ('{"tool": "audit_log", "limit": 1}', plain, 422),
        ("{}", plain, 422),
        ('"hello"', plain, 422),
        ('{"tool": 5}', plain, 422),
        ('{"tool": {"password": "hunter2"}}', plain, 422),
        ('{"tool": "audit_log", "args": "hunter2"}', plain, 422),
        ('{"tool": "audit_log", "args": [1]}', plain, 422),
        ('{"jsonrpc": "2.0", "id": 1,', JSONRPC_HEADERS, "400, JSON-RPC -32700"),
        (deep, JSONRPC_HEADERS, "400, JSON-RPC -32700"),
        (
            '{"jsonrpc": "1.0", "id": 1, "method": "ping"}',
            JSONRPC_HEADERS,
            "400, JSON-RPC -32600",
        ),
        (too_large, plain, 413),
    ]
    for body, headers, status in requests:
        response = await send(server, "/mcp", body, headers)
        assert response.status_code == int(str(status)[:3]), (body, response.text)
        assert "hunter2" not in response.text
    events = await audit_log(server, limit=len(requests) + 1)
    rejected = [event for event in events if event["outcome"] == "error"]
    assert len(rejected) == len(requests)
    # The newest event comes first.
    for event, (_, _, status) in zip(rejected, reversed(requests), strict=True):
        assert event["tool"] == "mcp"
        assert event["error"].startswith(f"rejected with {status}: "), event
        assert event["arguments"] == {}
        assert "hunter2" not in event["error"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_mcp_get_and_delete_405(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        for method in ("GET", "DELETE"):
            response = await http.request(
                method,
                "/mcp",
                headers={**server.headers, "Accept": "text/event-stream"},
            )
            assert response.status_code == 405, response.text
            assert response.headers["allow"] == "POST"
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert error["kind"] == "method_not_allowed"
            assert "stateless" in error["message"]
        without_key = await http.get("/mcp")
        assert without_key.status_code == 401, without_key.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_health_head_without_body(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        get = await http.get("/health")
        head = await http.head("/health")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == str(len(get.content))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "body, value, expected",
    [
        ("[1]", "array", "must be a JSON object of arguments, not a JSON array"),
        ('{"limit": 1', None, "line 1 column"),
    ],
)
async def test_tool_body_errors_name_body(
    server: ApiServer, body: str, value: str | None, expected: str
) -> None:
    response = await send(server, "/api/tools/audit_log", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert expected in error["message"]
    [detail] = error["errors"]
    assert detail["field"] == "body"
    assert detail["value"] == value


def nested(levels: int) -> str:
    """An argument `user_id` whose value is `levels` arrays inside each other."""
    return '{"user_id": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_deep_nesting_rejected_with_json_error(server: ApiServer) -> None:
    for levels in (70, 450, 5000):
        for path in ("/api/tools/audit_log", "/mcp"):
            body = nested(levels)
            if path == "/mcp":
                body = '{"tool": "audit_log", "args": ' + body + "}"
            response = await send(
                server, path, body, {"Content-Type": "application/json"}
            )
            # Beyond orjson's limit of 1024 levels too, the body is still
            # read as a plain call and the path is named.
            assert response.status_code == 422, (levels, path, response.text)
            error = response.json()["error"]
            assert "nested more than 64 levels deep" in error["message"], error
            assert error["errors"][0]["field"].startswith(
                "user_id.0.0" if path != "/mcp" else "args.user_id.0"
            )
    # Each rejection is audited, and the log still reads back.
    events = await audit_log(server, limit=6)
    assert len(events) == 6
    assert all(event["outcome"] == "error" for event in events)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_long_invalid_value_described_not_echoed(server: ApiServer) -> None:
    body = '{"user_id": [' + ",".join(["1234567890"] * 80_000) + "]}"
    response = await send(server, "/api/tools/audit_log", body)
    assert response.status_code == 422
    assert len(response.content) < 5000
    error = response.json()["error"]
    assert error["errors"][0]["value"] == (
        "(a JSON array of 80000 items, 880001 bytes)"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_jsonrpc_version_named_on_mcp(server: ApiServer) -> None:
    body = '{"jsonrpc": "1.0", "id": 1, "method": "tools/list"}'
    response = await send(server, "/mcp", body, JSONRPC_HEADERS)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32600
    assert error["message"].startswith("Invalid request: jsonrpc: '1.0' is invalid")
    assert "errors.pydantic.dev" not in response.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_mcp_invalid_request_keeps_id(server: ApiServer) -> None:
    old_version = '{"jsonrpc": "1.0", "id": 7, "method": "tools/list"}'
    response = await send(server, "/mcp", old_version, JSONRPC_HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600
    assert response.json()["id"] == 7

    listing = '{"jsonrpc": "2.0", "id": "list-1", "method": "tools/list"}'
    plain_text = {**JSONRPC_HEADERS, "Content-Type": "text/plain"}
    response = await send(server, "/mcp", listing, plain_text)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600
    assert response.json()["id"] == "list-1"

    no_json = {**JSONRPC_HEADERS, "Accept": "text/event-stream"}
    response = await send(server, "/mcp", listing, no_json)
    assert response.status_code == 406
    assert response.json()["id"] == "list-1"

    # A parse error keeps the id null, although the lenient reading shows one.
    with_nan = (
        '{"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": '
        '{"name": "audit_log", "arguments": {"limit": NaN}}}'
    )
    response = await send(server, "/mcp", with_nan, JSONRPC_HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32700
    assert response.json()["id"] is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_jsonrpc_object_id_rejected(server: ApiServer) -> None:
    """An id that is an object would make the request a notification that
    runs nothing and gets 202; it is rejected, naming the field."""
    body = (
        '{"jsonrpc": "2.0", "id": {"x": "1"}, "method": "tools/call", '
        '"params": {"name": "system_health", "arguments": {}}}'
    )
    response = await send(server, "/mcp", body, JSONRPC_HEADERS)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == -32600
    assert error["message"].startswith("Invalid request: id: a JSON object is invalid")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_repeated_nested_key_named_by_path(server: ApiServer) -> None:
    body = '{"limit": 5, "tool": "x", "user_id": null, "meta": {"A": "x", "A": "y"}}'
    response = await send(server, "/api/tools/audit_log", body)
    assert response.status_code == 422
    assert response.json()["error"]["errors"][0]["field"] == "meta.A"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_query_string_on_tool_route_rejected(server: ApiServer) -> None:
    response = await send(server, "/api/tools/audit_log?limit=3&tool=x", b"")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["errors"][0]["field"] == "query"
    assert "the query string (limit, tool) is not read" in error["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_repeated_key_blames_its_own_object(server: ApiServer) -> None:
    body = '{"meta": {"A": "x"}, "user_id": {"B": 0, "A": 1, "A": 2}}'
    response = await send(server, "/api/tools/audit_log", body)
    assert response.status_code == 422
    assert response.json()["error"]["errors"][0]["field"] == "user_id.A"
