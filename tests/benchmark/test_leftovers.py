"""What a benchmark run cut short in its orchestration phase leaves open is
ended when the next run cancels that run."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import ActivityEnvironment

from activities.benchmark import BenchmarkActivities
from activities.integration import step_user
from app.benchmark.leftovers import (
    definition_executions_query,
    end_phase_leftovers,
    phase_executions_query,
    swarms_started_by,
)
from app.benchmark.models import BenchmarkRun
from app.benchmark.phases import PhaseRunner, multi_workflow_orchestration
from app.contracts.benchmark import (
    BenchmarkConfig,
    CancelRunRequest,
    PhaseInput,
    PhaseRecord,
    PhaseResult,
)
from app.db import session_scope
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from app.workflows.engine import search_attributes

load_tools()


async def start_leftover(client: Client, run_id: str) -> WorkflowHandle:
    """Start an open orchestration execution of run `run_id` that no worker
    serves, and wait until the server lists it."""
    execution_id = f"left-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        "FlowNexusWorkflow",
        id=execution_id,
        task_queue="no-worker-polls-this",
        search_attributes=search_attributes(
            "definition-left", f"benchmark-orchestration-{run_id}-1"
        ),
    )
    query = phase_executions_query(run_id)
    deadline = time.monotonic() + 60
    while not [e async for e in client.list_workflows(query)]:
        assert time.monotonic() < deadline, "the execution was never listed"
        await asyncio.sleep(0.2)
    return handle


async def test_leftover_execution_and_its_swarms_end(
    client: Client, workers: Settings
) -> None:
    run_id = f"benchmark-left-{uuid.uuid4().hex[:6]}"
    # An execution of the phase whose worker died: open, and served by no
    # worker, so only the clean-up can destroy what its step created.
    handle = await start_leftover(client, run_id)
    execution_id = handle.id
    step = ToolContext(
        workers,
        user_id=step_user(execution_id, "coordinate_swarms"),
        temporal_client=client,
    )
    left = await invoke_tool(step, "swarm_init", {"topology": "mesh", "maxAgents": 1})
    # Steps ran as the execution's user before they had users of their own.
    older = ToolContext(
        workers, user_id=f"workflow:{execution_id}", temporal_client=client
    )
    older_swarm = await invoke_tool(
        older, "swarm_init", {"topology": "mesh", "maxAgents": 1}
    )
    # An execution whose id starts with this one's is another execution.
    other = ToolContext(
        workers,
        user_id=step_user(f"{execution_id}0", "coordinate_swarms"),
        temporal_client=client,
    )
    other_swarm = await invoke_tool(
        other, "swarm_init", {"topology": "mesh", "maxAgents": 1}
    )

    url = workers.effective_database_url
    created = [older_swarm["swarm_id"], left["swarm_id"]]
    assert swarms_started_by(url, execution_id) == created
    executions, destroyed = await end_phase_leftovers(client, workers, run_id)
    assert executions == [execution_id]
    assert destroyed == created

    history = await handle.fetch_history()
    assert any(
        event.HasField("workflow_execution_cancel_requested_event_attributes")
        for event in history.events
    )
    listed = await invoke_tool(other, "swarm_list", {"status": "all"})
    status = {s["swarm_id"]: s["status"] for s in listed["swarms"]}
    assert status[left["swarm_id"]] == "destroyed"
    assert status[older_swarm["swarm_id"]] == "destroyed"
    assert status[other_swarm["swarm_id"]] == "active"
    await invoke_tool(other, "swarm_destroy", {"swarm_id": other_swarm["swarm_id"]})
    await handle.terminate("test cleanup")


async def test_cancel_activity_ends_leftovers(
    client: Client, workers: Settings
) -> None:
    # An execution that the cancelled phase did not list yet, with a swarm.
    run_id = f"benchmark-late-{uuid.uuid4().hex[:6]}"
    handle = await start_leftover(client, run_id)
    step = ToolContext(
        workers, user_id=step_user(handle.id, "swarms"), temporal_client=client
    )
    left = await invoke_tool(step, "swarm_init", {"topology": "mesh", "maxAgents": 1})
    request = CancelRunRequest(
        run_id=run_id,
        config=BenchmarkConfig(duration_seconds=60),
        ended_at=datetime.now(UTC),
    )
    await ActivityEnvironment(client=client).run(
        BenchmarkActivities(workers).cancel_run, request
    )
    history = await handle.fetch_history()
    assert any(
        event.HasField("workflow_execution_cancel_requested_event_attributes")
        for event in history.events
    )
    listed = await invoke_tool(step, "swarm_list", {"status": "all"})
    status = {s["swarm_id"]: s["status"] for s in listed["swarms"]}
    assert status[left["swarm_id"]] == "destroyed"
    with session_scope(workers.effective_database_url) as session:
        run = session.get(BenchmarkRun, run_id)
        assert run is not None
        assert run.status == "cancelled"
    await handle.terminate("test cleanup")


async def test_failed_phase_record_ends_leftovers(
    client: Client, workers: Settings
) -> None:
    """Recording an orchestration phase that failed (its activity died with
    its worker) cancels the executions it left open; other phases' records
    leave them alone."""
    run_id = f"benchmark-failed-{uuid.uuid4().hex[:6]}"
    handle = await start_leftover(client, run_id)
    now = datetime.now(UTC)
    activities = BenchmarkActivities(workers)

    def record(phase: str, ok: bool) -> PhaseRecord:
        result = PhaseResult(
            phase=phase, cycle=1, ok=ok, started_at=now, ended_at=now, error="x"
        )
        return PhaseRecord(run_id=run_id, result=result)

    environment = ActivityEnvironment(client=client)
    await environment.run(activities.record_phase, record("neural_training", False))
    await environment.run(
        activities.record_phase, record("multi_workflow_orchestration", True)
    )
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    history = await handle.fetch_history()
    assert not any(
        event.HasField("workflow_execution_cancel_requested_event_attributes")
        for event in history.events
    )
    await environment.run(
        activities.record_phase, record("multi_workflow_orchestration", False)
    )
    history = await handle.fetch_history()
    assert any(
        event.HasField("workflow_execution_cancel_requested_event_attributes")
        for event in history.events
    )
    await handle.terminate("test cleanup")


async def test_cancelled_phase_cancels_its_executions(
    client: Client, workers: Settings
) -> None:
    run_id = f"benchmark-phase-{uuid.uuid4().hex[:6]}"
    request = PhaseInput(
        run_id=run_id,
        phase="multi_workflow_orchestration",
        cycle=1,
        config=BenchmarkConfig(duration_seconds=60, concurrent_executions=2),
    )
    phase = asyncio.create_task(
        multi_workflow_orchestration(PhaseRunner(workers, client, request))
    )
    query = definition_executions_query(f"benchmark-orchestration-{run_id}-1")
    deadline = time.monotonic() + 120
    while len([e async for e in client.list_workflows(query)]) < 2:
        assert not phase.done(), "the phase ended before its executions were listed"
        assert time.monotonic() < deadline, "the executions were never listed"
        await asyncio.sleep(0.2)
    phase.cancel()
    with pytest.raises(asyncio.CancelledError):
        await phase
    listed = [
        e.id
        async for e in client.list_workflows(
            query.replace('ExecutionStatus = "Running" AND ', "")
        )
    ]
    assert len(listed) == 2
    for execution_id in listed:
        handle = client.get_workflow_handle(execution_id)
        while (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            assert time.monotonic() < deadline, f"{execution_id} still runs"
            await asyncio.sleep(0.5)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
