"""The E2B adapter against a stand-in `AsyncSandbox` that raises the SDK's
real exception types, to prove the error mapping and recreation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import e2b
import httpx
import pytest
from temporalio.client import Client

from app.api.calls import error_status
from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.sandbox import runtime
from app.sandbox.backend import (
    SandboxConfigurationError,
    SandboxLostError,
    SandboxRetryLaterError,
)
from app.sandbox.e2b import E2BBackend
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from tests.conftest import running_workers
from tests.support.sandboxes import sandbox_test_settings


class FakeHandle:
    def __init__(
        self, pid: int, fault: BaseException | None, exit_code: int | None
    ) -> None:
        self.pid = pid
        self.fault = fault
        self.exit_code = exit_code

    async def wait(self) -> Any:
        if self.fault is not None:
            raise self.fault
        if self.exit_code is None:
            # A command that never ends on its own.
            await asyncio.Event().wait()
        if self.exit_code:
            raise e2b.CommandExitException(
                stderr="boom", stdout="", exit_code=self.exit_code, error=None
            )
        return e2b.CommandResult(stdout="ok\n", stderr="", exit_code=0, error=None)


class FakeFiles:
    """Stands in for a sandbox's `files`: a dict from path to content."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}

    async def write(self, path: str, data: bytes) -> None:
        self.content[path] = data

    async def read(self, path: str, format: str = "text") -> bytes:
        if path not in self.content:
            raise e2b.NotFoundException(f"file {path} not found")
        return self.content[path]

    async def remove(self, path: str) -> None:
        if path not in self.content:
            raise e2b.NotFoundException(f"file {path} not found")
        del self.content[path]


class FakePages:
    """Stands in for `AsyncSandboxPaginator`: one page of sandboxes."""

    def __init__(self, found: list[Any], fault: BaseException | None) -> None:
        self.found = found
        self.fault = fault
        self.has_next = True

    async def next_items(self) -> list[Any]:
        if self.fault is not None:
            raise self.fault
        self.has_next = False
        return self.found


class FakeSandbox:
    """Stands in for `e2b.AsyncSandbox`; `fault` forces the next command's error."""

    live: ClassVar[dict[str, FakeSandbox]] = {}
    connects: ClassVar[list[tuple[str, int | None]]] = []
    create_fault: BaseException | None = None
    # A create that makes its sandbox and then fails, as a POST that timed
    # out after E2B acted on it.
    create_fault_after: BaseException | None = None
    list_fault: BaseException | None = None
    probe_fault: BaseException | None = None
    kill_fault: BaseException | None = None
    counter = 0

    def __init__(self, template: str) -> None:
        FakeSandbox.counter += 1
        self.sandbox_id = f"e2b-{FakeSandbox.counter}"
        self.template = template
        self.running = True
        self.fault: BaseException | None = None
        self.exit_code: int | None = 0
        self.commands_run: list[str] = []
        self.commands = self
        self.files = FakeFiles()
        self.timeout: int | None = None
        self.metadata: dict[str, str] = {}

    @classmethod
    async def create(
        cls,
        template: str,
        timeout: int,
        envs: dict[str, str],
        metadata: dict[str, str],
        api_key: str,
    ) -> FakeSandbox:
        if cls.create_fault is not None:
            raise cls.create_fault
        sandbox = cls(template)
        sandbox.timeout = timeout
        sandbox.metadata = dict(metadata)
        cls.live[sandbox.sandbox_id] = sandbox
        if cls.create_fault_after is not None:
            raise cls.create_fault_after
        return sandbox

    @classmethod
    def list(
        cls,
        query: e2b.SandboxQuery | None = None,
        limit: int | None = None,
        api_key: str = "",
    ) -> FakePages:
        expected = ((query.metadata if query else None) or {}).items()
        found = [
            sandbox
            for sandbox in cls.live.values()
            if expected <= sandbox.metadata.items()
        ]
        return FakePages(found, cls.list_fault)

    @classmethod
    async def connect(
        cls, sandbox_id: str, timeout: int | None = None, api_key: str = ""
    ) -> FakeSandbox:
        cls.connects.append((sandbox_id, timeout))
        sandbox = cls.live.get(sandbox_id)
        if sandbox is None or not sandbox.running:
            raise e2b.SandboxNotFoundException(f"sandbox {sandbox_id} not found")
        return sandbox

    @classmethod
    async def kill(cls, sandbox_id: str, api_key: str = "") -> bool:
        if cls.kill_fault is not None:
            raise cls.kill_fault
        return cls.live.pop(sandbox_id, None) is not None

    async def run(
        self,
        command: str,
        background: bool = False,
        envs: Any = None,
        cwd: str | None = None,
        timeout: float = 60,
    ) -> FakeHandle:
        self.commands_run.append(command)
        fault, self.fault = self.fault, None
        return FakeHandle(len(self.commands_run), fault, self.exit_code)

    async def is_running(self) -> bool:
        if FakeSandbox.probe_fault is not None:
            raise FakeSandbox.probe_fault
        return self.running

    async def set_timeout(self, timeout: int) -> None:
        if not self.running:
            raise e2b.SandboxNotRunningException("sandbox is not running")
        self.timeout = timeout


