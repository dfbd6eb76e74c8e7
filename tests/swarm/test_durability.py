"""Swarms and tasks survive workers that stop, and long swarms continue as new."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from activities.integration import step_user
from activities.swarm import HEARTBEAT_SECONDS
from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.contracts.swarm import SwarmState, SwarmWorkflowInput, task_workflow_id
from app.sandbox import service as sandbox_service
from app.sandbox.runtime import get_backend
from app.services.audit import list_calls
from app.settings import Settings
from app.swarm.agent_tasks import step_task_id
from tests.conftest import TEST_ENCRYPTION_KEY, running_workers, wait_for_pollers
from tests.support.replay import replay_run
from tests.swarm.conftest import (
    GATED_PROGRAM,
    SWARM_QUEUES,
    Swarms,
    agent_folder,
    mirrored,
    start_gated_task,
    wait_for_file,
)
from workers.registry import all_workflows, queue_spec


@contextlib.asynccontextmanager
async def sandbox_worker(client: Client, settings: Settings) -> AsyncIterator[Worker]:
    """A sandbox-queue worker that stops at once, cancelling what it runs, as a
    crashed worker process would."""
    spec = queue_spec(SANDBOX, settings)
    worker = Worker(
        client,
        task_queue=SANDBOX,
        activities=spec.activities,
        graceful_shutdown_timeout=timedelta(0),
    )
    async with worker:
        yield worker


async def test_task_completes_after_worker_dies(
    client: Client, swarm_settings: Settings
) -> None:
    helper = Swarms(client, swarm_settings)
    try:
        async with running_workers(client, swarm_settings, [ORCHESTRATION]):
            async with sandbox_worker(client, swarm_settings):
                swarm_id, agents = await helper.swarm("mesh", ["coder"])
                task = await helper.call(
                    "task_orchestrate",
                    task="long",
                    code=GATED_PROGRAM,
                    swarm_id=swarm_id,
                )
                folder = await agent_folder(helper, agents[0]["agent_id"])
                await wait_for_file(folder / "started")
                seen_running = datetime.now(UTC)
                # Past the first heartbeat, which carries the step's start.
                await asyncio.sleep(HEARTBEAT_SECONDS + 0.5)
            # The worker is gone while the program runs on in the sandbox
            # session; a new one takes the step over.
            status = await helper.call("task_status", task_id=task["task_id"])
            assert status["status"] == "running"
            async with sandbox_worker(client, swarm_settings):
                (folder / "gate").write_text("open")
                results = await helper.call(
                    "task_results", task_id=task["task_id"], wait_seconds=120
                )
    finally:
        await helper.cleanup()
    assert results["status"] == "completed", results["error"]
    [step] = results["results"]
    assert step["stdout"] == "gate opened\n"
    assert step["attempt"] >= 2
    # The step started with its first attempt, before that worker died.
    started = datetime.fromisoformat(step["started_at"])
    assert started <= seen_running
    assert step["duration_ms"] >= (HEARTBEAT_SECONDS + 0.5) * 1000
    # The retried step sent the same sandbox call, so it got the output of
    # the program that was still running instead of starting another one.
    assert (folder / "attempts").read_text() == "x"


async def wait_for_runs(folder: Path, runs: int, timeout: float = 90.0) -> None:
    """Wait until GATED_PROGRAM has started `runs` times in `folder`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    path = folder / "attempts"
    while not path.exists() or path.read_text() != "x" * runs:
        assert loop.time() < deadline, f"the program did not start {runs} times"
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def orchestration_process(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """An orchestration worker in a process of its own, killed at the end.
    It runs the sandbox sessions' calls as local activities."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(
        NEXUS_DATA_DIR=str(settings.data_dir),
        NEXUS_DATABASE_URL=settings.effective_database_url,
        NEXUS_TEMPORAL_ADDRESS=settings.effective_temporal_address,
        NEXUS_ENCRYPTION_KEY=TEST_ENCRYPTION_KEY,
        NEXUS_SANDBOX_PACKAGE_INDEX=str(settings.sandbox_package_index),
        NEXUS_WORKER_WARM_UP="false",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "--queue", ORCHESTRATION],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


async def test_program_runs_counted_after_session_worker_dies(
    client: Client, swarm_settings: Settings
) -> None:
    helper = Swarms(client, swarm_settings)
    try:
        async with running_workers(client, swarm_settings, [SANDBOX]):
            with orchestration_process(swarm_settings):
                await wait_for_pollers(
                    client, swarm_settings.namespace, [ORCHESTRATION]
                )
                swarm_id, agents = await helper.swarm("mesh", ["coder"])
                task = await helper.call(
                    "task_orchestrate",
                    task="long",
                    code=GATED_PROGRAM,
                    swarm_id=swarm_id,
                )
                folder = await agent_folder(helper, agents[0]["agent_id"])
                await wait_for_file(folder / "started")
            # The program's call died with that worker; the session makes it
            # again on the next one, which starts the program again.
            with orchestration_process(swarm_settings):
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 90
                while (folder / "attempts").read_text() != "xx":
                    assert loop.time() < deadline, "the program did not start again"
                    await asyncio.sleep(0.1)
                (folder / "gate").write_text("open")
                results = await helper.call(
                    "task_results", task_id=task["task_id"], wait_seconds=120
                )
    finally:
        await helper.cleanup()
    assert results["status"] == "completed", results["error"]
    [step] = results["results"]
    assert step["stdout"] == "gate opened\n"
    # The step's own activity never failed, but its program ran twice.
    assert step["attempt"] == 1
    assert step["program_runs"] == 2


async def test_task_runs_again_after_graceful_stop(
    client: Client, swarm_settings: Settings
) -> None:
    helper = Swarms(client, swarm_settings)
    grace = timedelta(seconds=1)
    try:
        with orchestration_process(swarm_settings):
            async with running_workers(
                client, swarm_settings, [SANDBOX], graceful_shutdown_timeout=grace
            ):
                await wait_for_pollers(
                    client, swarm_settings.namespace, [ORCHESTRATION]
                )
                _, _, task, folder = await start_gated_task(helper)
            # The sandbox worker stopped as under `nexus up`: it cancelled the
            # step after its grace period. The orchestration worker, which
            # runs the program's call, dies next and kills the program.
        # That cancel was no cancel of the task, so on the new workers the
        # step's next attempt gets the program run again from the start.
        with orchestration_process(swarm_settings):
            async with running_workers(client, swarm_settings, [SANDBOX]):
                await wait_for_runs(folder, 2)
                (folder / "gate").write_text("open")
                results = await helper.call(
                    "task_results", task_id=task["task_id"], wait_seconds=120
                )
    finally:
        await helper.cleanup()
    assert results["status"] == "completed", results["error"]
    [step] = results["results"]
    assert step["stdout"] == "gate opened\n"
    assert step["attempt"] >= 2
    assert (folder / "attempts").read_text() == "xx"


async def _wait_for_retry(client: Client, execution_id: str, step: str) -> None:
    """Wait until the server has scheduled a second attempt of a step's
    activity, after the first one failed."""
    handle = client.get_workflow_handle(execution_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        description = await handle.describe()
        attempts = [
            pending.attempt
            for pending in description.raw_description.pending_activities
            if pending.activity_id == step
        ]
        if attempts and attempts[0] >= 2:
            return
        assert loop.time() < deadline, f"step {step} was not retried"
        await asyncio.sleep(0.2)


async def test_agent_step_runs_again_after_graceful_stop(
    client: Client, swarm_settings: Settings
) -> None:
    helper = Swarms(client, swarm_settings)
    grace = timedelta(seconds=1)
    try:
        with orchestration_process(swarm_settings) as orchestration:
            async with running_workers(
                client, swarm_settings, [SANDBOX], graceful_shutdown_timeout=grace
            ):
                await wait_for_pollers(
                    client, swarm_settings.namespace, [ORCHESTRATION]
                )
                swarm_id, agents = await helper.swarm("mesh", ["coder"])
                agent_id = agents[0]["agent_id"]
                await mirrored(helper.ctx, swarm_id, 1)
                created = await helper.call(
                    "workflow_create",
                    name="agent-step-restart",
                    steps=[
                        {
                            "name": "code",
                            "type": "sandbox_execution",
                            "agent": agent_id,
                            "params": {"code": GATED_PROGRAM},
                        }
                    ],
                )
                started = await helper.call(
                    "workflow_execute",
                    workflow_id=created["workflow_id"],
                    **{"async": True},
                )
                execution_id = started["execution_id"]
                helper.workflow_ids.append(execution_id)
                folder = await agent_folder(helper, agent_id)
                await wait_for_file(folder / "started")
            # As under `nexus up`: SIGTERM, and SIGKILL once the worker has
            # cancelled the step's activity after its own grace period, while
            # it still waits for the session's call that runs the program.
            orchestration.send_signal(signal.SIGTERM)
            await _wait_for_retry(client, execution_id, "code")
        # Neither shutdown cancelled the step's task, so the next attempt
        # waits for the same task, whose program runs again from the start.
        with orchestration_process(swarm_settings):
            async with running_workers(client, swarm_settings, [SANDBOX]):
                await wait_for_runs(folder, 2)
                (folder / "gate").write_text("open")
                await client.get_workflow_handle(execution_id).result()
                status = await helper.call("workflow_status", execution_id=execution_id)
    finally:
        await helper.cleanup()
    [step] = status["execution"]["steps"]
    assert step["status"] == "completed", step["error"]
    assert step["attempts"] >= 2
    assert step["output"]["stdout"] == "gate opened\n"
    assert step["output"]["task_id"] == step_task_id(swarm_id, execution_id, "code")
    assert (folder / "attempts").read_text() == "xx"


async def step_sandbox(
    settings: Settings, execution_id: str, step: str, known: set[str]
) -> str:
    """Wait for a sandbox that the step created and that is not in `known`,
    as its audit log names it, and return its id."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        calls = await asyncio.to_thread(
            list_calls,
            settings.effective_database_url,
            user_id=step_user(execution_id, step),
            tool="sandbox_create",
        )
        created = {call.ids["sandbox_id"] for call in calls if "sandbox_id" in call.ids}
        if created - known:
            (sandbox_id,) = created - known
            return sandbox_id
        assert loop.time() < deadline, f"step {step} created no new sandbox"
        await asyncio.sleep(0.2)


