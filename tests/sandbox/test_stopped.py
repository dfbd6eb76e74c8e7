"""Stopped sandboxes: what the tools still return, and what stays on disk."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from app.sandbox import local, service
from app.sandbox.backend import SandboxBackendError
from app.tools import ToolContext, ToolError, invoke_tool
from tests.support.replay import replay_run, replay_saved
from workflows.sandbox import SandboxSessionWorkflow


async def call(ctx: ToolContext, name: str, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, name, arguments)


def sandboxes_folder(ctx: ToolContext) -> Path:
    return ctx.settings.resolved_data_dir / "sandboxes"


def entries_of(ctx: ToolContext, sandbox_id: str) -> list[str]:
    """Return the names under the sandboxes folder that belong to `sandbox_id`."""
    folder = sandboxes_folder(ctx)
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(sandbox_id))


async def test_stop_removes_backend_folder(
    tool_ctx: ToolContext, client: Client
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        await call(
            tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print('hello')"
        )
        backend_id = (await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id))[
            "backend_id"
        ]
        assert entries_of(tool_ctx, sandbox_id) == [backend_id]
        stopped = await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        assert stopped["status"] == "stopped"
        await service.wait_ended(client, sandbox_id)
        assert entries_of(tool_ctx, sandbox_id) == []
        # What the tools promise for a stopped sandbox comes from the session
        # and the mirror row, not from the backend.
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["status"] == "stopped"
        assert status["backend_id"] == backend_id
        assert status["live"] is None
        assert [e["kind"] for e in status["events"]][-1] == "stopped"
        logs = await call(tool_ctx, "sandbox_logs", sandbox_id=sandbox_id)
        assert logs["lines"] == ["[stdout] hello"]
        listed = await call(tool_ctx, "sandbox_list", status="stopped")
        assert [s["sandbox_id"] for s in listed["sandboxes"]] == [sandbox_id]
        with pytest.raises(ToolError) as rejected:
            await call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="1")
        assert rejected.value.kind == "not_found"
        assert f"sandbox {sandbox_id} has no running session" in (
            rejected.value.message
        )
    finally:
        deleted = await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    assert deleted["status"] == "deleted"
    assert (await call(tool_ctx, "sandbox_list", status="all"))["count"] == 0
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def _start_program(
    ctx: ToolContext, code: str
) -> tuple[str, Path, asyncio.Task[dict[str, Any]]]:
    """Create a sandbox and start the bash `code` in it, which touches
    `started`. Return the sandbox id, that file's path and the execution."""
    created = await call(ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    status = await call(ctx, "sandbox_status", sandbox_id=sandbox_id)
    started = sandboxes_folder(ctx) / status["backend_id"] / "home" / "started"
    execution = asyncio.create_task(
        call(ctx, "sandbox_execute", sandbox_id=sandbox_id, code=code, language="bash")
    )
    return sandbox_id, started, execution


async def test_stop_during_execution_then_removed(
    tool_ctx: ToolContext, client: Client
) -> None:
    sandbox_id, started, execution = await _start_program(
        tool_ctx, "touch started; sleep 30"
    )
    try:
        while not started.exists():
            await asyncio.sleep(0.05)
        await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        result = await execution
        # The session removes the folder only after this execution has read
        # the stopped mark in the state file.
        assert result["exit_code"] is None
        assert "was stopped during this execution" in result["stderr"]
        await service.wait_ended(client, sandbox_id)
        assert entries_of(tool_ctx, sandbox_id) == []
    finally:
        execution.cancel()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_stop_twice_returns_stopped(
    tool_ctx: ToolContext, client: Client
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    try:
        first = await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        assert first["status"] == "stopped"
        await service.wait_ended(client, sandbox_id)
        again = await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        assert again["status"] == "stopped"
    finally:
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    after_delete = await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
    assert after_delete["status"] == "deleted"
    with pytest.raises(ToolError) as unknown:
        await call(tool_ctx, "sandbox_stop", sandbox_id="sbx_000000000000")
    assert unknown.value.kind == "not_found"


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("sandbox_execute", {"code": "1"}),
        ("sandbox_configure", {"run_commands": ["true"]}),
        ("sandbox_upload", {"file_path": "a.txt", "content": "a"}),
        ("sandbox_logs", {}),
        ("sandbox_status", {}),
        ("sandbox_stop", {}),
        ("sandbox_delete", {}),
    ],
)
async def test_unknown_sandbox_is_not_found(
    tool_ctx: ToolContext, tool: str, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ToolError) as unknown:
        await call(tool_ctx, tool, sandbox_id="sbx_000000000000", **arguments)
    assert unknown.value.kind == "not_found"
    assert "sandbox sbx_000000000000 not found" in unknown.value.message
    assert "no running session" not in unknown.value.message


async def test_concurrent_stops_both_stopped(
    tool_ctx: ToolContext, client: Client
) -> None:
    sandbox_id, started, execution = await _start_program(
        tool_ctx, "trap '' TERM; touch started; sleep 30"
    )
    try:
        while not started.exists():
            assert not execution.done(), execution.result()
            await asyncio.sleep(0.05)
        # Both updates reach the busy session in the same workflow task, so
        # the second finds the first's stop in progress.
        stops = await asyncio.gather(
            call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id),
            call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id),
        )
        assert [stop["status"] for stop in stops] == ["stopped", "stopped"]
        result = await execution
        assert "was stopped during this execution" in result["stderr"]
    finally:
        execution.cancel()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_stopped_before_cleanup_replays(client: Client) -> None:
    # Recorded before a stopped session deleted its backend's remains.
    await replay_saved(
        client, "sandbox_stopped_before_cleanup", [SandboxSessionWorkflow]
    )


async def test_delete_removal_failure_kind(
    tool_ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]

    def failing_removal(path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as patched:
        patched.setattr(local, "_remove_tree", failing_removal)
        with pytest.raises(ToolError) as failed:
            await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    # The request was valid, and the backend failed to carry it out.
    assert failed.value.kind == "failed"
    assert "could not be fully removed" in failed.value.message
    # The session ended with the failure recorded, not `running`.
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    assert status["status"] == "failed"
    assert status["error"].startswith("the delete failed: ")
    listed = await call(tool_ctx, "sandbox_list", status="running")
    assert sandbox_id not in [s["sandbox_id"] for s in listed["sandboxes"]]
    deleted = await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    assert deleted["status"] == "deleted"
    assert entries_of(tool_ctx, sandbox_id) == []


async def test_failed_stop_recorded(
    tool_ctx: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop whose backend call fails ends the session as `failed` with the
    cause, and the session's end removes the sandbox on the backend."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]

    async def failing_stop(self: local.LocalBackend, backend_id: str) -> None:
        raise SandboxBackendError(f"could not kill the processes of {backend_id}")

    with monkeypatch.context() as patched:
        patched.setattr(local.LocalBackend, "stop", failing_stop)
        with pytest.raises(ToolError) as failed:
            await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
    assert failed.value.kind == "failed"
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    assert status["status"] == "failed"
    assert status["error"] == (
        f"the stop failed: could not kill the processes of {status['backend_id']}"
    )
    await service.wait_ended(tool_ctx.temporal_client, sandbox_id)
    assert entries_of(tool_ctx, sandbox_id) == []
    await replay_run(
        tool_ctx.temporal_client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow]
    )
    deleted = await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    assert deleted["status"] == "deleted"
