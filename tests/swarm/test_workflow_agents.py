"""Workflow steps' agents: resolution from the swarm mirror and steps that run
as tasks of the resolved agent, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

from activities.heartbeat import heartbeat_every
from app.contracts.swarm import TaskWork
from app.db import session_scope
from app.settings import Settings
from app.swarm.agent_tasks import (
    AgentTaskError,
    cancel_task,
    run_on_agent,
    step_task_id,
)
from app.swarm.models import AgentRow, SwarmRow
from app.swarm.resolver import resolve_swarm_agent
from app.swarm.service import exit_error
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from app.workflows.agents import resolve_agent
from tests.support.replay import replay_run
from tests.swarm.conftest import (
    GATED_PROGRAM,
    TICKING_PROGRAM,
    Swarms,
    agent_folder,
    mirrored,
    start_gated_task,
    wait_for_file,
    wait_until_still,
)
from workers.registry import all_workflows

load_tools()

AGENT_PROGRAM = "import os\nprint(os.environ['NEXUS_AGENT_ID'])\n"


def _mirror_rows(settings: Settings) -> None:
    """Two swarms: `live` (active) and `gone` (destroyed), with agents in
    every state the resolver must tell apart."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with session_scope(settings.effective_database_url) as session:
        for swarm_id, status in (("live", "active"), ("gone", "destroyed")):
            session.add(
                SwarmRow(
                    swarm_id=swarm_id,
                    workflow_id=f"swarm-{swarm_id}",
                    topology="mesh",
                    strategy="balanced",
                    max_agents=10,
                    status=status,
                    created_at=now,
                    updated_at=now,
                )
            )
        rows = [
            # (id, swarm, type, name, status, finished tasks, minutes after now)
            ("agent_busy", "live", "coder", "busy-coder", "busy", 0, 0),
            ("agent_loaded", "live", "coder", "loaded-coder", "idle", 5, 1),
            ("agent_light", "live", "coder", "light-coder", "idle", 1, 2),
            ("agent_twin", "live", "coder", "twin-coder", "idle", 1, 3),
            ("agent_removed", "live", "analyst", "old-analyst", "removed", 0, 0),
            ("agent_dead", "gone", "tester", "dead-tester", "idle", 0, 0),
        ]
        for agent_id, swarm_id, kind, name, status, done, minutes in rows:
            session.add(
                AgentRow(
                    agent_id=agent_id,
                    swarm_id=swarm_id,
                    type=kind,
                    name=name,
                    status=status,
                    tasks_completed=done,
                    joined_at=now + timedelta(minutes=minutes),
                )
            )


def test_resolver_choice_rule(settings: Settings) -> None:
    _mirror_rows(settings)
    by_type = resolve_swarm_agent(settings, None, "coder")
    # Idle before busy, then fewest finished tasks, then the oldest.
    assert by_type.agent_id == "agent_light"
    assert by_type.swarm_id == "live"
    assert resolve_swarm_agent(settings, "agent_busy", None).agent_id == "agent_busy"
    assert resolve_swarm_agent(settings, "twin-coder", None).agent_id == "agent_twin"
    both = resolve_swarm_agent(settings, "twin-coder", "coder")
    assert both.agent_id == "agent_twin"


def test_resolver_unresolved_reasons(settings: Settings) -> None:
    _mirror_rows(settings)
    removed = resolve_swarm_agent(settings, None, "analyst")
    assert removed.agent_id is None
    assert removed.reason is not None
    assert "type 'analyst'" in removed.reason
    destroyed = resolve_swarm_agent(settings, "agent_dead", None)
    assert destroyed.agent_id is None
    assert "agent_spawn" in (destroyed.reason or "")
    mismatch = resolve_swarm_agent(settings, "twin-coder", "tester")
    assert mismatch.agent_id is None
    assert resolve_agent(settings, None, None).agent_id is None


def test_exit_error_without_stderr() -> None:
    assert exit_error(3, "") == "exit code 3 (stderr was empty)"
    assert exit_error(3, "  \n") == "exit code 3 (stderr was empty)"
    assert exit_error(1, "a\nValueError: bad\n") == "exit code 1: ValueError: bad"


def test_exit_error_names_signal() -> None:
    assert exit_error(-9, "") == "exit code -9 (killed by SIGKILL) (stderr was empty)"
    assert exit_error(-15, "bye\n") == "exit code -15 (killed by SIGTERM): bye"
    assert (
        exit_error(-200, "")
        == "exit code -200 (killed by signal 200) (stderr was empty)"
    )


