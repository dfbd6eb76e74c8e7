"""The HTTP API against a real uvicorn server: tools, errors, keys, limits."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import httpx
import pytest
from fastapi import HTTPException

from app.api.http import create_app
from app.api.keys import revoke_key, rotate_key
from app.realtime.service import create_subscription, get_subscription
from app.services.audit import list_calls
from app.tools import all_tools
from tests.api.conftest import ApiServer
from tests.api.examples import one_call_per_group


async def post(
    server: ApiServer, path: str, body: object = None, token: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or server.token}"}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        return await http.post(path, json=body, headers=headers)


async def audit_events(server: ApiServer, **filters: object) -> list[dict]:
    """Return audit events through the audit_log tool, which first waits for
    the server's queued events to be written."""
    response = await post(server, "/api/tools/audit_log", {"limit": 100, **filters})
    assert response.status_code == 200, response.text
    return response.json()["events"]


async def test_openapi_one_operation_per_tool(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        schema = (await http.get("/openapi.json")).json()
    for spec in all_tools():
        operation = schema["paths"][f"/api/tools/{spec.name}"]["post"]
        assert operation["operationId"] == spec.name
        body_ref = operation["requestBody"]["content"]["application/json"]["schema"]
        name = body_ref["$ref"].rsplit("/", 1)[1]
        assert name in schema["components"]["schemas"]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].endswith(spec.result_model.__name__)
        assert "422" in operation["responses"]