async def sandbox_folder(client: Client, settings: Settings, sandbox_id: str) -> Path:
    """Host folder of a local sandbox, which programs see as their working
    folder."""
    info = await sandbox_service.info(client, sandbox_id)
    assert info.backend_id is not None
    return get_backend(settings).folder(info.backend_id)  # type: ignore[attr-defined,no-any-return]


async def test_sandbox_step_retry_deletes_earlier_sandbox(
    client: Client, swarm_settings: Settings
) -> None:
    helper = Swarms(client, swarm_settings)
    try:
        async with running_workers(client, swarm_settings, [SANDBOX]):
            with orchestration_process(swarm_settings) as orchestration:
                await wait_for_pollers(
                    client, swarm_settings.namespace, [ORCHESTRATION]
                )
                created = await helper.call(
                    "workflow_create",
                    name="sandbox-step-kill",
                    steps=[
                        {
                            "name": "a",
                            "type": "sandbox_execution",
                            "params": {"code": GATED_PROGRAM},
                            "retry_attempts": 2,
                            "timeout": 300,
                        }
                    ],
                )
                started = await helper.call(
                    "workflow_execute",
                    workflow_id=created["workflow_id"],
                    **{"async": True},
                )
                execution_id = started["execution_id"]
                helper.workflow_ids.append(execution_id)
                first = await step_sandbox(swarm_settings, execution_id, "a", set())
                first_folder = await sandbox_folder(client, swarm_settings, first)
                await wait_for_file(first_folder / "started")
                orchestration.kill()
                orchestration.wait(timeout=30)
                # The step's heartbeat timeout, not its 300 s timeout, ends
                # the dead worker's attempt.
                await _wait_for_retry(client, execution_id, "a")
            with orchestration_process(swarm_settings):
                second = await step_sandbox(swarm_settings, execution_id, "a", {first})
                second_folder = await sandbox_folder(client, swarm_settings, second)
                await wait_for_file(second_folder / "started")
                listed = await helper.call("sandbox_list", status="all")
                assert first not in {s["sandbox_id"] for s in listed["sandboxes"]}
                (second_folder / "gate").write_text("open")
                await client.get_workflow_handle(execution_id).result()
                status = await helper.call("workflow_status", execution_id=execution_id)
    finally:
        await helper.cleanup()
    [step] = status["execution"]["steps"]
    assert step["status"] == "completed", step["error"]
    assert step["attempts"] >= 2
    assert step["output"]["sandbox_id"] == second
    assert step["output"]["stdout"] == "gate opened\n"
    listed = await helper.call("sandbox_list", status="all")
    ids = {s["sandbox_id"] for s in listed["sandboxes"]}
    assert first not in ids
    assert second not in ids