async def _call(ctx: ToolContext, tool: str, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, tool, arguments)


async def _swarm(ctx: ToolContext) -> tuple[str, list[dict[str, Any]]]:
    swarm = await _call(ctx, "swarm_init", topology="mesh", maxAgents=4)
    swarm_id = swarm["swarm_id"]
    agents = [
        await _call(ctx, "agent_spawn", type=kind, name=name, swarm_id=swarm_id)
        for kind, name in (("coder", "first"), ("coder", "second"), ("analyst", "an"))
    ]
    await mirrored(ctx, swarm_id, len(agents))
    return swarm_id, agents


async def _execute(
    ctx: ToolContext, name: str, steps: list[dict[str, Any]], wait: bool = True
) -> dict[str, Any]:
    created = await _call(ctx, "workflow_create", name=name, steps=steps)
    return await _call(
        ctx,
        "workflow_execute",
        workflow_id=created["workflow_id"],
        **{"async": not wait},
    )


async def _wait_for_step(
    ctx: ToolContext, execution_id: str, step: str, wanted: str
) -> None:
    for _ in range(300):
        status = await _call(ctx, "workflow_status", execution_id=execution_id)
        execution = status["execution"]
        if execution and _outputs(execution)[step]["status"] == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"step {step} of {execution_id} never became {wanted}")


def _outputs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    status = result.get("result", result)
    return {s["name"]: s for s in status["steps"]}