async def test_openapi_signed_url_route(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        schema = (await http.get("/openapi.json")).json()
    operation = schema["paths"]["/storage/v1/object/sign/{bucket}/{path}"]["get"]
    # The signature in the URL is the credential, not the bearer key.
    assert operation["security"] == []
    responses = operation["responses"]
    assert "application/octet-stream" in responses["200"]["content"]
    for status in ("400", "403", "404", "422"):
        body = responses[status]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorBody"}, status

    # The 422 that the schema documents has that shape.
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        unsigned = await http.get("/storage/v1/object/sign/reports/a.txt")
    assert unsigned.status_code == 422
    assert unsigned.json()["error"]["kind"] == "invalid_argument"


async def test_health_needs_no_key(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    assert response.json()["tools"] == len(all_tools())


async def test_unknown_route_uses_error_body(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        # The signed-URL route does not match a path with a line break.
        unmatched = await http.get(
            "/storage/v1/object/sign/reports/nl%0Ax.txt",
            params={"expires": 1, "signature": "0" * 64},
        )
        nowhere = await http.get("/nowhere", headers=api_server.headers)
        wrong_method = await http.get(
            "/api/tools/audit_log", headers=api_server.headers
        )
    assert unmatched.status_code == 404, unmatched.text
    error = unmatched.json()["error"]
    assert error["kind"] == "not_found"
    assert "GET '/storage/v1/object/sign/reports/nl\\nx.txt'" in error["message"]
    assert nowhere.status_code == 404, nowhere.text
    assert nowhere.json()["error"]["kind"] == "not_found"
    assert "POST /api/tools/TOOL" in nowhere.json()["error"]["message"]
    assert wrong_method.status_code == 405, wrong_method.text
    error = wrong_method.json()["error"]
    assert error["kind"] == "method_not_allowed"
    assert error["message"] == (
        "method GET is not allowed on '/api/tools/audit_log'; use POST"
    )


async def test_every_group_end_to_end(api_server: ApiServer) -> None:
    for group, (name, arguments) in one_call_per_group().items():
        response = await post(api_server, f"/api/tools/{name}", arguments)
        assert response.status_code == 200, (group, response.text)
        spec = next(spec for spec in all_tools() if spec.name == name)
        spec.result_model.model_validate(response.json())


async def test_system_health_reads_live_workers(api_server: ApiServer) -> None:
    response = await post(api_server, "/api/tools/system_health", {})
    assert response.status_code == 200
    report = response.json()
    assert report["temporal"]["status"] == "healthy"
    assert report["database"]["status"] == "healthy"


async def test_invalid_arguments_name_field(api_server: ApiServer) -> None:
    response = await post(api_server, "/api/tools/audit_log", {"limit": 0})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["kind"] == "invalid_argument"
    assert error["errors"][0]["field"] == "limit"
    assert error["errors"][0]["value"] == 0
    assert "greater than or equal to 1" in error["errors"][0]["message"]
    assert "limit: 0" in error["message"]


async def test_cross_field_error_names_fields(api_server: ApiServer) -> None:
    arguments = {"task": "x", "language": "bash", "priority": "medium"}
    response = await post(api_server, "/api/tools/task_orchestrate", arguments)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["kind"] == "invalid_argument"
    assert error["errors"][0]["field"] == "language"
    assert error["errors"][0]["value"] == "bash"
    assert "without code" in error["errors"][0]["message"]
    assert "language: 'bash' is invalid" in error["message"]


async def test_unexpected_field_rejected(api_server: ApiServer) -> None:
    response = await post(api_server, "/api/tools/system_health", {"verbose": True})
    assert response.status_code == 422
    assert response.json()["error"]["errors"][0]["field"] == "verbose"


async def test_body_not_json_object(api_server: ApiServer) -> None:
    for body in ([1, 2], "text", 3):
        response = await post(api_server, "/api/tools/audit_log", body)
        assert response.status_code == 422, body
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        response = await http.post(
            "/api/tools/audit_log", content=b"{not json", headers=api_server.headers
        )
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]["message"]


async def test_boolean_for_integer_rejected(api_server: ApiServer) -> None:
    response = await post(api_server, "/api/tools/audit_log", {"limit": True})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["errors"][0]["field"] == "limit"
    assert error["errors"][0]["value"] is True
    assert (
        "limit: true is invalid: Input should be a valid integer" in (error["message"])
    )
    plain = await post(
        api_server, "/mcp", {"tool": "audit_log", "args": {"limit": True}}
    )
    assert plain.status_code == 422, plain.text
    assert plain.json()["error"]["errors"][0]["field"] == "limit"


async def test_repeated_key_rejected(api_server: ApiServer) -> None:
    headers = {**api_server.headers, "Content-Type": "application/json"}
    jsonrpc = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": '
        b'{"name": "audit_log", "arguments": {"limit": 1, "limit": 2}}}'
    )
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        tool = await http.post(
            "/api/tools/audit_log", content=b'{"limit": 1, "limit": 2}', headers=headers
        )
        plain = await http.post(
            "/mcp",
            content=b'{"tool": "audit_log", "args": {"limit": 1, "limit": 2}}',
            headers=headers,
        )
        rpc = await http.post(
            "/mcp",
            content=jsonrpc,
            headers={**headers, "Accept": "application/json, text/event-stream"},
        )
    for response, field in ((tool, "limit"), (plain, "args.limit")):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["kind"] == "invalid_argument"
        assert error["errors"][0]["field"] == field
        assert "the key 'limit' appears more than once" in error["message"]
    assert rpc.status_code == 400, rpc.text
    assert rpc.json()["error"]["code"] == -32700
    assert "the key 'limit' appears more than once" in rpc.json()["error"]["message"]


async def test_unknown_tool_404(api_server: ApiServer) -> None:
    response = await post(api_server, "/api/tools/no_such_tool", {})
    assert response.status_code == 404
    assert "no_such_tool" in response.json()["error"]["message"]
    mistyped = await post(api_server, "/api/tools/swarm_lst", {})
    assert mistyped.status_code == 404
    assert "did you mean swarm_list?" in mistyped.json()["error"]["message"]
    # Probes for tool names are in the audit log.
    [probe] = await audit_events(api_server, tool="swarm_lst")
    assert probe["outcome"] == "error"
    assert "did you mean swarm_list?" in probe["error"]


async def test_missing_key_rejected(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        for path in ("/api/tools/audit_log", "/mcp"):
            response = await http.post(path, json={"tool": "audit_log"})
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
            response = await http.post(
                path, json={}, headers={"Authorization": "Basic dXNlcjpwYXNz"}
            )
            assert response.status_code == 401, path


async def test_wrong_key_rejected(api_server: ApiServer) -> None:
    prefix, key_id, secret = api_server.token.split("_", 2)
    wrong_secret = f"{prefix}_{key_id}_{'A' * len(secret)}"
    for token in (wrong_secret, "nxk_000000000000_secret", "not-a-key"):
        response = await post(api_server, "/api/tools/audit_log", {}, token)
        assert response.status_code == 401, token
        assert response.json()["error"]["kind"] == "unauthorized"


async def test_revoked_key_rejected(api_server: ApiServer, key_factory) -> None:
    token, key_id = key_factory("to-revoke")
    assert (
        await post(api_server, "/api/tools/audit_log", {}, token)
    ).status_code == 200
    revoke_key(api_server.settings.effective_database_url, key_id)
    response = await post(api_server, "/api/tools/audit_log", {}, token)
    assert response.status_code == 401


async def test_rejected_calls_audited(api_server: ApiServer, key_factory) -> None:
    revoked_token, revoked_id = key_factory("audit-revoked")
    assert (
        await post(api_server, "/api/tools/system_health", {}, revoked_token)
    ).status_code == 200
    revoke_key(api_server.settings.effective_database_url, revoked_id)
    prefix, key_id, secret = api_server.token.split("_", 2)
    wrong_secret = f"{prefix}_{key_id}_{'B' * len(secret)}"
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        missing = await http.post("/api/tools/system_health", json={})
    assert missing.status_code == 401
    for token in (wrong_secret, revoked_token, "not-a-key-" + secret):
        response = await post(api_server, "/api/tools/system_health", {}, token)
        assert response.status_code == 401, token
    events = await audit_events(api_server, user_id="anonymous", tool="system_health")
    recent = events[:4]
    assert [event["outcome"] for event in recent] == ["error"] * 4
    assert [event["key_id"] for event in recent] == [None, revoked_id, key_id, None]
    assert recent[3]["error"].startswith("rejected with 401: missing API key")
    for event in recent[:3]:
        assert event["error"].startswith("rejected with 401: the API key is unknown")
    text = json.dumps(events)
    assert secret not in text
    assert revoked_token.split("_", 2)[2] not in text


async def test_rotated_key_replaces_old(api_server: ApiServer, key_factory) -> None:
    old_token, key_id = key_factory("to-rotate", ["system"])
    new_token, info = rotate_key(api_server.settings.effective_database_url, key_id)
    assert info.groups == ["system"]
    assert info.name == "to-rotate"
    response = await post(api_server, "/api/tools/audit_log", {}, new_token)
    assert response.status_code == 200
    response = await post(api_server, "/api/tools/audit_log", {}, old_token)
    assert response.status_code == 401


async def test_group_limited_key(api_server: ApiServer, key_factory) -> None:
    token, key_id = key_factory("other-group-only", ["no-such-group"])
    response = await post(api_server, "/api/tools/audit_log", {}, token)
    assert response.status_code == 403
    assert response.json()["error"]["kind"] == "forbidden"
    await audit_events(api_server, limit=1)
    events = list_calls(
        api_server.settings.effective_database_url, user_id="key:other-group-only"
    )
    assert events[0].outcome == "error"
    assert events[0].error is not None
    assert "may not call audit_log" in events[0].error
    assert events[0].key_id == key_id


async def test_group_limited_key_sees_only_its_groups_calls(
    api_server: ApiServer, key_factory
) -> None:
    """Audit rows keep string arguments, such as an upload's content, so a
    key limited to `system` must not read the calls of other groups."""
    content = "only-for-storage-keys-" + "x" * 20
    uploaded = await post(
        api_server,
        "/api/tools/storage_upload",
        {"bucket": "audit-groups", "path": "a.txt", "content": content},
    )
    assert uploaded.status_code == 200, uploaded.text
    token, key_id = key_factory("system-only", ["system"])
    first = await post(api_server, "/api/tools/system_health", {}, token)
    assert first.status_code == 200
    response = await post(api_server, "/api/tools/audit_log", {"limit": 1000}, token)
    assert response.status_code == 200, response.text
    events = response.json()["events"]
    assert content not in response.text
    assert {event["tool"] for event in events} <= {"system_health", "audit_log"}
    assert any(event["key_id"] == key_id for event in events)
    # A key for every group still reads the upload.
    everything = await audit_events(api_server, tool="storage_upload", limit=5)
    assert any(event["arguments"].get("content") == content for event in everything)


async def test_audit_records_key_and_outcome(api_server: ApiServer) -> None:
    await post(api_server, "/api/tools/audit_log", {"limit": 2, "api_key": "s3cret"})
    await post(api_server, "/api/tools/audit_log", {"limit": 3})
    events = await audit_events(api_server, user_id="key:tests", limit=2)
    assert events[0]["tool"] == "audit_log"
    assert events[0]["arguments"] == {"limit": 3}
    assert events[0]["key_id"] == api_server.key_id
    assert events[0]["outcome"] == "success"
    assert events[0]["duration_ms"] > 0
    assert events[1]["outcome"] == "error"
    assert events[1]["arguments"]["api_key"] == "********"


async def test_curl_style_plain_calls(api_server: ApiServer) -> None:
    headers = {**api_server.headers, "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=60) as http:
        health = await http.post(
            "/mcp", content=json.dumps({"tool": "system_health"}), headers=headers
        )
        audit = await http.post(
            "/mcp",
            content=json.dumps({"tool": "audit_log", "args": {"limit": 10}}),
            headers=headers,
        )
        invalid = await http.post(
            "/mcp",
            content=json.dumps({"tool": "audit_log", "args": {"limit": 5000}}),
            headers=headers,
        )
    assert health.status_code == 200
    assert health.json()["temporal"]["status"] == "healthy"
    assert audit.status_code == 200
    assert audit.json()["count"] <= 10
    assert invalid.status_code == 422
    assert invalid.json()["error"]["errors"][0]["field"] == "limit"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_real_curl(api_server: ApiServer) -> None:
    command = [
        "curl",
        "-sS",
        "-X",
        "POST",
        f"{api_server.base_url}/mcp",
        "-H",
        "Content-Type: application/json",
        "-H",
        f"Authorization: Bearer {api_server.token}",
        "-d",
        '{"tool": "audit_log", "args": {"limit": 10}}',
        "-w",
        "\n%{http_code}",
    ]
    completed = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    body, status = completed.stdout.rsplit("\n", 1)
    assert status == "200", completed.stdout + completed.stderr
    assert "events" in json.loads(body)


async def test_body_limit_413(api_server: ApiServer) -> None:
    limit = api_server.settings.api_max_body_bytes
    too_big = b"{" + b" " * (limit + 1) + b"}"
    upload = json.dumps(
        {"bucket": "reports", "path": "big.txt", "content": "x" * limit}
    ).encode()
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=60) as http:
        declared = await http.post(
            "/api/tools/audit_log", content=too_big, headers=api_server.headers
        )

        async def chunks():
            # No Content-Length: the limit must hold on the bytes received.
            for start in range(0, len(too_big), 65536):
                yield too_big[start : start + 65536]

        streamed = await http.post("/mcp", content=chunks(), headers=api_server.headers)
        uploaded = await http.post(
            "/api/tools/storage_upload", content=upload, headers=api_server.headers
        )
        # The MCP transport checks the Content-Length of a GET or DELETE itself.
        mcp_get = await http.request(
            "GET", "/mcp", content=too_big, headers=api_server.headers
        )
        mcp_delete = await http.request(
            "DELETE", "/mcp", content=too_big, headers=api_server.headers
        )
    responses = {
        "declared": declared,
        "streamed": streamed,
        "storage upload": uploaded,
        "mcp GET": mcp_get,
        "mcp DELETE": mcp_delete,
    }
    for name, response in responses.items():
        assert response.status_code == 413, name
        assert response.headers["content-type"] == "application/json", name
        error = response.json()["error"]
        assert error["kind"] == "payload_too_large", name
        assert "NEXUS_API_MAX_BODY_BYTES" in error["message"], name


async def test_http_exception_413_kind(api_server: ApiServer) -> None:
    application = create_app(api_server.settings)

    async def reject() -> None:
        raise HTTPException(413, "the upload is larger than the limit")

    application.add_api_route("/too-large", reject, methods=["POST"])
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1"
    ) as http:
        response = await http.post("/too-large")
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "kind": "payload_too_large",
            "message": "the upload is larger than the limit",
        }
    }


