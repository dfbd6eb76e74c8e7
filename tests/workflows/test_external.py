"""Runs started from outside the tools: the temporal CLI, a plain SDK
client and a schedule; visibility by search attribute; a saved history."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import pytest
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleRange,
    WorkflowFailureError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from app.contracts.workflows import ExecutionState
from app.settings import Settings
from app.temporal.devserver import temporal_binary
from app.tools import ToolContext, ToolError
from app.workflows import engine, locks, store
from tests.support.replay import replay_run, replay_saved
from tests.workflows.conftest import call
from workers.registry import all_workflows


def _temporal(address: str, *args: str) -> str:
    done = subprocess.run(
        [str(temporal_binary()), *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_cli_start_registers_and_is_listed(
    client: Client, flow_workers: Settings, temporal_address: str
) -> None:
    name = f"external-{uuid.uuid4().hex[:6]}"
    execution_id = f"cli-{uuid.uuid4().hex[:8]}"
    flow_input = {
        "definition": {
            "name": name,
            "steps": [
                {"name": "a", "type": "echo", "params": {"v": "{{input.v}}"}},
                {
                    "name": "b",
                    "type": "echo",
                    "depends_on": ["a"],
                    "params": {"w": "{{steps.a.output.v}}"},
                },
            ],
        },
        "input_data": {"v": 5},
    }
    _temporal(
        temporal_address,
        "workflow",
        "start",
        "--type",
        "FlowNexusWorkflow",
        "--task-queue",
        "nexus-orchestration",
        "--workflow-id",
        execution_id,
        "--input",
        json.dumps(flow_input),
    )
    handle = client.get_workflow_handle(execution_id, result_type=ExecutionState)
    final = await handle.result()
    assert final.status == "completed"
    assert final.steps[1].output == {"w": 5}
    row, version, definition = store.get_definition(
        flow_workers.effective_database_url, str(final.workflow_id)
    )
    assert row.name == name
    assert version == 1
    assert definition.steps[1].depends_on == ["a"]
    stored = store.get_execution(flow_workers.effective_database_url, execution_id)
    assert stored.status == "completed"
    listed = ""
    for _ in range(50):  # visibility is eventually consistent
        listed = _temporal(
            temporal_address,
            "workflow",
            "list",
            "--query",
            f"NexusDefinitionId = '{final.workflow_id}'",
            "--output",
            "json",
        )
        if execution_id in listed:
            break
        await asyncio.sleep(0.2)
    assert execution_id in listed
    description = await handle.describe()
    assert await description.memo_value("definition_name") == name
    await replay_run(client, execution_id, all_workflows())


async def test_sdk_start_with_plain_dict(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    created = await call(
        tools,
        "workflow_create",
        name="sdk-started",
        steps=[{"name": "only", "type": "echo", "params": {"x": 1}}],
    )
    execution_id = f"sdk-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        "FlowNexusWorkflow",
        {
            "definition": {
                "name": "sdk-started",
                "steps": [{"name": "only", "type": "echo", "params": {"x": 1}}],
            },
            "workflow_id": created["workflow_id"],
            "version": created["version"],
        },
        id=execution_id,
        task_queue="nexus-orchestration",
        result_type=ExecutionState,
    )
    final = await handle.result()
    assert final.workflow_id == created["workflow_id"]
    assert final.steps[0].output == {"x": 1}


async def test_schedule_trigger_lifecycle(
    client: Client, flow_workers: Settings, tools: ToolContext, temporal_address: str
) -> None:
    name = f"scheduled-{uuid.uuid4().hex[:6]}"
    steps = [{"name": "tick", "type": "echo", "params": {"at": "{{input.label}}"}}]
    created = await call(
        tools,
        "workflow_create",
        name=name,
        steps=steps,
        triggers=[
            {
                "type": "schedule",
                "cron": "0 3 * * *",
                "input_data": {"label": "nightly"},
            }
        ],
    )
    schedule_id = created["schedules"][0]
    handle = client.get_schedule_handle(schedule_id)
    description = await handle.describe()
    # The server stores a cron expression as a calendar spec.
    calendar = description.schedule.spec.calendars[0]
    assert list(calendar.hour) == [ScheduleRange(3, 3, 1)]
    assert list(calendar.minute) == [ScheduleRange(0, 0, 1)]
    action = description.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert action.workflow == "FlowNexusWorkflow"
    listed = _temporal(temporal_address, "schedule", "list", "--output", "json")
    for _ in range(50):
        if schedule_id in listed:
            break
        await asyncio.sleep(0.2)
        listed = _temporal(temporal_address, "schedule", "list", "--output", "json")
    assert schedule_id in listed
    await handle.trigger()
    execution_id = None
    for _ in range(100):
        rows = store.list_executions(
            flow_workers.effective_database_url,
            workflow_id=created["workflow_id"],
            limit=5,
        )
        if rows and rows[0].status == "completed":
            execution_id = rows[0].id
            break
        await asyncio.sleep(0.1)
    assert execution_id is not None
    stored = store.get_execution(flow_workers.effective_database_url, execution_id)
    assert stored.steps[0].output == {"at": "nightly"}
    updated = await call(
        tools,
        "workflow_create",
        name=name,
        steps=steps,
        triggers=[{"type": "schedule", "cron": "*/30 * * * *"}],
    )
    assert updated["schedules"] == [schedule_id]
    description = await handle.describe()
    calendar = description.schedule.spec.calendars[0]
    assert list(calendar.minute) == [ScheduleRange(0, 59, 30)]
    removed = await call(tools, "workflow_create", name=name, steps=steps)
    assert removed["schedules"] == []
    schedule_ids = [s.id async for s in await client.list_schedules()]
    for _ in range(50):
        if schedule_id not in schedule_ids:
            break
        await asyncio.sleep(0.2)
        schedule_ids = [s.id async for s in await client.list_schedules()]
    assert schedule_id not in schedule_ids


async def test_saved_history_replays(client: Client) -> None:
    await replay_saved(client, "flow_nexus", all_workflows())


async def test_delete_removes_schedules_and_stops_execution(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    name = f"deleted-{uuid.uuid4().hex[:6]}"
    steps = [{"name": "tick", "type": "echo", "params": {"v": 1}}]
    created = await call(
        tools,
        "workflow_create",
        name=name,
        steps=steps,
        triggers=[{"type": "schedule", "cron": "0 4 * * *"}],
    )
    schedule_id = created["schedules"][0]
    deleted = await call(tools, "workflow_delete", workflow_id=created["workflow_id"])
    assert deleted["status"] == "deleted"
    assert deleted["schedules_deleted"] == [schedule_id]
    schedule_ids = [s.id async for s in await client.list_schedules()]
    for _ in range(50):
        if schedule_id not in schedule_ids:
            break
        await asyncio.sleep(0.2)
        schedule_ids = [s.id async for s in await client.list_schedules()]
    assert schedule_id not in schedule_ids
    repeated = await call(tools, "workflow_delete", workflow_id=created["workflow_id"])
    assert repeated["status"] == "deleted"
    assert repeated["schedules_deleted"] == []
    with pytest.raises(ToolError, match="is deleted; create it again"):
        await call(tools, "workflow_execute", workflow_id=created["workflow_id"])
    with pytest.raises(ToolError, match="'wf_nope' not found"):
        await call(tools, "workflow_delete", workflow_id="wf_nope")
    again = await call(tools, "workflow_create", name=name, steps=steps)
    assert again["workflow_id"] == created["workflow_id"]
    assert again["status"] == "active"
    assert again["version"] == 2


async def test_scheduled_run_of_deleted_definition_rejected(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    url = flow_workers.effective_database_url
    created = await call(
        tools,
        "workflow_create",
        name=f"orphan-{uuid.uuid4().hex[:6]}",
        steps=[{"name": "tick", "type": "echo"}],
        triggers=[{"type": "schedule", "cron": "0 5 * * *"}],
    )
    workflow_id = created["workflow_id"]
    # Mark the definition deleted but keep its schedule, so the schedule
    # outlives the delete.
    store.delete_definition(url, workflow_id)

    handle = client.get_schedule_handle(created["schedules"][0])
    await handle.trigger()
    execution_id = None
    for _ in range(100):
        actions = (await handle.describe()).info.recent_actions
        if actions:
            action = actions[-1].action
            assert isinstance(action, ScheduleActionExecutionStartWorkflow)
            execution_id = action.workflow_id
            break
        await asyncio.sleep(0.1)
    assert execution_id is not None

    run = client.get_workflow_handle(execution_id, result_type=ExecutionState)
    with pytest.raises(WorkflowFailureError) as caught:
        await run.result()
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "DefinitionDeleted"
    assert cause.message == (
        f"workflow {workflow_id!r} ({created['name']!r}) was deleted, so this run "
        "of its version 1 is rejected; create the definition again with "
        "workflow_create to run it"
    )
    assert store.list_executions(url, workflow_id=workflow_id, limit=5) == []
    # Deleting the definition again removes the schedule that outlived it.
    repeated = await call(tools, "workflow_delete", workflow_id=workflow_id)
    assert repeated["schedules_deleted"] == created["schedules"]
    await replay_run(client, execution_id, all_workflows())


async def test_delete_finds_schedules_of_discarded_versions(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    """A schedule whose version is no longer stored (a roll-back that could
    not delete it) is found by its id and deleted with the definition."""
    created = await call(
        tools,
        "workflow_create",
        name=f"leftover-{uuid.uuid4().hex[:6]}",
        steps=[{"name": "tick", "type": "echo"}],
        triggers=[{"type": "schedule", "cron": "0 5 * * *"}],
    )
    workflow_id = created["workflow_id"]
    leftover = engine.schedule_id(workflow_id, 3)
    first = await client.get_schedule_handle(created["schedules"][0]).describe()
    await client.create_schedule(leftover, first.schedule)
    for _ in range(100):
        if 3 in await engine.listed_schedule_indexes(client, workflow_id):
            break
        await asyncio.sleep(0.1)
    deleted = await call(tools, "workflow_delete", workflow_id=workflow_id)
    assert deleted["schedules_deleted"] == [*created["schedules"], leftover]
    for sid in deleted["schedules_deleted"]:
        with pytest.raises(RPCError):
            await client.get_schedule_handle(sid).describe()


async def test_snapshot_run_waits_for_definition_lock(
    client: Client, flow_workers: Settings
) -> None:
    """A run started with a snapshot stores it as a version of its name only
    while no create, delete or assign of that name holds the lock."""
    name = f"locked-{uuid.uuid4().hex[:6]}"
    url = flow_workers.effective_database_url
    async with locks.definition_lock(url, name):
        handle = await client.start_workflow(
            "FlowNexusWorkflow",
            {"definition": {"name": name, "steps": [{"name": "a", "type": "echo"}]}},
            id=f"snapshot-{uuid.uuid4().hex[:8]}",
            task_queue="nexus-orchestration",
            result_type=ExecutionState,
        )
        await asyncio.sleep(1.5)
        listed = store.list_definitions(url, limit=500, offset=0, status=None)
        assert name not in [item["name"] for item in listed]
    final = await asyncio.wait_for(handle.result(), 60)
    assert final.status == "completed"
    row, version, _ = store.get_definition(url, str(final.workflow_id))
    assert (row.name, version) == (name, 1)


async def test_run_claiming_other_definition_rejected(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    """A run started from outside that names a definition id and version
    must carry that version's own body."""
    url = flow_workers.effective_database_url
    created = await call(
        tools,
        "workflow_create",
        name=f"claimed-{uuid.uuid4().hex[:6]}",
        steps=[{"name": "a", "type": "echo"}],
    )
    forged = {"name": "other", "steps": [{"name": "zzz", "type": "echo"}]}
    for claim, expected in (
        (
            {"workflow_id": created["workflow_id"], "version": 1},
            "the definition of this run is not version 1 of workflow",
        ),
        (
            {"workflow_id": created["workflow_id"], "version": 7},
            "has no version 7 (its latest is 1)",
        ),
        ({"workflow_id": "wf_000000000000", "version": 1}, "not found"),
    ):
        handle = await client.start_workflow(
            "FlowNexusWorkflow",
            {"definition": forged, **claim},
            id=f"forged-{uuid.uuid4().hex[:8]}",
            task_queue="nexus-orchestration",
            result_type=ExecutionState,
        )
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        cause = caught.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type == "InvalidDefinition"
        assert expected in cause.message, cause.message
    assert store.list_executions(url, workflow_id=created["workflow_id"], limit=5) == []


async def test_oversized_schedule_named_as_too_large(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    name = f"too-large-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_create",
            name=name,
            steps=[{"name": "a", "type": "echo"}],
            triggers=[
                {"type": "schedule", "cron": "0 5 * * *"},
                {
                    "type": "schedule",
                    "cron": "0 6 * * *",
                    "input_data": {"blob": "x" * 5_000_000},
                },
            ],
        )
    message = caught.value.message
    assert caught.value.kind == "invalid_argument", message
    # The size check of the definition, which includes each trigger's
    # input_data, rejects it before a schedule is made.
    assert "over the limit of 1048576 bytes" in message
    assert "Try again once the server is reachable" not in message
    listed = store.list_definitions(
        flow_workers.effective_database_url, limit=500, offset=0, status=None
    )
    assert name not in [item["name"] for item in listed]