@pytest.fixture
def backend() -> E2BBackend:
    FakeSandbox.live = {}
    FakeSandbox.connects = []
    FakeSandbox.create_fault = None
    FakeSandbox.create_fault_after = None
    FakeSandbox.list_fault = None
    FakeSandbox.probe_fault = None
    FakeSandbox.kill_fault = None
    return E2BBackend(api_key="test-key", sandbox_class=FakeSandbox)


async def run(backend: E2BBackend, backend_id: str) -> Any:
    return await backend.run(
        backend_id,
        ["python3", "-c", "print(1)"],
        env={},
        cwd=None,
        timeout=5,
        output_limit=1000,
    )


async def test_run_and_exit_code(backend: E2BBackend) -> None:
    created = await backend.create(
        "x", template="python", timeout=600, env={}, metadata={}
    )
    assert FakeSandbox.live[created.backend_id].template == "code-interpreter-v1"
    ok = await run(backend, created.backend_id)
    assert ok.exit_code == 0
    assert ok.stdout == "ok\n"
    FakeSandbox.live[created.backend_id].exit_code = 2
    failed = await run(backend, created.backend_id)
    assert failed.exit_code == 2
    assert failed.stderr == "boom"


async def test_cancelled_run_kills_its_command(backend: E2BBackend) -> None:
    created = await backend.create(
        "x", template="python", timeout=600, env={}, metadata={}
    )
    sandbox = FakeSandbox.live[created.backend_id]
    sandbox.exit_code = None
    call = asyncio.create_task(run(backend, created.backend_id))
    while not sandbox.commands_run:
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The command's process group (pid 1 here) is killed, not left running.
    assert sandbox.commands_run[1:] == ["kill -KILL -- -1"]


async def test_errors_map_to_interface(backend: E2BBackend) -> None:
    created = await backend.create(
        "x", template="base", timeout=600, env={}, metadata={}
    )
    sandbox = FakeSandbox.live[created.backend_id]
    sandbox.fault = e2b.RateLimitException("429")
    with pytest.raises(SandboxRetryLaterError):
        await run(backend, created.backend_id)
    sandbox.fault = e2b.TimeoutException("slow request")
    with pytest.raises(SandboxRetryLaterError):
        await run(backend, created.backend_id)
    sandbox.fault = e2b.TimeoutException("sandbox timeout")
    sandbox.running = False
    with pytest.raises(SandboxLostError):
        await run(backend, created.backend_id)
    FakeSandbox.create_fault = e2b.AuthenticationException("invalid API key")
    with pytest.raises(SandboxConfigurationError):
        await backend.create("y", template="base", timeout=60, env={}, metadata={})
    # A request that E2B refuses as made fails at once; a retry repeats it.
    refused = e2b.SandboxException("400: bad request")
    refused.status_code = 400  # type: ignore[attr-defined]
    FakeSandbox.create_fault = refused
    with pytest.raises(SandboxConfigurationError) as bad_request:
        await backend.create("z", template="base", timeout=60, env={}, metadata={})
    assert "rejected the request with HTTP 400" in str(bad_request.value)
    busy = e2b.SandboxException("500: oops")
    busy.status_code = 500  # type: ignore[attr-defined]
    FakeSandbox.create_fault = busy
    with pytest.raises(SandboxRetryLaterError):
        await backend.create("w", template="base", timeout=60, env={}, metadata={})