async def test_step_runs_on_resolved_agent(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    swarm_id, agents = await _swarm(ctx)
    first, second = agents[0]["agent_id"], agents[1]["agent_id"]
    try:
        result = await _execute(
            ctx,
            "agent-steps",
            [
                {
                    "name": "by_type",
                    "type": "sandbox_execution",
                    "agent_type": "coder",
                    "params": {"code": AGENT_PROGRAM},
                },
                {
                    "name": "by_name",
                    "type": "sandbox_execution",
                    "agent": "second",
                    "depends_on": ["by_type"],
                    "params": {"code": AGENT_PROGRAM},
                },
            ],
        )
        steps = _outputs(result)
        by_type = steps["by_type"]
        # Both coders are idle with no tasks: the older one.
        assert by_type["agent_id"] == first
        assert by_type["output"]["agent_id"] == first
        assert by_type["output"]["agent_name"] == "first"
        assert by_type["output"]["stdout"].strip() == first
        assert by_type["output"]["swarm_id"] == swarm_id
        by_name = steps["by_name"]
        assert by_name["agent_id"] == second
        assert by_name["output"]["stdout"].strip() == second
        status = await _call(ctx, "swarm_status", swarm_id=swarm_id)
        counts = {a["agent_id"]: a["tasks_completed"] for a in status["agents"]}
        assert counts[first] == 1
        assert counts[second] == 1
        task = await _call(ctx, "task_results", task_id=by_type["output"]["task_id"])
        assert task["status"] == "completed"
        assert [r["agent_id"] for r in task["results"]] == [first]
    finally:
        await _call(ctx, "swarm_destroy", swarm_id=swarm_id)


async def test_agent_step_keeps_to_key_groups(
    client: Client, workers: Settings
) -> None:
    """A step on an agent runs code as a task of the agent's swarm, so a run
    by a key without the swarm group may not run it."""
    ctx = ToolContext(workers, temporal_client=client)
    swarm_id, _ = await _swarm(ctx)
    limited = replace(ctx, groups=("workflows",))
    try:
        with pytest.raises(ToolError) as refused:
            await _execute(
                limited,
                "agent-step-limited",
                [
                    {
                        "name": "run",
                        "type": "sandbox_execution",
                        "agent_type": "coder",
                        "params": {"code": AGENT_PROGRAM},
                    }
                ],
            )
        assert "needs the tool group swarm" in refused.value.message
        status = await _call(ctx, "swarm_status", swarm_id=swarm_id)
        assert status["tasks"] == []
    finally:
        await _call(ctx, "swarm_destroy", swarm_id=swarm_id)


async def test_unresolved_agent_is_recorded(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    result = await _execute(
        ctx,
        "unresolved-agent",
        [
            {
                "name": "code",
                "type": "sandbox_execution",
                "agent_type": "optimizer",
                "params": {"code": "print('no agent')"},
            }
        ],
    )
    step = _outputs(result)["code"]
    assert step["status"] == "completed"
    assert step["agent_id"] is None
    assert step["output"]["stdout"] == "no agent\n"
    assert "agent_id" not in step["output"]
    trail = await _call(ctx, "workflow_audit_trail", workflow_id=result["workflow_id"])
    [unresolved] = [e for e in trail["events"] if e["event"] == "step.agent_unresolved"]
    assert unresolved["step"] == "code"
    assert "type 'optimizer'" in unresolved["details"]["reason"]


async def test_assign_resolves_pending_step(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    swarm_id, agents = await _swarm(ctx)
    analyst = agents[2]["agent_id"]
    try:
        started = await _execute(
            ctx,
            "reassigned",
            [
                {
                    "name": "wait",
                    "type": "sandbox_execution",
                    "params": {"code": "import time\ntime.sleep(3)"},
                },
                {
                    "name": "code",
                    "type": "sandbox_execution",
                    "agent_type": "coder",
                    "depends_on": ["wait"],
                    "params": {"code": AGENT_PROGRAM},
                },
            ],
            wait=False,
        )
        execution_id = started["execution_id"]
        await _wait_for_step(ctx, execution_id, "wait", "running")
        assigned = await _call(
            ctx,
            "workflow_agent_assign",
            task_id=f"{execution_id}/code",
            agent_type="analyst",
        )
        assert assigned["agent_id"] == analyst
        assert assigned["swarm_id"] == swarm_id
        assert assigned["unresolved_reason"] is None
        missing = await _call(
            ctx,
            "workflow_agent_assign",
            task_id=f"{started['workflow_id']}/code",
            agent_type="documenter",
        )
        assert missing["agent_id"] is None
        assert "type 'documenter'" in missing["unresolved_reason"]
        handle = client.get_workflow_handle(execution_id)
        await handle.result()
        status = await _call(ctx, "workflow_status", execution_id=execution_id)
        code = _outputs(status["execution"])["code"]
        assert code["agent_type"] == "analyst"
        assert code["agent_id"] == analyst
        assert code["output"]["stdout"].strip() == analyst
    finally:
        await _call(ctx, "swarm_destroy", swarm_id=swarm_id)


async def test_pinned_task_runs_on_its_agent(swarms: Any) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder", "coder"])
    second = agents[1]["agent_id"]
    work = TaskWork(kind="code", task="pinned", code=AGENT_PROGRAM)
    progress = await run_on_agent(
        swarms.client,
        swarm_id,
        second,
        step_task_id(swarm_id, "exec_pin", "code"),
        work,
    )
    swarms.workflow_ids.append(f"swarm-task-{progress.task_id}")
    assert progress.status == "completed", progress.error
    # The first coder was idle and older, but the pin wins.
    assert [s.agent_id for s in progress.steps] == [second]
    assert progress.steps[0].stdout.strip() == second
    with pytest.raises(AgentTaskError, match="is not an active agent"):
        await run_on_agent(
            swarms.client,
            swarm_id,
            "agent_unknown",
            step_task_id(swarm_id, "exec_pin", "other"),
            work,
        )


async def _pinned_step(
    swarms: Swarms, swarm_id: str, agent_id: str, name: str, code: str
) -> tuple[str, str]:
    """Start a run of a one-step workflow whose `sandbox_execution` step is
    pinned to `agent_id`. Return the execution id and the step's task id."""
    await mirrored(swarms.ctx, swarm_id, 1)
    started = await _execute(
        swarms.ctx,
        name,
        [
            {
                "name": "step",
                "type": "sandbox_execution",
                "agent": agent_id,
                "params": {"code": code},
            }
        ],
        wait=False,
    )
    execution_id = started["execution_id"]
    swarms.workflow_ids.append(execution_id)
    return execution_id, step_task_id(swarm_id, execution_id, "step")


async def _wait_for_task(
    swarms: Swarms, swarm_id: str, task_id: str, wanted: str
) -> dict[str, Any]:
    """Wait until the swarm lists the task with status `wanted`."""
    for _ in range(300):
        status = await swarms.call("swarm_status", swarm_id=swarm_id)
        tasks = {t["task_id"]: t for t in status["tasks"]}
        if task_id in tasks and tasks[task_id]["status"] == wanted:
            return tasks[task_id]
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} of swarm {swarm_id} never became {wanted}")


async def test_step_waits_for_busy_agent(swarms: Swarms) -> None:
    swarm_id, agent_id, busy, folder = await start_gated_task(swarms)
    execution_id, task_id = await _pinned_step(
        swarms, swarm_id, agent_id, "pinned-busy", "print('pinned')"
    )
    await _wait_for_task(swarms, swarm_id, task_id, "queued")
    # Several of the step's retry intervals pass: the step keeps waiting and
    # submits nothing again.
    await asyncio.sleep(5)
    status = await swarms.call("workflow_status", execution_id=execution_id)
    assert _outputs(status["execution"])["step"]["status"] == "running"

    (folder / "gate").write_text("open")
    await swarms.client.get_workflow_handle(execution_id).result()
    status = await swarms.call("workflow_status", execution_id=execution_id)
    step = _outputs(status["execution"])["step"]
    assert step["status"] == "completed", step["error"]
    assert step["attempts"] == 1
    assert step["output"]["task_id"] == task_id
    assert step["output"]["stdout"] == "pinned\n"
    swarm = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert [t["task_id"] for t in swarm["tasks"]] == [busy["task_id"], task_id]
    assert [t["status"] for t in swarm["tasks"]] == ["completed", "completed"]


async def test_cancel_drops_queued_step_task(swarms: Swarms) -> None:
    swarm_id, agent_id, busy, folder = await start_gated_task(swarms)
    execution_id, task_id = await _pinned_step(
        swarms, swarm_id, agent_id, "pinned-cancel", "print('never')"
    )
    await _wait_for_task(swarms, swarm_id, task_id, "queued")
    await swarms.client.get_workflow_handle(execution_id).cancel()

    reason = f"workflow step 'step' of execution {execution_id} was cancelled"
    record = await _wait_for_task(swarms, swarm_id, task_id, "cancelled")
    assert record["error"] == reason
    assert record["assigned_agents"] == []
    (folder / "gate").write_text("open")
    done = await swarms.call("task_results", task_id=busy["task_id"], wait_seconds=60)
    assert done["status"] == "completed", done["error"]
    dropped = await swarms.call("task_results", task_id=task_id, wait_seconds=60)
    assert dropped["status"] == "cancelled"
    assert dropped["error"] == reason
    assert dropped["results"] == []
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    [agent] = status["agents"]
    assert agent["status"] == "idle"
    assert agent["tasks_completed"] == 1
    assert agent["tasks_failed"] == 0
    # A second cancel, and one of a task the swarm never had, change nothing.
    await cancel_task(swarms.client, swarm_id, task_id, "again")
    await cancel_task(swarms.client, swarm_id, f"task_{swarm_id}_00000000", "none")
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert [t["error"] for t in status["tasks"]] == [None, reason]
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


async def test_cancel_stops_step_program(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    agent_id = agents[0]["agent_id"]
    execution_id, task_id = await _pinned_step(
        swarms, swarm_id, agent_id, "pinned-ticks", TICKING_PROGRAM
    )
    folder = await agent_folder(swarms, agent_id)
    await wait_for_file(folder / "ticks")
    await swarms.client.get_workflow_handle(execution_id).cancel()

    # The step learns of the cancel at a heartbeat and cancels its task,
    # whose step interrupts the program.
    await wait_until_still(folder / "ticks", timeout=60)
    result = await swarms.call("task_results", task_id=task_id, wait_seconds=60)
    assert result["status"] == "cancelled"
    assert result["error"] == (
        f"workflow step 'step' of execution {execution_id} was cancelled"
    )
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    [agent] = status["agents"]
    assert agent["status"] == "idle"
    await swarms.call("swarm_destroy", swarm_id=swarm_id)


async def test_timed_out_attempt_keeps_agent_task(
    swarms: Swarms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.swarm.agent_tasks")
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    agent_id = agents[0]["agent_id"]
    await mirrored(swarms.ctx, swarm_id, 1)
    started = await _execute(
        swarms.ctx,
        "pinned-timeout",
        [
            {
                "name": "step",
                "type": "sandbox_execution",
                "agent": agent_id,
                # Each attempt of the step's activity times out after 5 s,
                # while the program waits for its gate for longer.
                "timeout": 5,
                "retry_attempts": 10,
                "params": {"code": GATED_PROGRAM, "timeout": 300},
            }
        ],
        wait=False,
    )
    execution_id = started["execution_id"]
    swarms.workflow_ids.append(execution_id)
    task_id = step_task_id(swarm_id, execution_id, "step")
    folder = await agent_folder(swarms, agent_id)
    await wait_for_file(folder / "started")
    handle = swarms.client.get_workflow_handle(execution_id)
    # Wait for the second attempt, or for the run's end, which comes first
    # when that attempt finds the task cancelled.
    for _ in range(600):
        description = await handle.describe()
        pending = description.raw_description.pending_activities
        if description.status != WorkflowExecutionStatus.RUNNING or (
            pending and pending[0].attempt >= 2
        ):
            break
        await asyncio.sleep(0.1)
    # The worker learns of the first attempt's timeout at that attempt's next
    # heartbeat, and cancels it. Open the gate only after that cancel, which
    # the worker logs, or which cancels the task.
    for _ in range(300):
        logged = [
            r.getMessage()
            for r in caplog.records
            if r.name == "app.swarm.agent_tasks" and task_id in r.getMessage()
        ]
        swarm = await swarms.call("swarm_status", swarm_id=swarm_id)
        [record] = [t for t in swarm["tasks"] if t["task_id"] == task_id]
        if logged or record["status"] != "running":
            break
        await asyncio.sleep(0.1)
    assert record["status"] == "running", record["error"]
    assert logged, "the cancel of the first attempt was never logged"
    assert "goes on" in logged[0]
    (folder / "gate").write_text("open")

    await handle.result()
    status = await swarms.call("workflow_status", execution_id=execution_id)
    step = _outputs(status["execution"])["step"]
    assert step["status"] == "completed", step["error"]
    assert step["attempts"] >= 2
    assert step["output"]["task_id"] == task_id
    assert step["output"]["stdout"] == "gate opened\n"
    # The program ran once, to its end, in the task that every attempt
    # waited for.
    assert (folder / "attempts").read_text() == "x"
    result = await swarms.call("task_results", task_id=task_id, wait_seconds=60)
    assert result["status"] == "completed", result["error"]
    swarm = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert [t["task_id"] for t in swarm["tasks"]] == [task_id]
    await swarms.call("swarm_destroy", swarm_id=swarm_id)


@activity.defn(name="test_wait_on_agent")
async def _wait_on_agent(request: list[str]) -> str:
    """Wait for a task pinned to an agent, as a workflow step on an agent does."""
    swarm_id, agent_id, task_id = request
    heartbeat = asyncio.create_task(heartbeat_every(0.5))
    try:
        progress = await run_on_agent(
            activity.client(),
            swarm_id,
            agent_id,
            task_id,
            TaskWork(kind="code", task="wait", code="print('ran')"),
            cancel_reason="the waiting activity was cancelled",
        )
    finally:
        heartbeat.cancel()
    return progress.status


@workflow.defn(name="TestWaitOnAgent", sandboxed=False)
class _WaitOnAgentWorkflow:
    @workflow.run
    async def run(self, request: list[str]) -> str:
        result: str = await workflow.execute_activity(
            "test_wait_on_agent",
            request,
            start_to_close_timeout=timedelta(minutes=5),
            heartbeat_timeout=timedelta(seconds=5),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=200)),
            result_type=str,
        )
        return result


async def _wait_for_attempt(handle: WorkflowHandle[Any, Any], attempt: int) -> None:
    """Wait until the workflow's only activity runs attempt `attempt`."""
    for _ in range(300):
        description = await handle.describe()
        pending = description.raw_description.pending_activities
        if (
            pending
            and pending[0].attempt == attempt
            and pending[0].state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"attempt {attempt} of {handle.id}'s activity never started")


async def test_worker_shutdown_keeps_agent_task(swarms: Swarms) -> None:
    swarm_id, agent_id, _, _ = await start_gated_task(swarms)
    task_id = step_task_id(swarm_id, "exec_shutdown", "step")
    queue = f"wait-on-agent-{uuid.uuid4().hex[:8]}"

    def wait_worker() -> Worker:
        return Worker(
            swarms.client,
            task_queue=queue,
            workflows=[_WaitOnAgentWorkflow],
            activities=[_wait_on_agent],
            graceful_shutdown_timeout=timedelta(0),
        )

    async with wait_worker():
        handle = await swarms.client.start_workflow(
            _WaitOnAgentWorkflow.run,
            [swarm_id, agent_id, task_id],
            id=queue,
            task_queue=queue,
        )
        swarms.workflow_ids.append(queue)
        await _wait_for_task(swarms, swarm_id, task_id, "queued")
    # The shutdown cancelled the activity, but not the task it waited for.
    await asyncio.sleep(1)
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert [t["status"] for t in status["tasks"]] == ["running", "queued"]

    async with wait_worker():
        await _wait_for_attempt(handle, 2)
        # A cancel from the server does cancel the task.
        await handle.cancel()
        record = await _wait_for_task(swarms, swarm_id, task_id, "cancelled")
    assert record["error"] == "the waiting activity was cancelled"
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len(status["tasks"]) == 2