async def test_swarm_survives_worker_restart(
    client: Client, swarm_settings: Settings
) -> None:
    helper = Swarms(client, swarm_settings)
    try:
        async with running_workers(client, swarm_settings, SWARM_QUEUES):
            swarm_id, agents = await helper.swarm("star", ["coordinator", "coder"])
            before = await helper.call("swarm_status", swarm_id=swarm_id)
        # No worker runs now; a new set of workers picks the swarm up.
        async with running_workers(client, swarm_settings, SWARM_QUEUES):
            after = await helper.call("swarm_status", swarm_id=swarm_id)
            assert [a["agent_id"] for a in after["agents"]] == [
                a["agent_id"] for a in agents
            ]
            assert after["status"] == "active"
            assert after["created_at"] == before["created_at"]
            result = await helper.run_task(
                task="- a\n- b", code="print('after restart')", swarm_id=swarm_id
            )
            assert result["status"] == "completed", result["error"]
            # The hub distributes, so its one worker runs both parts in
            # sequence, and the task's output is the last part's.
            assert result["output"] == "after restart\n"
            listed = await helper.call("swarm_list")
            [row] = [s for s in listed["swarms"] if s["swarm_id"] == swarm_id]
            assert row["agent_count"] == 2
            # The mirror row read back from SQLite keeps the UTC zone.
            assert row["created_at"].endswith("Z")
            assert after["created_at"].endswith("Z")
    finally:
        await helper.cleanup()


