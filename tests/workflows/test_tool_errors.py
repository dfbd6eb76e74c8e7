"""Bad input and faults of the workflow tools: errors name the field, the
value and the fix, and a failed create leaves nothing half-written."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio.client import Client, ScheduleRange, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.workflows import ExecutionState
from app.settings import Settings
from app.tools import ToolContext, ToolError
from app.workflows import engine
from tests.support.replay import replay_run
from tests.workflows.conftest import call
from workers.registry import all_workflows

STEPS = [{"name": "a", "type": "echo", "params": {}}]


def _cron(hour: int) -> dict[str, Any]:
    return {"type": "schedule", "cron": f"0 {hour} * * *"}


async def _listed(ctx: ToolContext, name: str) -> list[dict[str, Any]]:
    listed = await call(ctx, "workflow_list", limit=1000)
    return [w for w in listed["workflows"] if w["name"] == name]


async def _schedule_hours(client: Client, schedule_id: str) -> list[ScheduleRange]:
    description = await client.get_schedule_handle(schedule_id).describe()
    return list(description.schedule.spec.calendars[0].hour)


async def _schedule_exists(client: Client, schedule_id: str) -> bool:
    try:
        await client.get_schedule_handle(schedule_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def test_bad_cron_is_rejected_before_anything_is_stored(
    tools: ToolContext,
) -> None:
    name = f"badcron-{uuid.uuid4().hex[:6]}"
    for cron, expected in [
        ("99 99 * * *", "invalid minute '99'"),
        ("61 * * * *", "invalid minute '61'"),
        ("a b c d e", "invalid minute 'a'"),
    ]:
        with pytest.raises(ToolError) as caught:
            await call(
                tools,
                "workflow_create",
                name=name,
                steps=STEPS,
                triggers=[{"type": "schedule", "cron": cron}],
            )
        assert caught.value.kind == "invalid_argument"
        assert f"triggers.0.cron: {expected} in {cron!r}" in caught.value.message
        assert "use *, a value in 0-59" in caught.value.message
    assert await _listed(tools, name) == []


async def test_create_rejects_bad_names(tools: ToolContext) -> None:
    for name in ["   ", "bad\u0007name\n1", "tab\tname\n"]:
        with pytest.raises(ToolError) as caught:
            await call(
                tools,
                "workflow_create",
                name=name,
                steps=[{"name": "a", "type": "teleport"}],
            )
        assert caught.value.kind == "invalid_argument"
        # The name and the steps are reported together.
        assert f"name: invalid workflow name {name!r}" in caught.value.message
        assert "step 'a': unknown step type 'teleport'" in caught.value.message


async def test_never_firing_cron_stores_nothing(tools: ToolContext) -> None:
    name = f"feb31-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_create",
            name=name,
            steps=STEPS,
            triggers=[{"type": "schedule", "cron": "0 3 31 2 *"}],
        )
    assert caught.value.kind == "invalid_argument"
    assert "triggers.0.cron: '0 3 31 2 *' never fires" in caught.value.message
    assert await _listed(tools, name) == []


@pytest.fixture
def second_schedule_fails(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the server reject the second trigger's schedule, as it rejects a
    spec that the cron check let through. Return the schedule ids put."""
    real = engine._put_schedule
    put_ids: list[str] = []

    async def put(client: Client, sid: str, *args: Any) -> None:
        put_ids.append(sid)
        if sid.endswith("-schedule-1"):
            raise RPCError(
                "Invalid schedule spec: Hour is not in range [0-23]",
                RPCStatusCode.INVALID_ARGUMENT,
                b"",
            )
        await real(client, sid, *args)

    monkeypatch.setattr(engine, "_put_schedule", put)
    return put_ids


async def test_failed_schedule_rolls_back_a_new_definition(
    client: Client, tools: ToolContext, second_schedule_fails: list[str]
) -> None:
    name = f"rollnew-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_create",
            name=name,
            steps=STEPS,
            triggers=[_cron(1), _cron(2)],
        )
    assert caught.value.kind == "invalid_argument"
    assert caught.value.message.startswith(
        "triggers.1.cron: the Temporal server rejected the schedule for '0 2 * * *'"
    )
    assert "nothing was stored" in caught.value.message
    assert await _listed(tools, name) == []
    # The first trigger's schedule was made, then removed again.
    first, second = second_schedule_fails
    assert first.endswith("-schedule-0")
    assert not await _schedule_exists(client, first)
    assert not await _schedule_exists(client, second)


