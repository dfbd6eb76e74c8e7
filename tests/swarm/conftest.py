"""Fixtures for swarm tests: workers on the orchestration and sandbox queues
with a per-test SQLite database, and a tool context that cleans up swarms."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.sandbox import service as sandbox_service
from app.sandbox.runtime import get_backend
from app.sandbox.service import SandboxServiceError
from app.settings import Settings
from app.swarm.executor import agent_sandbox_id
from app.tools import ToolContext, invoke_tool, load_tools
from tests.conftest import running_workers
from tests.support.sandboxes import sandbox_test_settings

load_tools()

SWARM_QUEUES = (ORCHESTRATION, SANDBOX)


@pytest.fixture
def swarm_settings(tmp_path: Path, temporal_address: str) -> Settings:
    return sandbox_test_settings(tmp_path, temporal_address)


class Swarms:
    """Tool calls for a test, remembering every swarm so teardown ends it."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.ctx = ToolContext(settings, user_id="swarm-test", temporal_client=client)
        self.swarm_ids: list[str] = []
        self.workflow_ids: list[str] = []

    async def call(self, tool: str, /, **arguments: Any) -> dict[str, Any]:
        result = await invoke_tool(self.ctx, tool, arguments)
        if tool == "swarm_init":
            self.swarm_ids.append(result["swarm_id"])
            self.workflow_ids.append(f"swarm-{result['swarm_id']}")
        elif tool == "agent_spawn":
            self.workflow_ids.append(f"sandbox-{agent_sandbox_id(result['agent_id'])}")
        elif tool == "swarm_scale":
            self.workflow_ids += [
                f"sandbox-{agent_sandbox_id(a)}" for a in result["added"]
            ]
        elif tool == "task_orchestrate":
            self.workflow_ids.append(result["workflow_id"])
        return result

    async def swarm(
        self, topology: str, agents: list[str], **options: Any
    ) -> tuple[str, list[dict[str, Any]]]:
        """Start a swarm and spawn one agent per type in `agents`."""
        swarm = await self.call("swarm_init", topology=topology, **options)
        spawned = [
            await self.call(
                "agent_spawn", type=kind, name=f"{kind}-{i}", swarm_id=swarm["swarm_id"]
            )
            for i, kind in enumerate(agents)
        ]
        return swarm["swarm_id"], spawned

    async def run_task(self, **arguments: Any) -> dict[str, Any]:
        """Orchestrate a task and return its results once it ends."""
        task = await self.call("task_orchestrate", **arguments)
        return await self.call(
            "task_results", task_id=task["task_id"], wait_seconds=120
        )

    async def cleanup(self) -> None:
        """Terminate every swarm, task and agent sandbox session still running."""
        for workflow_id in self.workflow_ids:
            handle = self.client.get_workflow_handle(workflow_id)
            with contextlib.suppress(RPCError):
                description = await handle.describe()
                if description.status == WorkflowExecutionStatus.RUNNING:
                    await handle.terminate("test finished")


async def agent_folder(swarms: Swarms, agent_id: str, timeout: float = 60.0) -> Path:
    """Host folder of an agent's local sandbox, once the agent has one.

    Programs in the sandbox see it as their working folder, so a test
    exchanges gate and marker files with them there.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sandbox_id = agent_sandbox_id(agent_id)
    while True:
        with contextlib.suppress(SandboxServiceError):
            info = await sandbox_service.info(swarms.client, sandbox_id)
            if info.backend_id and info.status == "running":
                return get_backend(swarms.settings).folder(info.backend_id)  # type: ignore[attr-defined,no-any-return]
        if loop.time() > deadline:
            raise TimeoutError(f"agent {agent_id} has no sandbox after {timeout} s")
        await asyncio.sleep(0.05)


async def mirrored(ctx: ToolContext, swarm_id: str, agents: int) -> None:
    """Wait until the swarm mirror lists `agents` agents of the swarm."""
    for _ in range(300):
        listed = await invoke_tool(ctx, "swarm_list", {})
        counts = {s["swarm_id"]: s["agent_count"] for s in listed["swarms"]}
        if counts.get(swarm_id) == agents:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"swarm {swarm_id} never showed {agents} agents")


async def wait_for_file(path: Path, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        await asyncio.sleep(0.05)


# Waits in its sandbox folder until the test writes `gate` there.
GATED_PROGRAM = (
    "import pathlib, time\n"
    "open('attempts', 'a').write('x')\n"
    "pathlib.Path('started').touch()\n"
    "while not pathlib.Path('gate').exists():\n    time.sleep(0.05)\n"
    "print('gate opened')\n"
)


# Counts in `ticks` until it is stopped.
TICKING_PROGRAM = (
    "import pathlib, time\n"
    "pathlib.Path('started').touch()\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    pathlib.Path('ticks').write_text(str(n))\n"
    "    time.sleep(0.1)\n"
)


async def wait_until_still(path: Path, timeout: float) -> None:
    """Wait until the file `path` stops changing for 2 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = path.read_text(), loop.time()
    while loop.time() - since < 2.0:
        if loop.time() > deadline:
            raise TimeoutError(f"{path} still changed after {timeout} s")
        await asyncio.sleep(0.2)
        current = path.read_text()
        if current != last:
            last, since = current, loop.time()


async def start_gated_task(swarms: Swarms) -> tuple[str, str, dict[str, Any], Path]:
    """Start a one-agent mesh swarm whose first task runs GATED_PROGRAM, and
    wait until the program runs. Return the swarm id, the agent id, the
    task and the agent's sandbox folder."""
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    agent_id = agents[0]["agent_id"]
    task = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    folder = await agent_folder(swarms, agent_id)
    await wait_for_file(folder / "started")
    return swarm_id, agent_id, task, folder


@pytest.fixture
async def swarms(client: Client, swarm_settings: Settings) -> AsyncIterator[Swarms]:
    """Workers for the swarm queues and a `Swarms` helper bound to them."""
    helper = Swarms(client, swarm_settings)
    async with running_workers(client, swarm_settings, SWARM_QUEUES):
        try:
            yield helper
        finally:
            await helper.cleanup()
