"""Natural-language tasks against a local stand-in of the Messages API, and
built-in actions."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import Client

from app.contracts.swarm import AGENT_TYPES, AgentState
from app.settings import Settings
from app.swarm import service
from app.tools import ToolError, ToolInputError, invoke_tool
from app.tools import registry as tool_registry
from tests.conftest import running_workers
from tests.swarm.conftest import SWARM_QUEUES, Swarms
from tests.workflows.test_secrets import payload_bytes


class MessagesStandIn(ThreadingHTTPServer):
    """Answers POST /v1/messages like the Messages API, echoing the prompt, and
    keeps every request for the test to inspect.

    Attributes:
        failures: HTTP statuses to respond with, one per request in order,
            before the normal responses.
        bodies: raw bodies to send with HTTP 200, one per request in order,
            after the failures and before the normal responses.
        delay: seconds to wait before each normal response; `release` ends
            the wait early.
    """

    requests: list[dict[str, Any]]
    failures: list[int]
    bodies: list[bytes]
    delay: float
    release: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: MessagesStandIn

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append(
            {"path": self.path, "headers": dict(self.headers), "body": body}
        )
        if self.headers.get("x-api-key") != "test-key":
            self._send(
                401, {"type": "error", "error": {"type": "authentication_error"}}
            )
            return
        if self.server.failures:
            status = self.server.failures.pop(0)
            self._send(status, {"type": "error", "error": {"type": "api_error"}})
            return
        if self.server.bodies:
            self._send_raw(200, self.server.bodies.pop(0))
            return
        self.server.release.wait(self.server.delay)
        prompt = body["messages"][0]["content"]
        reply = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [
                {"type": "text", "text": f"answer to: {prompt.splitlines()[0]}"}
            ],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 11, "output_tokens": 5},
        }
        self._send(200, reply)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        self._send_raw(status, json.dumps(payload).encode())

    def _send_raw(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def messages_api() -> Iterator[MessagesStandIn]:
    server = MessagesStandIn(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.failures = []
    server.bodies = []
    server.delay = 0.0
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


async def test_llm_task_uses_messages_api(
    client: Client, swarm_settings: Settings, messages_api: MessagesStandIn
) -> None:
    host, port = messages_api.server_address[:2]
    settings = swarm_settings.model_copy(
        update={
            "anthropic_api_key": SecretStr("test-key"),
            "anthropic_base_url": f"http://{host}:{port}",
            "anthropic_model": "stand-in-model",
        }
    )
    helper = Swarms(client, settings)
    try:
        async with running_workers(client, settings, SWARM_QUEUES):
            swarm_id, agents = await helper.swarm("ring", ["researcher", "analyst"])
            result = await helper.run_task(
                task="summarise the findings", strategy="sequential", swarm_id=swarm_id
            )
    finally:
        await helper.cleanup()
    assert result["status"] == "completed", result["error"]
    [step] = result["results"]
    # A one-line language task needs one agent; the researcher fits best.
    assert step["agent_id"] == agents[0]["agent_id"]
    assert step["text"] == "answer to: Task: summarise the findings"
    assert step["output"]["model"] == "stand-in-model"
    assert step["output"]["output_tokens"] == 5
    [request] = messages_api.requests
    assert request["path"] == "/v1/messages"
    assert request["headers"]["anthropic-version"] == "2023-06-01"
    assert request["body"]["model"] == "stand-in-model"
    assert "researcher agent" in request["body"]["system"]
    assert result["output"] == "answer to: Task: summarise the findings"


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_llm_system_prompt_article(kind: str) -> None:
    agent = AgentState(
        agent_id="agent_1",
        type=kind,
        name="agent-1",
        joined_at=datetime(2026, 1, 1, tzinfo=UTC),
        seq=1,
    )
    article = "an" if kind in ("analyst", "architect", "optimizer") else "a"
    assert f"agent-1, {article} {kind} agent" in service.llm_system_prompt(agent)


async def test_llm_task_without_key_fails(swarms: Swarms) -> None:
    assert swarms.settings.anthropic_api_key is None
    swarm_id, _ = await swarms.swarm("mesh", ["researcher"])
    result = await swarms.run_task(task="what is 2+2?", swarm_id=swarm_id)
    assert result["status"] == "failed"
    [step] = result["results"]
    assert step["text"] is None
    assert "needs an Anthropic API key" in step["error"]
    assert "ANTHROPIC_API_KEY" in result["error"]


async def test_llm_rejected_key_is_reported(
    client: Client, swarm_settings: Settings, messages_api: MessagesStandIn
) -> None:
    host, port = messages_api.server_address[:2]
    # A base URL may carry a password (a proxy's), which no error shows.
    settings = swarm_settings.model_copy(
        update={
            "anthropic_api_key": SecretStr("wrong"),
            "anthropic_base_url": f"http://llmuser:S3CQ01baseurlpw@{host}:{port}",
        }
    )
    helper = Swarms(client, settings)
    try:
        async with running_workers(client, settings, SWARM_QUEUES):
            swarm_id, _ = await helper.swarm("mesh", ["analyst"])
            result = await helper.run_task(task="anything", swarm_id=swarm_id)
    finally:
        await helper.cleanup()
    assert result["status"] == "failed"
    assert "HTTP 401" in result["error"]
    assert (
        f"Messages API at http://llmuser:***@{host}:{port}/v1/messages"
        in (result["error"])
    )
    assert "S3CQ01baseurlpw" not in json.dumps(result)


def stand_in_settings(settings: Settings, messages_api: MessagesStandIn) -> Settings:
    """Return `settings` with the test key and the stand-in's address."""
    host, port = messages_api.server_address[:2]
    return settings.model_copy(
        update={
            "anthropic_api_key": SecretStr("test-key"),
            "anthropic_base_url": f"http://{host}:{port}",
        }
    )