async def test_rate_limit_429(api_server: ApiServer) -> None:
    limited = api_server.settings.model_copy(
        update={"api_rate_limit": 0.5, "api_rate_burst": 2}
    )
    application = create_app(limited)
    transport = httpx.ASGITransport(app=application)
    # The lifespan runs as in a server, so its shutdown writes the audit log.
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http,
    ):
        statuses = []
        for _ in range(3):
            response = await http.post(
                "/api/tools/audit_log",
                json={"limit": 1, "user_id": "rate-limit-test"},
                headers=api_server.headers,
            )
            statuses.append(response.status_code)
    assert statuses == [200, 200, 429]
    assert response.json()["error"]["kind"] == "rate_limited"
    # A token refills in 2 s at 0.5 per second.
    assert response.headers["retry-after"] == "2"
    events = list_calls(
        api_server.settings.effective_database_url, user_id="key:tests", limit=10
    )
    # The module's server may write events of earlier tests after these.
    rejected = next(e for e in events if (e.error or "").startswith("rejected with"))
    assert rejected.outcome == "error"
    assert rejected.error is not None
    assert rejected.error.startswith("rejected with 429: ")
    assert rejected.key_id == api_server.key_id
    assert rejected.tool == "audit_log"


async def test_realtime_stream_needs_key(api_server: ApiServer) -> None:
    created = await post(
        api_server, "/api/tools/realtime_subscribe", {"table": "audit_log"}
    )
    assert created.status_code == 200, created.text
    path = (
        f"/realtime/v1/subscriptions/{created.json()['subscription_id']}/stream"
        "?max_batches=1"
    )
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        rejected = await http.get(path)
        assert rejected.status_code == 401
        assert rejected.headers["www-authenticate"].startswith("Bearer")
        # The subscribe call itself is audited, so a batch is waiting.
        streamed = await http.get(path, headers=api_server.headers)
    assert streamed.status_code == 200
    assert "event: changes" in streamed.text
    # The client confirms the batch it read; the key gate covers this too.
    batch_id = next(
        int(line.removeprefix("id: "))
        for line in streamed.text.splitlines()
        if line.startswith("id: ")
    )
    ack_path = path.split("/stream")[0] + "/ack"
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        assert (await http.post(ack_path, json={"cursor": batch_id})).status_code == 401
        acked = await http.post(
            ack_path, json={"cursor": batch_id}, headers=api_server.headers
        )
        beyond = await http.post(
            ack_path, json={"cursor": 10**12}, headers=api_server.headers
        )
    assert acked.status_code == 200, acked.text
    assert acked.json()["cursor"] == batch_id
    assert beyond.status_code == 400
    assert beyond.json()["error"]["kind"] == "invalid_argument"
    assert f"cursor {10**12} is beyond the log" in beyond.json()["error"]["message"]


