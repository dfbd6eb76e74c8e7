"""Stopping the HTTP server while a call waits on work that cannot finish:
the caller gets a 503 that says so, not a dropped connection."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
from temporalio.client import Client

from app.api.http import STOP_GRACE_SECONDS
from app.api.keys import create_key
from app.settings import Settings
from app.tools import ToolContext
from tests.api.conftest import REPO_ROOT, server_env
from tests.support.servers import free_port
from tests.workflows.conftest import call


async def test_stop_answers_call_in_flight(
    client: Client, api_settings: Settings
) -> None:
    tools = ToolContext(api_settings, temporal_client=client)
    created = await call(
        tools,
        "workflow_create",
        name="waits-for-a-worker",
        steps=[{"name": "a", "type": "echo"}],
    )
    token, _ = create_key(api_settings.effective_database_url, "stop-test")
    port = free_port()
    env = {**server_env(api_settings), "NEXUS_HTTP_PORT": str(port)}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.api"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for _ in range(300):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            # No worker polls the orchestration queue in this module, so the
            # run never ends and the call waits until the stop.
            waiting = asyncio.create_task(
                http.post(
                    "/api/tools/workflow_execute",
                    json={"workflow_id": created["workflow_id"], "async": False},
                    headers={"Authorization": f"Bearer {token}"},
                )
            )
            await asyncio.sleep(1.0)
            assert not waiting.done()
            stopped_at = time.monotonic()
            server.send_signal(signal.SIGTERM)
            response = await waiting
        answered_after = time.monotonic() - stopped_at
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["kind"] == "unavailable"
        assert (
            "the server is stopping, and workflow_execute had not" in error["message"]
        )
        assert "It may still take effect" in error["message"]
        assert answered_after >= STOP_GRACE_SECONDS - 0.5
        # uvicorn raises the signal again once it has shut down.
        assert server.wait(timeout=30) == -signal.SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        async for listed in client.list_workflows(
            f"NexusDefinitionId = '{created['workflow_id']}'"
        ):
            await client.get_workflow_handle(listed.id).terminate()
