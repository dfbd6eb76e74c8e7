"""Calls that race a stop or delete of their sandbox: none recreates it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from app.sandbox import local, runtime, service
from app.tools import ToolContext, ToolError, invoke_tool
from tests.support.replay import replay_run
from workflows.sandbox import SandboxSessionWorkflow


async def call(ctx: ToolContext, name: str, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, name, arguments)


def entries_of(ctx: ToolContext, sandbox_id: str) -> list[str]:
    """Return the names under the sandboxes folder that belong to `sandbox_id`."""
    folder = ctx.settings.resolved_data_dir / "sandboxes"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(sandbox_id))


async def running_ids(ctx: ToolContext) -> list[str]:
    listed = await call(ctx, "sandbox_list", status="running")
    return [s["sandbox_id"] for s in listed["sandboxes"]]


@pytest.mark.parametrize("end", ["stop", "delete"])
async def test_execute_after_end_not_recreated(
    tool_ctx: ToolContext,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    end: str,
) -> None:
    """An execute whose backend call reaches the sandbox only after a stop or
    delete killed it fails as not_found, and the sandbox stays ended."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    entered = asyncio.Event()
    ended = asyncio.Event()
    real_execute = runtime.execute

    async def execute_after_end(*args: Any, **kwargs: Any) -> Any:
        # Hold the execution until the stop or delete has killed the runner,
        # the order that a busy worker produces by chance.
        entered.set()
        await ended.wait()
        return await real_execute(*args, **kwargs)

    monkeypatch.setattr(runtime, "execute", execute_after_end)
    execution = asyncio.create_task(
        call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(1)")
    )
    try:
        await entered.wait()
        finished = await call(tool_ctx, f"sandbox_{end}", sandbox_id=sandbox_id)
        status_name = "stopped" if end == "stop" else "deleted"
        assert finished["status"] == status_name
        ended.set()
        with pytest.raises(ToolError) as rejected:
            await execution
        assert rejected.value.kind == "not_found"
        assert f"sandbox {sandbox_id} is {status_name}" in rejected.value.message
        await service.wait_ended(client, sandbox_id)
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["status"] == status_name
        assert status["recreated"] == 0
        assert "recreated" not in [e["kind"] for e in status["events"]]
        assert sandbox_id not in await running_ids(tool_ctx)
        assert entries_of(tool_ctx, sandbox_id) == []
    finally:
        ended.set()
        execution.cancel()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_execute_during_stop_not_found(
    tool_ctx: ToolContext, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    entered = asyncio.Event()
    released = asyncio.Event()
    real_stop = local.LocalBackend.stop

    async def slow_stop(self: local.LocalBackend, backend_id: str) -> None:
        entered.set()
        await released.wait()
        await real_stop(self, backend_id)

    monkeypatch.setattr(local.LocalBackend, "stop", slow_stop)
    stop = asyncio.create_task(call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id))
    try:
        await entered.wait()
        with pytest.raises(ToolError) as rejected:
            await call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="1")
        assert rejected.value.kind == "not_found"
        assert rejected.value.message.startswith(
            f"sandbox {sandbox_id} is being stopped, so it takes no more calls"
        )
        released.set()
        assert (await stop)["status"] == "stopped"
    finally:
        released.set()
        stop.cancel()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)


async def test_configure_cut_by_stop_not_found(
    tool_ctx: ToolContext, client: Client
) -> None:
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    folder = tool_ctx.settings.resolved_data_dir / "sandboxes" / status["backend_id"]
    configure = asyncio.create_task(
        call(
            tool_ctx,
            "sandbox_configure",
            sandbox_id=sandbox_id,
            run_commands=["touch started; sleep 30"],
        )
    )
    try:
        while not any(Path(p).name == "started" for p in folder.rglob("started")):
            assert not configure.done(), configure.result()
            await asyncio.sleep(0.05)
        await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        with pytest.raises(ToolError) as failed:
            await configure
        assert failed.value.kind == "not_found"
        assert failed.value.message.startswith(
            f"sandbox {sandbox_id} is stopped, which ended this call"
        )
        assert "Fix the failing step" not in failed.value.message
    finally:
        configure.cancel()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])


async def test_stop_during_recreation_not_recreated(
    tool_ctx: ToolContext, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that arrives while a call recreates its lost sandbox removes
    the new sandbox too, and the call fails as not_found."""
    created = await call(tool_ctx, "sandbox_create", template="base")
    sandbox_id = created["sandbox_id"]
    status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
    folder = tool_ctx.settings.resolved_data_dir / "sandboxes" / status["backend_id"]
    shutil.rmtree(folder / "home")
    entered = asyncio.Event()
    released = asyncio.Event()
    real_create = local.LocalBackend.create

    async def slow_recreate(
        self: local.LocalBackend, backend_id: str, **kwargs: Any
    ) -> Any:
        if backend_id.endswith("-g2"):
            entered.set()
            await released.wait()
        return await real_create(self, backend_id, **kwargs)

    monkeypatch.setattr(local.LocalBackend, "create", slow_recreate)
    execution = asyncio.create_task(
        call(tool_ctx, "sandbox_execute", sandbox_id=sandbox_id, code="print(1)")
    )
    try:
        await entered.wait()
        stopped = await call(tool_ctx, "sandbox_stop", sandbox_id=sandbox_id)
        assert stopped["status"] == "stopped"
        released.set()
        with pytest.raises(ToolError) as rejected:
            await execution
        assert rejected.value.kind == "not_found"
        assert f"sandbox {sandbox_id} is stopped" in rejected.value.message
        await service.wait_ended(client, sandbox_id)
        status = await call(tool_ctx, "sandbox_status", sandbox_id=sandbox_id)
        assert status["status"] == "stopped"
        assert status["recreated"] == 0
        assert sandbox_id not in await running_ids(tool_ctx)
        assert entries_of(tool_ctx, sandbox_id) == []
    finally:
        released.set()
        execution.cancel()
        await call(tool_ctx, "sandbox_delete", sandbox_id=sandbox_id)
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])