async def test_signed_url_needs_no_key(api_server: ApiServer) -> None:
    uploaded = await post(
        api_server,
        "/api/tools/storage_upload",
        {"bucket": "signed-test", "path": "a.txt", "content": "signed body"},
    )
    assert uploaded.status_code == 200, uploaded.text
    signed = await post(
        api_server,
        "/api/tools/storage_get_url",
        {"bucket": "signed-test", "path": "a.txt", "expires_in": 60},
    )
    assert signed.status_code == 200, signed.text
    # The URL names NEXUS_HTTP_PORT; this test's server listens elsewhere.
    parts = httpx.URL(signed.json()["url"])
    url = f"{api_server.base_url}{parts.raw_path.decode()}"
    async with httpx.AsyncClient(timeout=30) as http:
        fetched = await http.get(url)
        assert fetched.status_code == 200
        assert fetched.content == b"signed body"
        forged = await http.get(url[:-4] + "0000")
        assert forged.status_code == 403
        assert forged.json()["error"]["kind"] == "forbidden"
        assert "storage_get_url" in forged.json()["error"]["message"]
        # A signature of another length is as wrong as a forged one.
        short = await http.get(url.split("&signature=")[0] + "&signature=00")
        assert short.status_code == 403
        assert short.json()["error"]["kind"] == "forbidden"
        missing = await http.get(url.split("&signature=")[0])
        assert missing.status_code == 422
        assert missing.json()["error"]["errors"][0]["field"] == "query.signature"


