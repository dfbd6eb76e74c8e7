"""The HTTP server as its own process, stopped or killed while calls run:
a call still waiting at a stop gets a 503 response, not a dropped
connection, and a call that got its response keeps its audit row."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from temporalio.client import Client

from app.api.http import STOP_GRACE_SECONDS
from app.api.keys import create_key
from app.services.audit import list_calls
from app.settings import Settings
from app.tools import ToolContext
from tests.api.conftest import REPO_ROOT, server_env
from tests.support.servers import free_port
from tests.workflows.conftest import call


@asynccontextmanager
async def http_server(
    settings: Settings,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], httpx.AsyncClient]]:
    """Start `python -m app.api` and yield it with a client once it responds;
    kill it afterwards unless the test ended it."""
    port = free_port()
    env = {
        **server_env(settings),
        "NEXUS_HTTP_PORT": str(port),
        "NEXUS_API_RATE_LIMIT": "10000",
        "NEXUS_API_RATE_BURST": "10000",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "app.api"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for _ in range(300):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            yield server, http
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


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
    try:
        async with http_server(api_settings) as (server, http):
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
            # uvicorn raises the signal again once it has shut down.
            assert server.wait(timeout=30) == -signal.SIGTERM
    finally:
        async for listed in client.list_workflows(
            f"NexusDefinitionId = '{created['workflow_id']}'"
        ):
            await client.get_workflow_handle(listed.id).terminate()
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["kind"] == "unavailable"
    assert "the server is stopping, and workflow_execute had not" in error["message"]
    assert "It may still take effect" in error["message"]
    assert answered_after >= STOP_GRACE_SECONDS - 0.5
    # The audit row gives the reason the call ended, and the caller's response.
    [event] = list_calls(
        api_settings.effective_database_url, tool="workflow_execute", limit=1
    )
    assert event.error is not None
    assert "the caller got 503, and the call may still take effect" in event.error


async def test_killed_server_keeps_audit_rows_of_answered_calls(
    api_settings: Settings,
) -> None:
    """A call that got a 200 response has its audit row even when the server is killed
    (SIGKILL, no shutdown) while other calls run."""
    token, info = create_key(api_settings.effective_database_url, "kill-test")
    answered: list[str] = []
    async with http_server(api_settings) as (server, http):

        async def upload(index: int) -> None:
            path = f"kill/{index}.txt"
            try:
                response = await http.post(
                    "/api/tools/storage_upload",
                    json={"bucket": "kill-test", "path": path, "content": "x"},
                    headers={"Authorization": f"Bearer {token}"},
                )
            except httpx.TransportError:
                return
            if response.status_code == 200:
                answered.append(path)
                if len(answered) == 150:
                    server.send_signal(signal.SIGKILL)

        lanes = asyncio.Semaphore(20)

        async def limited(index: int) -> None:
            async with lanes:
                await upload(index)

        await asyncio.gather(*(limited(index) for index in range(400)))
    assert len(answered) >= 150
    audited = {
        event.arguments["path"]
        for event in list_calls(
            api_settings.effective_database_url, tool="storage_upload", limit=1000
        )
        if event.key_id == info.id and event.outcome == "success"
    }
    assert set(answered) <= audited, sorted(set(answered) - audited)