async def test_reconnect_passes_timeout(backend: E2BBackend) -> None:
    created = await backend.create(
        "x", template="base", timeout=900, env={}, metadata={}
    )
    fresh = E2BBackend(api_key="test-key", sandbox_class=FakeSandbox)
    await fresh.keep_alive(created.backend_id, 1800)
    assert FakeSandbox.connects == [(created.backend_id, 1800)]
    assert FakeSandbox.live[created.backend_id].timeout == 1800
    await fresh.delete(created.backend_id)
    with pytest.raises(SandboxLostError):
        await fresh.home(created.backend_id)
    state = await fresh.describe(created.backend_id)
    assert state.state == "lost"


async def test_session_recreates_lost_e2b_sandbox(
    backend: E2BBackend, tool_ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.sandbox import runtime
    from app.tools import invoke_tool

    monkeypatch.setattr(runtime, "get_backend", lambda settings: backend)
    created = await invoke_tool(tool_ctx, "sandbox_create", {"template": "base"})
    sandbox_id = created["sandbox_id"]
    try:
        status = await invoke_tool(
            tool_ctx, "sandbox_status", {"sandbox_id": sandbox_id}
        )
        first = status["backend_id"]
        # E2B ended the sandbox at its timeout: gone from the API.
        FakeSandbox.live.pop(first).running = False
        result = await invoke_tool(
            tool_ctx, "sandbox_execute", {"sandbox_id": sandbox_id, "code": "print(1)"}
        )
        assert result["recreated"] == 1
        assert result["stdout"] == "ok\n"
        after = await invoke_tool(
            tool_ctx, "sandbox_status", {"sandbox_id": sandbox_id}
        )
        assert after["backend_id"] != first
        assert after["live"]["alive"] is True
    finally:
        await invoke_tool(tool_ctx, "sandbox_delete", {"sandbox_id": sandbox_id})


async def test_unreachable_sandbox_is_kept(backend: E2BBackend) -> None:
    created = await backend.create(
        "sbx_a-g1", template="base", timeout=600, env={}, metadata={}
    )
    sandbox = FakeSandbox.live[created.backend_id]
    # The sandbox's own endpoint drops connections; the probe fails too.
    sandbox.fault = e2b.SandboxUnreachableException("connection reset")
    FakeSandbox.probe_fault = e2b.SandboxUnreachableException("connection reset")
    with pytest.raises(SandboxRetryLaterError) as raised:
        await run(backend, created.backend_id)
    assert "could not be reached" in str(raised.value)
    assert "sbx_a-g1" in str(raised.value)
    assert created.backend_id in FakeSandbox.live
    FakeSandbox.probe_fault = None
    ok = await run(backend, created.backend_id)
    assert ok.exit_code == 0


async def test_unclear_create_kills_orphan(backend: E2BBackend) -> None:
    FakeSandbox.create_fault_after = e2b.TimeoutException("request timed out")
    with pytest.raises(SandboxRetryLaterError) as raised:
        await backend.create(
            "sbx_b-g1", template="base", timeout=60, env={}, metadata={}
        )
    assert "sbx_b-g1" in str(raised.value)
    assert FakeSandbox.live == {}
    FakeSandbox.create_fault_after = ValueError("malformed body")
    with pytest.raises(SandboxRetryLaterError) as raised:
        await backend.create(
            "sbx_b-g1", template="base", timeout=60, env={}, metadata={}
        )
    assert "invalid response" in str(raised.value)
    assert FakeSandbox.live == {}


async def test_retried_create_adopts_earlier(backend: E2BBackend) -> None:
    # A hung create made its sandbox after the failure was handled.
    earlier = await FakeSandbox.create(
        "base", 60, {}, {"nexus_backend_id": "sbx_c-g1"}, "test-key"
    )
    extra = await FakeSandbox.create(
        "base", 60, {}, {"nexus_backend_id": "sbx_c-g1"}, "test-key"
    )
    other = await FakeSandbox.create(
        "base", 60, {}, {"nexus_backend_id": "sbx_d-g1"}, "test-key"
    )
    created = await backend.create(
        "sbx_c-g1", template="base", timeout=60, env={}, metadata={}
    )
    assert created.backend_id == earlier.sandbox_id
    assert extra.sandbox_id not in FakeSandbox.live
    assert other.sandbox_id in FakeSandbox.live
    assert len(FakeSandbox.live) == 2


async def test_create_lookup_failure_named(backend: E2BBackend) -> None:
    FakeSandbox.list_fault = e2b.SandboxException("500: upstream failed")
    FakeSandbox.list_fault.status_code = 500
    with pytest.raises(SandboxRetryLaterError) as raised:
        await backend.create(
            "sbx_e-g1", template="base", timeout=60, env={}, metadata={}
        )
    assert "could not list E2B sandboxes" in str(raised.value)
    assert "retry later" in str(raised.value)
    assert FakeSandbox.live == {}


async def test_error_texts_name_cause(backend: E2BBackend) -> None:
    rejected = e2b.SandboxException("403: forbidden")
    rejected.status_code = 403
    FakeSandbox.create_fault = rejected
    with pytest.raises(SandboxConfigurationError) as configuration:
        await backend.create(
            "sbx_f-g1", template="base", timeout=60, env={}, metadata={}
        )
    assert "E2B_API_KEY" in str(configuration.value)
    failed = e2b.SandboxException("502: bad gateway")
    failed.status_code = 502
    FakeSandbox.create_fault = failed
    with pytest.raises(SandboxRetryLaterError) as server:
        await backend.create(
            "sbx_f-g1", template="base", timeout=60, env={}, metadata={}
        )
    assert "E2B failed with HTTP 502, so retry later" in str(server.value)


async def test_session_when_e2b_is_down(
    backend: E2BBackend, tool_ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.sandbox import runtime
    from app.tools import ToolError, invoke_tool

    monkeypatch.setattr(runtime, "get_backend", lambda settings: backend)
    created = await invoke_tool(tool_ctx, "sandbox_create", {"template": "base"})
    sandbox_id = created["sandbox_id"]
    down = e2b.SandboxException("500: internal error")
    down.status_code = 500
    try:
        FakeSandbox.probe_fault = down
        status = await invoke_tool(
            tool_ctx, "sandbox_status", {"sandbox_id": sandbox_id}
        )
        assert status["status"] == "running"
        assert status["live"] is None
        FakeSandbox.probe_fault = None
        # Every attempt of an execution finds E2B failing: the caller may try
        # later, so the error is `unavailable` (503), not a plain failure.
        sandbox = next(iter(FakeSandbox.live.values()))
        original_run = sandbox.run

        async def failing_run(*args: Any, **kwargs: Any) -> Any:
            raise down

        sandbox.run = failing_run  # type: ignore[method-assign]
        with pytest.raises(ToolError) as unavailable:
            await invoke_tool(
                tool_ctx,
                "sandbox_execute",
                {"sandbox_id": sandbox_id, "code": "print(1)"},
            )
        assert unavailable.value.kind == "unavailable", unavailable.value.message
        assert "E2B failed with HTTP 500, so retry later" in unavailable.value.message
        sandbox.run = original_run  # type: ignore[method-assign]
        FakeSandbox.kill_fault = down
        with pytest.raises(Exception) as raised:
            await invoke_tool(tool_ctx, "sandbox_stop", {"sandbox_id": sandbox_id})
        assert "the stop failed: E2B sandbox" in str(raised.value)
        assert "500" in str(raised.value)
        assert "again to retry" in str(raised.value)
    finally:
        FakeSandbox.kill_fault = None
        await invoke_tool(tool_ctx, "sandbox_delete", {"sandbox_id": sandbox_id})


async def test_health_lists_one_sandbox(backend: E2BBackend) -> None:
    report = await backend.health()
    assert report["status"] == "healthy"
    assert report["backend"] == "e2b"
    assert isinstance(report["latency_ms"], float)
    assert "error" not in report


async def test_health_rejected_key(backend: E2BBackend) -> None:
    FakeSandbox.list_fault = e2b.AuthenticationException("Invalid API key")
    report = await backend.health()
    assert report["status"] == "unhealthy"
    assert "set a valid E2B_API_KEY" in str(report["error"])
    assert "Invalid API key" in str(report["error"])
    assert "test-key" not in str(report)


async def test_errors_mask_quoted_key(
    backend: E2BBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # A reply that quotes the key it rejected, as a stand-in for E2B can.
    FakeSandbox.list_fault = e2b.AuthenticationException("Invalid API key test-key")
    report = await backend.health()
    assert report["status"] == "unhealthy"
    assert "test-key" not in str(report)
    assert "Invalid API key ********" in str(report["error"])
    FakeSandbox.list_fault = None
    FakeSandbox.create_fault = e2b.AuthenticationException("bad key test-key")
    with pytest.raises(SandboxConfigurationError) as rejected:
        await backend.create("y", template="base", timeout=60, env={}, metadata={})
    assert "test-key" not in str(rejected.value)
    assert "bad key ********" in str(rejected.value)
    assert "test-key" not in caplog.text


async def test_health_unreachable_e2b(backend: E2BBackend) -> None:
    FakeSandbox.list_fault = httpx.ConnectError("connection refused")
    report = await backend.health()
    assert report["status"] == "unhealthy"
    assert "network path to E2B" in str(report["error"])


async def test_health_silent_e2b(
    backend: E2BBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hang(self: FakePages) -> list[Any]:
        await asyncio.sleep(60)
        return []

    monkeypatch.setattr(FakePages, "next_items", hang)
    monkeypatch.setattr("app.sandbox.e2b.HEALTH_PROBE_SECONDS", 0.2)
    report = await backend.health()
    assert report["status"] == "unhealthy"
    assert "did not answer a sandbox listing within 0.2 s" in str(report["error"])


async def test_silent_e2b_fails_within_bounds(backend: E2BBackend) -> None:
    """A sandbox whose agent stops responding fails a run within the backend's
    bounds, as retry-later, instead of holding the call."""
    created = await backend.create(
        "sbx_s-g1", template="base", timeout=600, env={}, metadata={}
    )
    sandbox = FakeSandbox.live[created.backend_id]
    backend.request_seconds = backend.probe_seconds = 0.2

    async def silent(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    sandbox.run = silent  # type: ignore[method-assign]
    sandbox.is_running = silent  # type: ignore[method-assign]
    # The outer bound only keeps a regression from hanging the suite.
    with pytest.raises(SandboxRetryLaterError) as raised:
        await asyncio.wait_for(run(backend, created.backend_id), 60)
    assert "did not respond within 0.2 s" in str(raised.value)
    assert created.backend_id in FakeSandbox.live
    with pytest.raises(SandboxRetryLaterError) as unknown:
        await asyncio.wait_for(backend.describe(created.backend_id), 60)
    assert "did not respond within 0.2 s" in str(unknown.value)


@pytest.fixture
async def e2b_tools(
    client: Client, tmp_path: Path, temporal_address: str
) -> AsyncIterator[ToolContext]:
    """Tools and workers with NEXUS_SANDBOX_BACKEND=e2b and no E2B_API_KEY."""
    settings = sandbox_test_settings(
        tmp_path, temporal_address, sandbox_backend="e2b", e2b_api_key=None
    )
    load_tools()
    async with running_workers(client, settings, [ORCHESTRATION, SANDBOX]):
        yield ToolContext(settings, user_id="test", temporal_client=client)


async def test_missing_key_is_client_error(e2b_tools: ToolContext) -> None:
    with pytest.raises(ToolError) as caught:
        await invoke_tool(e2b_tools, "sandbox_create", {"template": "base"})
    assert caught.value.kind == "conflict"
    assert error_status(caught.value) == 409
    assert "needs E2B_API_KEY" in caught.value.message
    assert "NEXUS_SANDBOX_BACKEND=local" in caught.value.message


async def test_rejected_key_is_client_error(
    backend: E2BBackend, e2b_tools: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "get_backend", lambda settings: backend)
    FakeSandbox.create_fault = e2b.AuthenticationException("invalid API key")
    with pytest.raises(ToolError) as caught:
        await invoke_tool(e2b_tools, "sandbox_create", {"template": "base"})
    assert caught.value.kind == "conflict"
    assert error_status(caught.value) == 409
    assert "set a valid E2B_API_KEY" in caught.value.message