async def test_realtime_stream_checks_group_and_audits(
    api_server: ApiServer, key_factory
) -> None:
    url = api_server.settings.effective_database_url
    system_only, system_key_id = key_factory("stream-system-only", ["system"])
    # The audit log's table needs a key without groups.
    reader, _ = key_factory("stream-reader")
    dashboards, dashboards_key_id = key_factory(
        "stream-dashboards", ["realtime", "system"]
    )
    earlier = create_subscription(
        url, "audit_log", user_id="key:stream-dashboards", key_id=dashboards_key_id
    )
    created = await post(
        api_server, "/api/tools/realtime_subscribe", {"table": "audit_log"}, reader
    )
    assert created.status_code == 200, created.text
    subscription_id = created.json()["subscription_id"]
    path = f"/realtime/v1/subscriptions/{subscription_id}/stream"
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        # The tool and the route reject the key alike.
        events = await post(
            api_server,
            "/api/tools/realtime_events",
            {"subscription_id": subscription_id},
            system_only,
        )
        assert events.status_code == 403
        before = get_subscription(url, subscription_id).cursor
        forbidden = await http.get(
            path,
            params={"max_batches": 1},
            headers={"Authorization": f"Bearer {system_only}"},
        )
        assert forbidden.status_code == 403
        error = forbidden.json()["error"]
        assert error["kind"] == "forbidden"
        assert "group realtime" in error["message"]
        assert "--group realtime" in error["message"]
        # The rejected read took nothing from the subscription's owner.
        assert get_subscription(url, subscription_id).cursor == before
        streamed = await http.get(
            path,
            params={"max_batches": 1},
            headers={"Authorization": f"Bearer {reader}"},
        )
        assert streamed.status_code == 200
        assert "event: changes" in streamed.text
        # A subscription made before that rule is no longer read.
        stale = await http.get(
            f"/realtime/v1/subscriptions/{earlier.subscription_id}/stream",
            params={"max_batches": 1},
            headers={"Authorization": f"Bearer {dashboards}"},
        )
        assert stale.status_code == 403
        assert "table: 'audit_log' contains" in stale.json()["error"]["message"]
        missing = await http.get(
            "/realtime/v1/subscriptions/sub_missing/stream",
            headers={"Authorization": f"Bearer {reader}"},
        )
        assert missing.status_code == 404
    await audit_events(api_server, limit=1)
    rejected = list_calls(url, user_id="key:stream-system-only", tool=path)
    assert [event.outcome for event in rejected] == ["error"]
    assert rejected[0].key_id == system_key_id
    assert (rejected[0].error or "").startswith("rejected with 403: ")
    read = list_calls(url, user_id="key:stream-reader")
    by_tool = {event.tool: event for event in read}
    assert by_tool[path].outcome == "success"
    assert by_tool[path].arguments == {
        "subscription_id": subscription_id,
        "max_batches": "1",
    }
    not_found = by_tool["/realtime/v1/subscriptions/sub_missing/stream"]
    assert not_found.outcome == "error"
    assert (not_found.error or "").startswith("404: ")


