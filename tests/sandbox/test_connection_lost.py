"""A sandbox call whose Temporal server stops while the program runs.

The test starts a Temporal server of its own, because it stops that server
in the middle of a call, and the rest of the suite shares the session's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.settings import Settings
from app.temporal.client import connect
from app.temporal.devserver import EmbeddedTemporal
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from tests.conftest import running_workers
from tests.support.sandboxes import sandbox_test_settings
from tests.support.servers import free_port

GATED_PROGRAM = (
    "import pathlib, time\n"
    "pathlib.Path('started').touch()\n"
    "while not pathlib.Path('gate').exists():\n"
    "    time.sleep(0.05)\n"
    "print('done')\n"
)


async def call(ctx: ToolContext, name: str, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, name, arguments)


def own_server_settings(tmp_path: Path) -> tuple[Settings, str]:
    """Return settings for a Temporal server of the test's own, and its address."""
    port, ui_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    settings = sandbox_test_settings(
        tmp_path, address, temporal_port=port, temporal_ui_port=ui_port
    )
    return settings, address


async def test_execute_names_lost_connection(tmp_path: Path) -> None:
    settings, address = own_server_settings(tmp_path)
    server = EmbeddedTemporal(settings)
    await server.start()
    try:
        client = await connect(settings)
        load_tools()
        ctx = ToolContext(settings, user_id="test", temporal_client=client)
        async with running_workers(client, settings, [ORCHESTRATION, SANDBOX]):
            created = await call(ctx, "sandbox_create", template="base")
            sandbox_id = created["sandbox_id"]
            status = await call(ctx, "sandbox_status", sandbox_id=sandbox_id)
            home = tmp_path / "sandboxes" / status["backend_id"] / "home"
            running = asyncio.create_task(
                call(ctx, "sandbox_execute", sandbox_id=sandbox_id, code=GATED_PROGRAM)
            )
            try:
                while not (home / "started").exists():
                    assert not running.done(), running.result()
                    await asyncio.sleep(0.05)
                server.stop()
                with pytest.raises(ToolError) as caught:
                    await asyncio.wait_for(running, 120)
            finally:
                (home / "gate").write_text("open")
                await server.start()
                await asyncio.gather(running, return_exceptions=True)
                await call(ctx, "sandbox_delete", sandbox_id=sandbox_id)
    finally:
        server.stop()

    # The HTTP API returns status 503 for this kind.
    assert caught.value.kind == "unavailable"
    message = caught.value.message
    assert (
        f"the connection to the platform (Temporal at {address}) was lost during "
        f"the execute call to sandbox {sandbox_id}"
    ) in message
    assert "The execution is durable" in message
    assert "runs again, from the start, once the platform is back" in message
    assert "sandbox_logs" in message
    assert f"execution_stream_subscribe on sandbox_id {sandbox_id}" in message
    assert "with call_id execute-" in message


async def test_create_names_lost_connection(tmp_path: Path) -> None:
    settings, address = own_server_settings(tmp_path)
    server = EmbeddedTemporal(settings)
    await server.start()
    try:
        client = await connect(settings)
    finally:
        server.stop()
    load_tools()
    ctx = ToolContext(settings, user_id="test", temporal_client=client)
    with pytest.raises(ToolError) as caught:
        await call(ctx, "sandbox_create", template="base")

    assert caught.value.kind == "unavailable"
    assert (
        f"the connection to the platform (Temporal at {address}) was lost during "
        "the create call to sandbox"
    ) in caught.value.message
    assert "check with sandbox_status before you send it again" in caught.value.message