async def test_failed_schedule_rolls_back_an_update(
    client: Client, tools: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"rollupd-{uuid.uuid4().hex[:6]}"
    created = await call(
        tools, "workflow_create", name=name, steps=STEPS, triggers=[_cron(1), _cron(2)]
    )
    workflow_id = created["workflow_id"]
    first, second = created["schedules"]
    real = engine._put_schedule

    async def put(client: Client, sid: str, *args: Any) -> None:
        if sid == second:
            raise RPCError("Invalid schedule spec", RPCStatusCode.INVALID_ARGUMENT, b"")
        await real(client, sid, *args)

    monkeypatch.setattr(engine, "_put_schedule", put)
    steps_v2 = [*STEPS, {"name": "b", "type": "echo", "depends_on": ["a"]}]
    with pytest.raises(ToolError, match=r"triggers\.1\.cron: the Temporal server"):
        await call(
            tools,
            "workflow_create",
            name=name,
            steps=steps_v2,
            priority=9,
            triggers=[_cron(5), _cron(7)],
        )
    monkeypatch.setattr(engine, "_put_schedule", real)
    [listed] = await _listed(tools, name)
    assert listed["version"] == 1
    assert listed["priority"] == 5
    assert await _schedule_hours(client, first) == [ScheduleRange(1, 1, 1)]
    assert await _schedule_hours(client, second) == [ScheduleRange(2, 2, 1)]
    # The next good version takes the number the failed one did not keep.
    updated = await call(
        tools,
        "workflow_create",
        name=name,
        steps=steps_v2,
        triggers=[_cron(5)],
    )
    assert updated["version"] == 2
    assert updated["schedules"] == [first]
    assert await _schedule_hours(client, first) == [ScheduleRange(5, 5, 1)]
    assert not await _schedule_exists(client, second)
    await client.get_schedule_handle(first).delete()
    deleted = await call(tools, "workflow_delete", workflow_id=workflow_id)
    # Only schedules that existed are reported as deleted.
    assert deleted["schedules_deleted"] == []


async def test_delete_waits_for_running_create(
    client: Client, tools: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"delcreate-{uuid.uuid4().hex[:6]}"
    created = await call(
        tools, "workflow_create", name=name, steps=STEPS, triggers=[_cron(1)]
    )
    real = engine._put_schedule
    putting, release = asyncio.Event(), asyncio.Event()

    async def put(client: Client, sid: str, *args: Any) -> None:
        putting.set()
        await release.wait()
        await real(client, sid, *args)

    monkeypatch.setattr(engine, "_put_schedule", put)
    create = asyncio.create_task(
        call(
            tools,
            "workflow_create",
            name=name,
            steps=STEPS,
            triggers=[_cron(1), _cron(2), _cron(3)],
        )
    )
    await asyncio.wait_for(putting.wait(), 10)
    delete = asyncio.create_task(
        call(tools, "workflow_delete", workflow_id=created["workflow_id"])
    )
    # Time for a delete that does not wait to finish before the schedules exist.
    await asyncio.wait([delete], timeout=1)
    release.set()
    updated = await create
    deleted = await delete
    assert updated["version"] == 2
    assert deleted["status"] == "deleted"
    assert deleted["schedules_deleted"] == updated["schedules"]
    for schedule_id in updated["schedules"]:
        assert not await _schedule_exists(client, schedule_id)
    [listed] = await _listed(tools, name)
    assert listed["status"] == "deleted"


async def test_create_waits_for_running_delete(
    client: Client, tools: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"createdel-{uuid.uuid4().hex[:6]}"
    created = await call(
        tools, "workflow_create", name=name, steps=STEPS, triggers=[_cron(1)]
    )
    real = engine.delete_schedules
    deleting, release = asyncio.Event(), asyncio.Event()

    async def delete_schedules(*args: Any) -> list[str]:
        deleting.set()
        await release.wait()
        return await real(*args)

    monkeypatch.setattr(engine, "delete_schedules", delete_schedules)
    delete = asyncio.create_task(
        call(tools, "workflow_delete", workflow_id=created["workflow_id"])
    )
    await asyncio.wait_for(deleting.wait(), 10)
    create = asyncio.create_task(
        call(
            tools,
            "workflow_create",
            name=name,
            steps=STEPS,
            triggers=[_cron(1), _cron(2), _cron(3)],
        )
    )
    await asyncio.wait([create], timeout=1)
    release.set()
    deleted = await delete
    updated = await create
    assert deleted["schedules_deleted"] == created["schedules"]
    # The create came last, so the definition is active with all its schedules.
    assert updated["version"] == 2
    assert updated["status"] == "active"
    assert len(updated["schedules"]) == 3
    for schedule_id in updated["schedules"]:
        assert await _schedule_exists(client, schedule_id)
    [listed] = await _listed(tools, name)
    assert listed["status"] == "active"
    await call(tools, "workflow_delete", workflow_id=created["workflow_id"])


async def test_assign_on_deleted_definition_conflicts(
    client: Client, tools: ToolContext
) -> None:
    name = f"assigndel-{uuid.uuid4().hex[:6]}"
    created = await call(
        tools, "workflow_create", name=name, steps=STEPS, triggers=[_cron(3)]
    )
    workflow_id = created["workflow_id"]
    await call(tools, "workflow_delete", workflow_id=workflow_id)
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_agent_assign",
            task_id=f"{workflow_id}/a",
            agent_type="coder",
        )
    assert caught.value.kind == "conflict"
    assert caught.value.message.startswith(
        f"workflow {workflow_id!r} is deleted; create it again with workflow_create"
    )
    [listed] = await _listed(tools, name)
    assert listed["status"] == "deleted"
    assert listed["version"] == 1
    assert not await _schedule_exists(client, created["schedules"][0])


async def test_queue_status_rejects_unknown_queue(tools: ToolContext) -> None:
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_queue_status", queue_name="nexus-orchestratoin")
    assert caught.value.kind == "invalid_argument"
    message = caught.value.message
    assert message.startswith(
        "queue_name: unknown task queue 'nexus-orchestratoin' "
        "(did you mean nexus-orchestration?); use one of "
    )
    for queue in ["nexus-orchestration", "nexus-streaming", "nexus-test-steps"]:
        assert queue in message
    assert "nexus-neural-NODE_ID for a neural cluster node" in message
    with pytest.raises(ToolError, match="'nexus-neural-'"):
        await call(tools, "workflow_queue_status", queue_name="nexus-neural-")
    node = await call(tools, "workflow_queue_status", queue_name="nexus-neural-n1")
    assert node["queues"][0]["task_queue"] == "nexus-neural-n1"


async def test_unknown_ids_and_bad_status(tools: ToolContext) -> None:
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_status", workflow_id="wf_nope")
    assert caught.value.kind == "not_found"
    assert "workflow 'wf_nope' not found" in caught.value.message
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_status")
    assert caught.value.kind == "invalid_argument"
    assert "workflow_id" in caught.value.message
    assert "execution_id" in caught.value.message
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_audit_trail", workflow_id="wf_nope")
    assert caught.value.kind == "not_found"
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_list", status="bogus")
    assert caught.value.kind == "invalid_argument"
    assert "status" in caught.value.message
    assert "'active', 'deleted', 'running'" in caught.value.message


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        (
            "workflow_create",
            {"name": "loose", "steps": STEPS, "priority": "7"},
            "priority",
        ),
        (
            "workflow_create",
            {"name": "loose", "steps": STEPS, "priority": True},
            "priority",
        ),
        (
            "workflow_create",
            {"name": "loose", "steps": [{"name": "a", "type": "echo", "timeout": "2"}]},
            "steps.0.timeout",
        ),
        ("workflow_status", {"include_metrics": "yes"}, "include_metrics"),
        ("workflow_list", {"limit": "5"}, "limit"),
        ("workflow_execute", {"workflow_id": "wf_x", "async": "false"}, "async"),
        ("workflow_queue_status", {"include_messages": 1}, "include_messages"),
        ("workflow_audit_trail", {"limit": 2.0}, "limit"),
    ],
)
async def test_loose_types_are_rejected(
    tools: ToolContext, tool: str, arguments: dict[str, Any], field: str
) -> None:
    with pytest.raises(ToolError) as caught:
        await call(tools, tool, **arguments)
    assert caught.value.kind == "invalid_argument"
    assert field in caught.value.message