async def run_llm_task(client: Client, settings: Settings, task: str) -> dict[str, Any]:
    """Run a natural-language task on a one-agent swarm; return its results."""
    helper = Swarms(client, settings)
    try:
        async with running_workers(client, settings, SWARM_QUEUES):
            swarm_id, _ = await helper.swarm("mesh", ["analyst"])
            return await helper.run_task(task=task, swarm_id=swarm_id)
    finally:
        await helper.cleanup()


async def test_llm_server_errors_are_retried(
    client: Client, swarm_settings: Settings, messages_api: MessagesStandIn
) -> None:
    messages_api.failures = [500, 529]
    settings = stand_in_settings(swarm_settings, messages_api)
    result = await run_llm_task(client, settings, "retry me")
    assert result["status"] == "completed", result["error"]
    assert len(messages_api.requests) == 3
    system = messages_api.requests[0]["body"]["system"]
    assert system.startswith("You are analyst-0, an analyst agent in a")
    [step] = result["results"]
    assert step["attempt"] == 3
    assert step["error"] is None
    assert step["text"] == "answer to: Task: retry me"


async def test_llm_server_errors_stop_after_five_attempts(
    client: Client, swarm_settings: Settings, messages_api: MessagesStandIn
) -> None:
    messages_api.failures = [500] * 6
    settings = stand_in_settings(swarm_settings, messages_api)
    result = await run_llm_task(client, settings, "never answered")
    assert result["status"] == "failed"
    assert len(messages_api.requests) == 5
    [step] = result["results"]
    assert step["attempt"] == 5
    assert "HTTP 500" in step["error"]
    assert "(attempt 5)" in step["error"]


async def test_llm_client_error_is_not_retried(
    client: Client, swarm_settings: Settings, messages_api: MessagesStandIn
) -> None:
    messages_api.failures = [400, 400]
    settings = stand_in_settings(swarm_settings, messages_api)
    result = await run_llm_task(client, settings, "bad request")
    assert result["status"] == "failed"
    assert len(messages_api.requests) == 1
    [step] = result["results"]
    assert step["attempt"] == 1
    assert "HTTP 400" in step["error"]


@pytest.mark.parametrize(
    ("body", "quoted"),
    [(b"<html>gateway</html>", "'<html>gateway</html>'"), (b"[1, 2]", "'[1, 2]'")],
)
async def test_llm_reply_not_json_object(
    client: Client,
    swarm_settings: Settings,
    messages_api: MessagesStandIn,
    body: bytes,
    quoted: str,
) -> None:
    # Such a reply comes from another server at the base URL, which a retry
    # does not fix.
    messages_api.bodies = [body, body]
    settings = stand_in_settings(swarm_settings, messages_api)
    result = await run_llm_task(client, settings, "misrouted")
    assert result["status"] == "failed"
    assert len(messages_api.requests) == 1
    [step] = result["results"]
    assert step["attempt"] == 1
    assert "returned HTTP 200 with a body that is not a JSON object" in step["error"]
    assert quoted in step["error"]
    assert settings.anthropic_base_url in step["error"]
    assert "NEXUS_ANTHROPIC_BASE_URL" in step["error"]


async def test_llm_step_keeps_task_timeout(
    client: Client, swarm_settings: Settings, messages_api: MessagesStandIn
) -> None:
    messages_api.delay = 30.0
    settings = stand_in_settings(swarm_settings, messages_api)
    helper = Swarms(client, settings)
    try:
        async with running_workers(client, settings, SWARM_QUEUES):
            swarm_id, _ = await helper.swarm("mesh", ["analyst"])
            result = await helper.run_task(
                task="slow answer", timeout=1, swarm_id=swarm_id
            )
    finally:
        await helper.cleanup()
    assert result["status"] == "failed"
    [step] = result["results"]
    assert step["text"] is None
    assert step["attempt"] == 1
    assert step["error"].startswith("timed out after 1 s; raise the task's timeout")
    # A step that ran out of its time is not sent again.
    assert len(messages_api.requests) == 1