async def test_realtime_stream_ends_on_revoke(
    api_server: ApiServer, key_factory
) -> None:
    """A stream opened before its key is revoked ends with an error event
    instead of sending later changes."""
    url = api_server.settings.effective_database_url
    token, key_id = key_factory("stream-revoked")
    # Only the call made after the revocation matches.
    created = await post(
        api_server,
        "/api/tools/realtime_subscribe",
        {"table": "audit_log", "filter": "tool=eq.system_health"},
        token,
    )
    assert created.status_code == 200, created.text
    subscription_id = created.json()["subscription_id"]
    path = f"/realtime/v1/subscriptions/{subscription_id}/stream?max_batches=1"
    received = ""
    # max_batches=1 ends a stream that sends the change instead of an error.
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http,
        http.stream("GET", path, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for text in response.aiter_text():
            received += text
            if ": connected" in received and key_id:
                await asyncio.to_thread(revoke_key, url, key_id)
                key_id = ""
                # A change after the revocation, which must not be sent.
                health = await post(api_server, "/api/tools/system_health", {})
                assert health.status_code == 200, health.text
    assert "event: error" in received
    assert '"kind":"unauthorized"' in received.replace(" ", "")
    assert "event: changes" not in received
    rejected = await post(api_server, "/api/tools/realtime_list", {}, token)
    assert rejected.status_code == 401


async def test_audit_masks_pasted_api_keys(api_server: ApiServer, key_factory) -> None:
    """A platform key pasted into any argument is stored masked, with its id."""
    url = api_server.settings.effective_database_url
    token, _ = key_factory("masked-reader")
    pasted, pasted_id = key_factory("masked-pasted")

    response = await post(
        api_server, "/api/tools/audit_log", {"limit": 1, "user_id": pasted}, token
    )
    assert response.status_code == 200, response.text

    await audit_events(api_server, limit=1)
    rows = list_calls(url, user_id="key:masked-reader", tool="audit_log")
    stored = json.dumps([row.arguments for row in rows])
    assert pasted not in stored
    assert pasted.split("_", 2)[2] not in stored
    assert f"nxk_{pasted_id}_********" in stored


async def test_stream_rejects_unknown_query(api_server: ApiServer, key_factory) -> None:
    """The stream route rejects a query parameter it does not declare, and
    neither the response nor the audit log contains its value."""
    url = api_server.settings.effective_database_url
    token, key_id = key_factory("unknown-query")
    pasted, _ = key_factory("unknown-query-pasted")
    created = await post(
        api_server, "/api/tools/realtime_subscribe", {"table": "audit_log"}, token
    )
    assert created.status_code == 200, created.text
    path = f"/realtime/v1/subscriptions/{created.json()['subscription_id']}/stream"

    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        unknown = await http.get(
            path,
            params={"max_batches": 1, "bearer": pasted},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert unknown.status_code == 422
    message = unknown.json()["error"]["message"]
    assert "bearer" in message
    assert "remove" in message
    assert pasted not in unknown.text

    await audit_events(api_server, limit=1)
    [row] = list_calls(url, user_id="key:unknown-query", tool=path)
    assert row.outcome == "error"
    assert row.key_id == key_id
    assert pasted not in json.dumps([row.arguments, row.error])


async def test_subscription_owned_by_key_id(api_server: ApiServer, key_factory) -> None:
    """A rotation hands a subscription over, and a later key with the name of
    the revoked one gets 404 for it from every tool and route."""
    url = api_server.settings.effective_database_url
    first, first_id = key_factory("same-name", ["realtime", "sandbox"])
    created = await post(
        api_server, "/api/tools/realtime_subscribe", {"table": "sandboxes"}, first
    )
    assert created.status_code == 200, created.text
    subscription_id = created.json()["subscription_id"]
    assert created.json()["key_id"] == first_id
    rotated, rotated_info = await asyncio.to_thread(rotate_key, url, first_id)
    events = await post(
        api_server,
        "/api/tools/realtime_events",
        {"subscription_id": subscription_id},
        rotated,
    )
    assert events.status_code == 200, events.text
    await asyncio.to_thread(revoke_key, url, rotated_info.id)
    second, _ = key_factory("same-name", ["realtime", "sandbox"])
    listed = await post(api_server, "/api/tools/realtime_list", {}, second)
    assert listed.status_code == 200, listed.text
    assert listed.json()["subscriptions"] == []
    for tool in ["realtime_events", "execution_stream_status", "realtime_unsubscribe"]:
        response = await post(
            api_server,
            f"/api/tools/{tool}",
            {"subscription_id": subscription_id},
            second,
        )
        assert response.status_code == 404, (tool, response.text)
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        stream = await http.get(
            f"/realtime/v1/subscriptions/{subscription_id}/stream",
            headers={"Authorization": f"Bearer {second}"},
        )
        assert stream.status_code == 404
        ack = await http.post(
            f"/realtime/v1/subscriptions/{subscription_id}/ack",
            json={"cursor": 0},
            headers={"Authorization": f"Bearer {second}"},
        )
        assert ack.status_code == 404


async def test_realtime_keeps_groups_and_owners(
    api_server: ApiServer, key_factory
) -> None:
    """A key limited to realtime cannot read another group's table through a
    subscription, nor use another caller's subscription."""
    realtime_only, _ = key_factory("realtime-only", ["realtime"])
    denied = await post(
        api_server,
        "/api/tools/realtime_subscribe",
        {"table": "benchmark_runs"},
        realtime_only,
    )
    assert denied.status_code == 403, denied.text
    error = denied.json()["error"]
    assert error["kind"] == "forbidden"
    assert "'benchmark_runs'" in error["message"]
    assert "--group system" in error["message"]
    stream = await post(
        api_server,
        "/api/tools/execution_stream_subscribe",
        {"sandbox_id": "sbx_any"},
        realtime_only,
    )
    assert stream.status_code == 403, stream.text
    assert "--group sandbox" in stream.json()["error"]["message"]

    created = await post(
        api_server, "/api/tools/realtime_subscribe", {"table": "audit_log"}
    )
    assert created.status_code == 200, created.text
    theirs = created.json()["subscription_id"]
    assert created.json()["user_id"] == "key:tests"
    url = api_server.settings.effective_database_url
    before = get_subscription(url, theirs).cursor
    for tool in ("realtime_events", "realtime_unsubscribe"):
        response = await post(
            api_server, f"/api/tools/{tool}", {"subscription_id": theirs}, realtime_only
        )
        assert response.status_code == 404, (tool, response.text)
    status = await post(
        api_server,
        "/api/tools/execution_stream_status",
        {"subscription_id": theirs},
        realtime_only,
    )
    assert status.status_code == 404, status.text
    listed = await post(api_server, "/api/tools/realtime_list", {}, realtime_only)
    assert theirs not in {s["subscription_id"] for s in listed.json()["subscriptions"]}
    owner_list = await post(api_server, "/api/tools/realtime_list", {})
    assert theirs in {s["subscription_id"] for s in owner_list.json()["subscriptions"]}
    headers = {"Authorization": f"Bearer {realtime_only}"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        path = f"/realtime/v1/subscriptions/{theirs}"
        streamed = await http.get(
            f"{path}/stream",
            params={"max_batches": 1},
            headers={**headers, "Last-Event-ID": "1"},
        )
        assert streamed.status_code == 404, streamed.text
        acked = await http.post(f"{path}/ack", json={"cursor": 1}, headers=headers)
        assert acked.status_code == 404, acked.text
    # Nothing the other key tried moved or removed the owner's subscription.
    assert get_subscription(url, theirs).cursor == before
    events = await post(
        api_server, "/api/tools/realtime_events", {"subscription_id": theirs}
    )
    assert events.status_code == 200, events.text


async def test_mcp_host_and_origin_checked_for_every_call(
    api_server: ApiServer,
) -> None:
    plain = {"tool": "audit_log", "args": {"limit": 1}}
    jsonrpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        for body in (plain, jsonrpc):
            evil_origin = await http.post(
                "/mcp",
                json=body,
                headers={
                    **api_server.headers,
                    **accept,
                    "Origin": "http://evil.example",
                },
            )
            assert evil_origin.status_code == 403, body
            error = evil_origin.json()["error"]
            assert error["kind"] == "forbidden"
            assert "'http://evil.example'" in error["message"]
            evil_host = await http.post(
                "/mcp",
                json=body,
                headers={**api_server.headers, **accept, "Host": "evil.example"},
            )
            assert evil_host.status_code == 421, body
            assert evil_host.json()["error"]["kind"] == "misdirected_request"
            assert "'evil.example'" in evil_host.json()["error"]["message"]
            local_origin = await http.post(
                "/mcp",
                json=body,
                headers={
                    **api_server.headers,
                    **accept,
                    "Origin": "http://localhost:5173",
                },
            )
            assert local_origin.status_code == 200, local_origin.text
    events = await audit_events(api_server, tool="mcp", limit=20)
    assert any(
        (event["error"] or "").startswith("rejected with 421: Host header")
        for event in events
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tool": "audit_log", "limit": 1}, "limit"),
        ({"tool": "audit_log", "args": {}, "arguments": {"limit": 1}}, "both"),
        ({"tool": "audit_log", "arguments": [1]}, "arguments: a JSON array"),
    ],
)
async def test_plain_call_rejects_misplaced_fields(
    api_server: ApiServer, body: dict, field: str
) -> None:
    response = await post(api_server, "/mcp", body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["kind"] == "invalid_argument"
    assert field in error["message"]


async def test_plain_call_takes_arguments_alias(api_server: ApiServer) -> None:
    response = await post(
        api_server, "/mcp", {"tool": "audit_log", "arguments": {"limit": 1}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["count"] == 1


async def test_jsonrpc_rejections_are_short_jsonrpc_errors(
    api_server: ApiServer,
) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    ]
    headers = {**api_server.headers, "Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        batched = await http.post("/mcp", json=batch, headers=headers)
        untyped = await http.post(
            "/mcp",
            content=json.dumps(batch[0]),
            headers={**headers, "Content-Type": "text/plain"},
        )
    assert batched.status_code == 400
    assert batched.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32600,
            "message": "JSON-RPC batches are not supported; send one request per POST",
        },
    }
    assert untyped.status_code == 400
    assert untyped.json()["error"]["message"] == (
        "Content-Type 'text/plain' is not application/json; send JSON-RPC with "
        "Content-Type: application/json"
    )


async def test_key_checked_before_body_size(api_server: ApiServer) -> None:
    too_big = b"{" + b" " * (api_server.settings.api_max_body_bytes + 1) + b"}"
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=60) as http:
        for path in ("/api/tools/audit_log", "/mcp"):
            anonymous = await http.post(path, content=too_big)
            assert anonymous.status_code == 401, path
            keyed = await http.post(path, content=too_big, headers=api_server.headers)
            assert keyed.status_code == 413, path


async def test_doc_pages_off_by_default(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert (await http.get(path)).status_code == 404, path
        # The OpenAPI description stays readable without a key.
        assert (await http.get("/openapi.json")).status_code == 200


async def test_doc_pages_load_nothing_from_other_hosts(
    api_server: ApiServer,
) -> None:
    application = create_app(api_server.settings.model_copy(update={"api_docs": True}))
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1"
    ) as http:
        for path in ("/docs", "/redoc"):
            page = await http.get(path)
            assert page.status_code == 200, path
            sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
            assert sources, path
            for source in sources:
                assert source.startswith("/"), (path, source)
                asset = await http.get(source)
                assert asset.status_code == 200, source
                assert len(asset.content) > 1000, source
            assert "http://" not in page.text
            assert "https://" not in page.text


@pytest.mark.parametrize("request_id", [None, 2.5, True])
async def test_jsonrpc_invalid_id_rejected(
    api_server: ApiServer, request_id: object
) -> None:
    bucket = f"invalid-id-{str(request_id).lower().replace('.', '-')}"
    call = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {
            "name": "storage_upload",
            "arguments": {"bucket": bucket, "path": "a.txt", "content": "hi"},
        },
    }
    headers = {**api_server.headers, "Accept": "application/json"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        response = await http.post("/mcp", json=call, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32600
    assert error["message"].startswith("Invalid request: id: ")
    assert "send the request id as a string or an integer" in error["message"]
    listed = await post(api_server, "/api/tools/storage_list", {"bucket": bucket})
    assert listed.json()["count"] == 0
    audited = [event["error"] or "" for event in await audit_events(api_server)]
    assert any(
        text.startswith("rejected with 400, JSON-RPC -32600: id: ") for text in audited
    ), audited


async def test_cut_strings_count_what_was_cut(api_server: ApiServer) -> None:
    content = "b" * 5000
    uploaded = await post(
        api_server,
        "/api/tools/storage_upload",
        {"bucket": "cut-count", "path": "a.txt", "content": content},
    )
    assert uploaded.status_code == 200, uploaded.text
    [event] = [
        event
        for event in await audit_events(api_server, tool="storage_upload")
        if event["arguments"].get("bucket") == "cut-count"
    ]
    assert event["arguments"]["content"] == "b" * 4096 + "... [904 more characters]"
    invalid = await post(api_server, "/api/tools/audit_log", {"limit": "x" * 5000})
    assert invalid.status_code == 422, invalid.text
    [detail] = invalid.json()["error"]["errors"]
    assert detail["value"] == "x" * 1000 + "... [4000 more characters]"


async def test_jsonrpc_transport_rejections_audited(api_server: ApiServer) -> None:
    request = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/list"})
    json_headers = {**api_server.headers, "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        batched = await http.post(
            "/mcp",
            content=f"[{request}]",
            headers={**json_headers, "Accept": "application/json"},
        )
        untyped = await http.post(
            "/mcp",
            content=request,
            headers={
                **api_server.headers,
                "Content-Type": "text/plain",
                "Accept": "application/json",
            },
        )
        unacceptable = await http.post(
            "/mcp", content=request, headers={**json_headers, "Accept": "text/html"}
        )
    assert batched.status_code == 400, batched.text
    assert untyped.status_code == 400, untyped.text
    assert unacceptable.status_code == 406, unacceptable.text
    assert unacceptable.json()["error"]["message"] == (
        "Not Acceptable: Accept 'text/html' does not include application/json; "
        "send Accept: application/json"
    )
    newest = [event["error"] for event in await audit_events(api_server, tool="mcp")]
    assert newest[0] == (
        "rejected with 406, JSON-RPC -32600: Accept 'text/html' does not "
        "include application/json; send Accept: application/json"
    )
    assert newest[1].startswith("rejected with 400, JSON-RPC -32600: Content-Type ")
    assert newest[2] == (
        "rejected with 400, JSON-RPC -32600: JSON-RPC batches are not supported; "
        "send one request per POST"
    )


async def test_long_unknown_tool_name_cut(api_server: ApiServer) -> None:
    name = "a" * 5000
    shown = f"unknown tool '{'a' * 1000}... [4000 more characters]'"
    routed = await post(api_server, f"/api/tools/{name}", {})
    plain = await post(api_server, "/mcp", {"tool": name})
    for response in (routed, plain):
        assert response.status_code == 404, response.text
        message = response.json()["error"]["message"]
        assert message.startswith(shown)
        assert name not in message
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}},
    }
    headers = {**api_server.headers, "Accept": "application/json"}
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        rpc = await http.post("/mcp", json=call, headers=headers)
    text = rpc.json()["result"]["content"][0]["text"]
    assert text.startswith(shown)
    assert name not in text
    probes = [
        event["error"]
        for event in await audit_events(api_server)
        if event["tool"].startswith("a" * 50)
    ]
    assert len(probes) == 3
    for error in probes:
        assert error.startswith(shown)
        assert name not in error