async def test_create_and_assign_check_agent_type_and_params(
    tools: ToolContext,
) -> None:
    name = f"params-{uuid.uuid4().hex[:6]}"
    for step, expected in [
        (
            {"type": "sandbox_execution", "params": {"code": "x", "template": "nope"}},
            "step 's': params.template: Input should be 'base'",
        ),
        (
            {"type": "storage", "params": {"operation": "list", "bucket": "../../etc"}},
            "step 's': params.bucket: invalid bucket name '../../etc'",
        ),
        (
            {"type": "echo", "params": {"x": "{{steps.a.output"}},
            "step 's': params.x: '{{steps.a.output' opens a reference",
        ),
        ({"type": "echo", "agent_type": "wizard"}, "unknown agent_type 'wizard'"),
    ]:
        with pytest.raises(ToolError) as caught:
            await call(
                tools, "workflow_create", name=name, steps=[{"name": "s", **step}]
            )
        assert caught.value.kind == "invalid_argument"
        assert expected in caught.value.message
    assert await _listed(tools, name) == []
    created = await call(
        tools,
        "workflow_create",
        name=name,
        steps=[{"name": "s", "type": "echo", "agent_type": "coder"}],
    )
    task_id = f"{created['workflow_id']}/s"
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_agent_assign", task_id=task_id, agent_type="wizard")
    assert caught.value.kind == "invalid_argument"
    assert "agent_type of step 's': unknown agent_type 'wizard'" in caught.value.message
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_agent_assign", task_id=task_id)
    assert caught.value.kind == "invalid_argument"
    assert "agent_type is missing for step 's'" in caught.value.message
    [listed] = await _listed(tools, name)
    assert listed["version"] == 1