async def test_action_step_keeps_task_timeout(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    sandbox = await swarms.call("sandbox_create", template="python")
    swarms.workflow_ids.append(f"sandbox-{sandbox['sandbox_id']}")
    result = await swarms.run_task(
        task="run slowly",
        action="sandbox_execute",
        action_args={
            "sandbox_id": sandbox["sandbox_id"],
            "code": "import time; time.sleep(20)",
            "timeout": 30,
        },
        timeout=1,
        swarm_id=swarm_id,
    )
    assert result["status"] == "failed"
    [step] = result["results"]
    assert step["output"] is None
    assert step["error"].startswith("timed out after 1 s; raise the task's timeout")


async def test_builtin_action_runs_tool(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    result = await swarms.run_task(
        task="check the platform", action="system_health", swarm_id=swarm_id
    )
    assert result["status"] == "completed", result["error"]
    [step] = result["results"]
    assert step["output"]["database"]["status"] == "healthy"
    assert step["output"]["temporal"]["status"] == "healthy"


async def test_missing_capability_action_not_available(
    swarms: Swarms, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Storage is installed now, so the test removes its tool to stand for a
    # deployment without that capability.
    monkeypatch.delitem(tool_registry._registry, "storage_upload")
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    with pytest.raises(ToolError) as caught:
        await swarms.call(
            "task_orchestrate",
            task="store it",
            action="storage_upload",
            swarm_id=swarm_id,
        )
    assert "is not available" in caught.value.message
    assert "'storage_upload' is not installed" in caught.value.message
    with pytest.raises(ToolError, match="unknown action 'fly'"):
        await swarms.call("task_orchestrate", task="x", action="fly", swarm_id=swarm_id)


@pytest.mark.parametrize(
    ("action_args", "field", "message"),
    [
        (
            {"limit": "lots"},
            "action_args.limit",
            "action_args.limit: 'lots' is invalid: Input should be a valid integer",
        ),
        (
            {"limit": 0},
            "action_args.limit",
            "action_args.limit: 0 is invalid: Input should be greater than or "
            "equal to 1",
        ),
        (
            {"bogus_field": 1},
            "action_args.bogus_field",
            "action_args.bogus_field: 1 is invalid: Extra inputs are not permitted",
        ),
    ],
)
async def test_bad_action_args_rejected_at_submission(
    swarms: Swarms, action_args: dict[str, Any], field: str, message: str
) -> None:
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    with pytest.raises(ToolInputError) as caught:
        await swarms.call(
            "task_orchestrate",
            task="read the log",
            action="audit_log",
            action_args=action_args,
            swarm_id=swarm_id,
        )
    assert message in caught.value.message
    assert caught.value.message.startswith("invalid arguments for task_orchestrate")
    assert [e["field"] for e in caught.value.errors] == [field]
    state = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert state["tasks"] == []


async def test_valid_action_args_run(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    result = await swarms.run_task(
        task="read the log",
        action="audit_log",
        action_args={"limit": 2},
        swarm_id=swarm_id,
    )
    assert result["status"] == "completed", result["error"]
    [step] = result["results"]
    assert step["output"]["count"] == 2


async def test_action_keeps_to_the_groups_of_the_key(swarms: Swarms) -> None:
    """A key limited to the swarm group cannot run another group's tool as a
    task's action, and a task it submits runs its actions with its groups."""
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    limited = replace(swarms.ctx, groups=("swarm",))
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            limited,
            "task_orchestrate",
            {"task": "read", "action": "audit_log", "swarm_id": swarm_id},
        )
    assert refused.value.kind == "forbidden"
    assert "calls audit_log, a tool of the group system" in refused.value.message
    state = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert state["tasks"] == []
    # A submission that the check let through (a key with both groups) runs
    # with those groups, whatever the agent's own caller may call.
    both = replace(swarms.ctx, groups=("swarm", "system"))
    task = await invoke_tool(
        both,
        "task_orchestrate",
        {"task": "read", "action": "audit_log", "swarm_id": swarm_id},
    )
    result = await swarms.call(
        "task_results", task_id=task["task_id"], wait_seconds=120
    )
    assert result["status"] == "completed", result["error"]


async def test_action_env_vars_sealed_in_history(swarms: Swarms) -> None:
    """The env vars of a sandbox_execute action reach the program but not the
    swarm's or the task's history, and the output masks them."""
    swarm_id, _ = await swarms.swarm("star", ["specialist"])
    sandbox = await swarms.call("sandbox_create", template="python")
    swarms.workflow_ids.append(f"sandbox-{sandbox['sandbox_id']}")
    token = "act-token-5d1e0c"
    task = await swarms.call(
        "task_orchestrate",
        task="use the token",
        action="sandbox_execute",
        action_args={
            "sandbox_id": sandbox["sandbox_id"],
            "code": "import os; t = os.environ['ACT_TOKEN']; print(t, len(t))",
            "env_vars": {"ACT_TOKEN": token},
        },
        swarm_id=swarm_id,
    )
    result = await swarms.call(
        "task_results", task_id=task["task_id"], wait_seconds=120
    )
    assert result["status"] == "completed", result["error"]
    [step] = result["results"]
    assert step["output"]["stdout"] == f"******** {len(token)}\n"
    for workflow_id in (f"swarm-{swarm_id}", task["workflow_id"]):
        history = await swarms.client.get_workflow_handle(workflow_id).fetch_history()
        assert token.encode() not in payload_bytes(history.events), workflow_id