async def test_other_authorization_scheme_named(api_server: ApiServer) -> None:
    secret = api_server.token.split("_", 2)[2]
    cases = {
        f"Token {api_server.token}": "uses the scheme 'Token'",
        api_server.token: "does not start with a scheme",
        "Bearer": "has the Bearer scheme but no key",
    }
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        for header, expected in cases.items():
            response = await http.post(
                "/api/tools/system_health", headers={"Authorization": header}
            )
            assert response.status_code == 401, header
            message = response.json()["error"]["message"]
            assert expected in message
            assert "send `Authorization: Bearer <key>`" in message
            assert secret not in message
    events = await audit_events(api_server, user_id="anonymous", tool="system_health")
    assert "uses the scheme 'Token'" in events[2]["error"]
    assert secret not in json.dumps(events)


async def test_two_authorization_headers_rejected(
    api_server: ApiServer, key_factory
) -> None:
    limited, _ = key_factory("two-headers", ["system"])
    pairs = [(limited, api_server.token), (api_server.token, limited)]
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        for first, second in pairs:
            for path in ("/api/tools/storage_list", "/mcp"):
                response = await http.post(
                    path,
                    json={"tool": "storage_list", "args": {"bucket": "x"}}
                    if path == "/mcp"
                    else {"bucket": "x"},
                    headers=[
                        ("Authorization", f"Bearer {first}"),
                        ("Authorization", f"Bearer {second}"),
                    ],
                )
                assert response.status_code == 401, (path, response.text)
                message = response.json()["error"]["message"]
                assert message.startswith("the request has 2 Authorization headers")


async def test_trailing_slash_not_redirected(api_server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as http:
        for path in ("/mcp/", "/api/tools/audit_log/"):
            response = await http.post(
                path, json={}, headers={**api_server.headers, "Host": "evil.example"}
            )
            assert response.status_code == 404, (path, response.text)
            assert "location" not in response.headers
            assert response.json()["error"]["kind"] == "not_found"