async def test_retried_timeout_reports_every_attempt(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    created = await call(
        tools,
        "workflow_create",
        name=f"timeouts-{uuid.uuid4().hex[:6]}",
        steps=[
            {
                "name": "slow",
                "type": "test_sleep",
                "timeout": 1,
                "retry_attempts": 1,
                "params": {"seconds": 30},
            }
        ],
    )
    started = await call(tools, "workflow_execute", workflow_id=created["workflow_id"])
    execution_id = started["execution_id"]
    handle = client.get_workflow_handle(execution_id, result_type=ExecutionState)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    status = await call(
        tools, "workflow_status", execution_id=execution_id, include_metrics=True
    )
    [step] = status["execution"]["steps"]
    assert step["status"] == "failed"
    assert step["error"].startswith("timed out:")
    assert step["attempts"] == 2
    assert status["metrics"]["attempts"] == 2
    trail = await call(
        tools, "workflow_audit_trail", workflow_id=created["workflow_id"]
    )
    failed = [e for e in trail["events"] if e["event"] == "step.failed"]
    assert [e["attempt"] for e in failed] == [2]
    await replay_run(client, execution_id, all_workflows())


@pytest.mark.parametrize(
    ("flow_input", "expected"),
    [
        (
            {
                "definition": {
                    "name": "from-outside-bad",
                    "priority": 99,
                    "steps": [{"name": "a", "type": "echo"}],
                },
                "input_data": {},
            },
            "definition.priority: Input should be less than or equal to 10, got 99",
        ),
        (
            {
                "definition": {
                    "name": "from-outside-bad",
                    "steps": [
                        {
                            "name": "a",
                            "type": "echo",
                            "timeout": -1,
                            "retry_attempts": 1000,
                        }
                    ],
                }
            },
            "step 'a': invalid timeout -1",
        ),
        (
            {"definition": {"name": "from-outside-bad", "steps": []}, "extra": 1},
            "definition.steps: List should have at least 1 item",
        ),
        ("not an object", "input: Input should be a valid dictionary"),
        (
            {
                "definition": {
                    "name": "tab\tname\n",
                    "steps": [{"name": "a", "type": "echo"}],
                }
            },
            "name: invalid workflow name 'tab\\tname\\n'",
        ),
    ],
)
async def test_bad_external_start_fails_naming_the_field(
    client: Client, flow_workers: Settings, flow_input: Any, expected: str
) -> None:
    execution_id = f"ext-bad-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        "FlowNexusWorkflow",
        flow_input,
        id=execution_id,
        task_queue="nexus-orchestration",
        result_type=ExecutionState,
    )
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    cause = caught.value.cause
    assert expected in str(getattr(cause, "message", cause))
    assert getattr(cause, "non_retryable", False)
    await replay_run(client, execution_id, all_workflows())


