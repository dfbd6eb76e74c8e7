"""The E2B adapter against a stand-in `AsyncSandbox` that raises the SDK's
real exception types, to prove the error mapping and recreation."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import e2b
import pytest

from app.sandbox.backend import (
    SandboxConfigurationError,
    SandboxLostError,
    SandboxRetryLaterError,
)
from app.sandbox.e2b import E2BBackend


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


class FakeSandbox:
    """Stands in for `e2b.AsyncSandbox`; `fault` forces the next command's error."""

    live: ClassVar[dict[str, FakeSandbox]] = {}
    connects: ClassVar[list[tuple[str, int | None]]] = []
    create_fault: BaseException | None = None
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
        cls.live[sandbox.sandbox_id] = sandbox
        return sandbox

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