async def restart_with_history_limit(swarms: Swarms, swarm_id: str) -> None:
    """Restart a swarm with a history limit of 40 events: terminate it and
    start it again from its current state, as the server's suggestion would,
    so that a few updates make it continue as new."""
    handle = swarms.client.get_workflow_handle(f"swarm-{swarm_id}")
    state = await handle.query("status", result_type=SwarmState)
    await handle.terminate("restart with a history limit")
    await swarms.client.start_workflow(
        "SwarmWorkflow",
        SwarmWorkflowInput(state=state, continue_as_new_after_events=40),
        id=f"swarm-{swarm_id}",
        task_queue=ORCHESTRATION,
    )


async def test_swarm_continues_as_new_with_state(swarms: Swarms) -> None:
    """A swarm whose history passes its limit continues as new; agents, tasks
    and running work carry over."""
    swarm_id, agents = await swarms.swarm("mesh", ["coder", "coder"])
    await restart_with_history_limit(swarms, swarm_id)
    results = [
        await swarms.run_task(task=f"t{i}", code=f"print({i})", swarm_id=swarm_id)
        for i in range(6)
    ]
    assert [r["output"] for r in results] == [f"{i}\n" for i in range(6)]
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert status["workflow_runs"] >= 2
    assert [a["agent_id"] for a in status["agents"]] == [a["agent_id"] for a in agents]
    assert status["task_counts"] == {"completed": 6}
    assert sum(a["tasks_completed"] for a in status["agents"]) == 6


async def test_terminated_task_after_continue_as_new(swarms: Swarms) -> None:
    # The run that started the task continues as new before the terminate,
    # so only the new run can free the agent.
    swarm = await swarms.call("swarm_init", topology="mesh", maxAgents=20)
    swarm_id = swarm["swarm_id"]
    await restart_with_history_limit(swarms, swarm_id)
    coder = await swarms.call("agent_spawn", type="coder", swarm_id=swarm_id)
    task = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    folder = await agent_folder(swarms, coder["agent_id"])
    await wait_for_file(folder / "started")
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    started_in_run = status["workflow_runs"]
    # Each spawn is an update that adds events, until the history passes its
    # limit and the swarm continues as new.
    for _ in range(18):
        await swarms.call("agent_spawn", type="tester", swarm_id=swarm_id)
        status = await swarms.call("swarm_status", swarm_id=swarm_id)
        if status["workflow_runs"] > started_in_run:
            break
    assert status["workflow_runs"] > started_in_run
    [record] = status["tasks"]
    assert record["status"] == "running"

    task_handle = swarms.client.get_workflow_handle(task_workflow_id(task["task_id"]))
    await task_handle.terminate(reason="operator")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        status = await swarms.call("swarm_status", swarm_id=swarm_id)
        agents = {a["agent_id"]: a for a in status["agents"]}
        if agents[coder["agent_id"]]["status"] == "idle" or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    agent = agents[coder["agent_id"]]
    assert agent["status"] == "idle"
    assert agent["current_task_id"] is None
    assert agent["tasks_failed"] == 1
    [record] = status["tasks"]
    assert record["status"] == "failed"
    assert record["error"] == "the task's workflow was terminated"
    result = await swarms.call("task_results", task_id=task["task_id"])
    assert result["status"] == "failed"
    assert result["error"] == "the task's workflow was terminated: operator"
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())