async def test_env_var_value_kept_out_of_errors(tools: ToolContext) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex[:8]}"
    for value, expected in [
        (f"{secret}-{{{{x", "params.env_vars.TOKEN: the value opens a reference"),
        (
            f"{{{{{secret}}}}}",
            "params.env_vars: a value contains an invalid reference",
        ),
    ]:
        step = {
            "name": "a",
            "type": "sandbox_execution",
            "params": {"code": "print(1)", "env_vars": {"TOKEN": value}},
        }
        with pytest.raises(ToolError) as caught:
            await call(tools, "workflow_create", name="leak", steps=[step])
        assert caught.value.kind == "invalid_argument"
        assert expected in caught.value.message
        assert secret not in caught.value.message
    assert await _listed(tools, "leak") == []


async def test_public_param_reference_shown(tools: ToolContext) -> None:
    step = {"name": "a", "type": "echo", "params": {"x": "{{nope}}"}}
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_create", name="shown", steps=[step])
    assert "invalid reference {{nope}}" in caught.value.message


async def test_step_and_reference_problems_reported_together(
    tools: ToolContext,
) -> None:
    steps = [
        {
            "name": "a",
            "type": "echo",
            "params": {"x": "{{steps.b.output.x}}", "y": "{{steps.zz.output.y}}"},
        },
        {"name": "b", "type": "echo"},
        {"name": "c", "type": "teleport", "depends_on": ["b"]},
    ]
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_create", name="many-problems", steps=steps)
    message = caught.value.message
    assert "step 'c'" in message, message
    assert "names unknown step 'zz'" in message
    # Upstream is known here, so the reference to a step outside it is named.
    assert "names step 'b', which is not upstream" in message


async def test_oversized_definition_and_input_rejected(
    flow_workers: Settings, tools: ToolContext
) -> None:
    big = [
        {"name": f"s{i}", "type": "echo", "params": {"blob": "x" * 300_000}}
        for i in range(4)
    ]
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_create", name="too-big", steps=big)
    assert caught.value.kind == "invalid_argument"
    assert "over the limit of 1048576 bytes" in caught.value.message
    listed = await call(tools, "workflow_list", limit=1000)
    assert "too-big" not in [w["name"] for w in listed["workflows"]]
    created = await call(tools, "workflow_create", name="big-input", steps=STEPS)
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_execute",
            workflow_id=created["workflow_id"],
            input_data={"blob": "x" * 2_500_000},
        )
    assert caught.value.kind == "invalid_argument"
    assert "must fit in 2 MiB" in caught.value.message
    status = await call(tools, "workflow_status", workflow_id=created["workflow_id"])
    assert status["executions"] == []


async def test_invalid_referenced_value_names_reference(
    flow_workers: Settings, tools: ToolContext
) -> None:
    steps = [
        {"name": "first", "type": "echo", "params": {"code": 0}},
        {
            "name": "save",
            "type": "storage",
            "depends_on": ["first"],
            "params": {
                "operation": "put",
                "bucket": "data",
                "path": "out.txt",
                "content": "{{steps.first.output.code}}",
            },
        },
    ]
    created = await call(tools, "workflow_create", name="typed-ref", steps=steps)
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_execute",
            workflow_id=created["workflow_id"],
            **{"async": False},
        )
    assert (
        "content: {{steps.first.output.code}} gave 0 (an integer); "
        "Input should be a valid string" in caught.value.message
    )
