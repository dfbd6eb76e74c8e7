"""FlowNexusWorkflow runs through the tools against a real dev server, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError

from app.contracts.workflows import ExecutionState
from app.settings import Settings
from app.storage.local import storage_for
from app.tools import ToolContext, ToolError
from tests.support.replay import replay_run
from tests.workflows.conftest import CANCELLED, call
from workers.registry import all_workflows


async def _create(
    ctx: ToolContext, name: str, steps: list[dict[str, Any]], **extra: Any
) -> str:
    created = await call(ctx, "workflow_create", name=name, steps=steps, **extra)
    return str(created["workflow_id"])


async def _run(
    ctx: ToolContext, workflow_id: str, input_data: dict[str, Any] | None = None
) -> dict[str, Any]:
    result = await call(
        ctx,
        "workflow_execute",
        workflow_id=workflow_id,
        input_data=input_data or {},
        **{"async": False},
    )
    return result


def _steps(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in state["steps"]}


async def test_templates_pass_outputs(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "templating",
        [
            {"name": "first", "type": "echo", "params": {"n": "{{input.n}}"}},
            {
                "name": "second",
                "type": "echo",
                "depends_on": ["first"],
                "params": {
                    "copied": "{{steps.first.output.n}}",
                    "text": "n is {{steps.first.output.n}} for {{input.who}}",
                },
            },
        ],
    )
    result = await _run(tools, workflow_id, {"n": 41, "who": "ada"})
    assert result["status"] == "completed"
    steps = _steps(result["result"])
    assert steps["first"]["output"] == {"n": 41}
    assert steps["second"]["output"] == {"copied": 41, "text": "n is 41 for ada"}
    assert steps["second"]["attempts"] == 1
    stored = await call(
        tools,
        "workflow_status",
        execution_id=result["execution_id"],
        include_metrics=True,
    )
    assert stored["source"] == "database"
    assert stored["execution"]["version"] == 1
    assert _steps(stored["execution"])["second"]["status"] == "completed"
    assert stored["metrics"]["steps_by_status"] == {"completed": 2}
    await replay_run(client, result["execution_id"], all_workflows())


async def test_independent_steps_overlap(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "parallel",
        [
            {"name": "start", "type": "echo"},
            {
                "name": "left",
                "type": "test_sleep",
                "depends_on": ["start"],
                "params": {"seconds": 1.0},
            },
            {
                "name": "right",
                "type": "test_sleep",
                "depends_on": ["start"],
                "params": {"seconds": 1.0},
            },
            {"name": "join", "type": "echo", "depends_on": ["left", "right"]},
        ],
    )
    result = await _run(tools, workflow_id)
    steps = _steps(result["result"])
    left, right, join = steps["left"], steps["right"], steps["join"]
    # Overlap: each branch starts before the other one ends.
    assert left["started_at"] < right["finished_at"]
    assert right["started_at"] < left["finished_at"]
    assert join["started_at"] >= max(left["finished_at"], right["finished_at"])
    await replay_run(client, result["execution_id"], all_workflows())


async def test_long_chain_runs_in_order(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    count = 300
    steps: list[dict[str, Any]] = [
        {"name": "s0", "type": "echo", "params": {"path": "0"}}
    ]
    for index in range(1, count):
        steps.append(
            {
                "name": f"s{index}",
                "type": "echo",
                "depends_on": [f"s{index - 1}"],
                "params": {"path": f"{{{{steps.s{index - 1}.output.path}}}}.{index}"},
            }
        )
    workflow_id = await _create(tools, "long-chain", steps)
    result = await _run(tools, workflow_id)
    assert result["status"] == "completed"
    final = _steps(result["result"])[f"s{count - 1}"]
    assert final["output"]["path"] == ".".join(str(i) for i in range(count))
    trail = await call(
        tools, "workflow_audit_trail", workflow_id=workflow_id, limit=10000
    )
    transitions = [
        (e["step"], e["event"]) for e in trail["events"] if e["step"] is not None
    ]
    expected = [
        (f"s{i}", event)
        for i in range(count)
        for event in ("step.running", "step.completed")
    ]
    assert transitions == expected
    await replay_run(client, result["execution_id"], all_workflows())


async def test_terminated_execution_reported_closed(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "terminated",
        [
            {"name": "long", "type": "test_sleep", "params": {"seconds": 30}},
            {"name": "after", "type": "echo", "depends_on": ["long"]},
        ],
    )
    started = await call(tools, "workflow_execute", workflow_id=workflow_id)
    execution_id = started["execution_id"]
    await _wait_for_step(tools, execution_id, "long", "running")
    await client.get_workflow_handle(execution_id).terminate(reason="test")
    status = await call(tools, "workflow_status", execution_id=execution_id)
    assert status["source"] == "database"
    assert status["execution"]["status"] == "terminated"
    steps = _steps(status["execution"])
    assert steps["long"]["status"] == "cancelled"
    assert steps["after"]["status"] == "skipped"
    listed = await call(tools, "workflow_list", status="terminated")
    assert workflow_id in [w["workflow_id"] for w in listed["workflows"]]
    running = await call(tools, "workflow_list", status="running")
    assert workflow_id not in [w["workflow_id"] for w in running["workflows"]]


async def test_terminated_execution_listed_closed(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "terminated-listed",
        [{"name": "long", "type": "test_sleep", "params": {"seconds": 30}}],
    )
    started = await call(tools, "workflow_execute", workflow_id=workflow_id)
    execution_id = started["execution_id"]
    await _wait_for_step(tools, execution_id, "long", "running")
    await client.get_workflow_handle(execution_id).terminate(reason="test")
    listed = await call(tools, "workflow_list", limit=1000)
    item = next(w for w in listed["workflows"] if w["workflow_id"] == workflow_id)
    assert item["last_execution_status"] == "terminated"


async def test_flaky_step_succeeds_on_retry(
    flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "flaky",
        [
            {
                "name": "flaky",
                "type": "test_flaky",
                "retry_attempts": 2,
                "params": {"succeed_on": 3},
            }
        ],
    )
    result = await _run(tools, workflow_id)
    step = _steps(result["result"])["flaky"]
    assert step["status"] == "completed"
    assert step["attempts"] == 3
    assert step["output"] == {"succeeded_on": 3}


async def test_failed_step_skips_dependents(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "failing",
        [
            {"name": "broken", "type": "test_broken", "retry_attempts": 1},
            {"name": "after", "type": "echo", "depends_on": ["broken"]},
            {"name": "later", "type": "echo", "depends_on": ["after"]},
            {"name": "independent", "type": "echo"},
        ],
    )
    with pytest.raises(ToolError) as caught:
        await _run(tools, workflow_id)
    assert "step 'broken' failed" in caught.value.message
    assert "broken on purpose (attempt 2)" in caught.value.message
    listed = await call(tools, "workflow_status", workflow_id=workflow_id)
    execution_id = listed["executions"][0]["execution_id"]
    status = await call(tools, "workflow_status", execution_id=execution_id)
    execution = status["execution"]
    steps = _steps(execution)
    assert execution["status"] == "failed"
    assert steps["broken"]["status"] == "failed"
    assert steps["broken"]["attempts"] == 2
    assert steps["after"]["status"] == "skipped"
    assert "upstream step 'broken' failed" in steps["after"]["error"]
    assert steps["later"]["status"] == "skipped"
    assert steps["independent"]["status"] == "completed"
    # Timestamps read back from either database carry the UTC zone.
    stamps = [
        listed["executions"][0]["started_at"],
        execution["started_at"],
        execution["closed_at"],
        steps["broken"]["finished_at"],
    ]
    assert all(stamp.endswith("Z") for stamp in stamps), stamps
    with pytest.raises(WorkflowFailureError):
        await client.get_workflow_handle(execution_id).result()
    await replay_run(client, execution_id, all_workflows())


async def test_continue_on_failure_runs_dependents(
    flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "tolerant",
        [
            {
                "name": "broken",
                "type": "test_broken",
                "retry_attempts": 0,
                "continue_on_failure": True,
            },
            {"name": "after", "type": "echo", "depends_on": ["broken"]},
        ],
    )
    result = await _run(tools, workflow_id)
    steps = _steps(result["result"])
    assert result["status"] == "completed"
    assert steps["broken"]["status"] == "failed"
    assert steps["after"]["status"] == "completed"


async def test_unavailable_type_fails_clearly(
    flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools, "missing-capability", [{"name": "run", "type": "test_missing"}]
    )
    with pytest.raises(ToolError) as caught:
        await _run(tools, workflow_id)
    assert "step type 'test_missing' is not available" in caught.value.message
    assert "test capability is not installed" in caught.value.message


async def test_cancel_stops_running_step(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "cancellable",
        [
            {"name": "long", "type": "test_sleep", "params": {"seconds": 60}},
            {"name": "after", "type": "echo", "depends_on": ["long"]},
        ],
    )
    started = await call(tools, "workflow_execute", workflow_id=workflow_id)
    execution_id = started["execution_id"]
    await _wait_for_step(tools, execution_id, "long", "running")
    handle = client.get_workflow_handle(execution_id)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    status = await call(tools, "workflow_status", execution_id=execution_id)
    steps = _steps(status["execution"])
    assert status["source"] == "database"
    assert status["execution"]["status"] == "cancelled"
    assert steps["long"]["status"] == "cancelled"
    # The attempt that was running counts.
    assert steps["long"]["attempts"] == 1
    assert steps["after"]["status"] == "skipped"
    for _ in range(50):
        if f"{execution_id}/long" in CANCELLED:
            break
        await asyncio.sleep(0.1)
    assert f"{execution_id}/long" in CANCELLED
    await replay_run(client, execution_id, all_workflows())


@pytest.mark.parametrize(
    ("close", "status"), [("cancel", "cancelled"), ("terminate", "terminated")]
)
async def test_sync_execute_reports_close(
    client: Client, flow_workers: Settings, tools: ToolContext, close: str, status: str
) -> None:
    workflow_id = await _create(
        tools,
        f"{close}-while-waited",
        [{"name": "long", "type": "test_sleep", "params": {"seconds": 60}}],
    )
    waiting = asyncio.create_task(_run(tools, workflow_id))
    execution_id = None
    for _ in range(100):
        listed = await call(tools, "workflow_status", workflow_id=workflow_id)
        if listed["executions"]:
            execution_id = listed["executions"][0]["execution_id"]
            break
        await asyncio.sleep(0.1)
    assert execution_id is not None
    await _wait_for_step(tools, execution_id, "long", "running")
    handle = client.get_workflow_handle(execution_id)
    if close == "cancel":
        await handle.cancel()
    else:
        await handle.terminate(reason="test")

    result = await waiting
    assert result["status"] == status
    assert result["result"]["status"] == status
    assert _steps(result["result"])["long"]["status"] == "cancelled"


async def _wait_for_step(
    ctx: ToolContext, execution_id: str, step: str, wanted: str
) -> dict[str, Any]:
    for _ in range(100):
        status = await call(ctx, "workflow_status", execution_id=execution_id)
        if (
            status["execution"]
            and _steps(status["execution"])[step]["status"] == wanted
        ):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"step {step} of {execution_id} never became {wanted}")


async def test_storage_and_reporting(
    flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "store-and-report",
        [
            {"name": "health", "type": "system_initialization"},
            {
                "name": "put",
                "type": "storage",
                "depends_on": ["health"],
                "params": {
                    "operation": "put",
                    "bucket": "data",
                    "path": "in/{{input.name}}.txt",
                    "content": "{{input.text}}",
                },
            },
            {
                "name": "get",
                "type": "storage",
                "depends_on": ["put"],
                "params": {
                    "operation": "get",
                    "bucket": "data",
                    "path": "{{steps.put.output.path}}",
                },
            },
            {
                "name": "report",
                "type": "reporting",
                "depends_on": ["get"],
                "params": {"title": "Round trip", "path": "r/{{input.name}}.md"},
            },
        ],
    )
    result = await _run(tools, workflow_id, {"name": "hello", "text": "hi | there"})
    steps = _steps(result["result"])
    assert steps["health"]["output"]["database"] == "healthy"
    assert steps["put"]["output"]["size"] == len("hi | there")
    assert steps["get"]["output"]["content"] == "hi | there"
    assert steps["report"]["output"]["steps_reported"] == ["get", "health", "put"]
    report = storage_for(flow_workers).get("reports", "r/hello.md").decode()
    assert report.startswith("# Round trip")
    assert "## get" in report
    assert "| content | hi \\| there |" in report


async def test_storage_step_binary_get(
    flow_workers: Settings, tools: ToolContext
) -> None:
    """A `get` returns base64 when asked, and fails rather than return text
    that its size and sha256 do not describe."""
    storage_for(flow_workers).put("data", "bin/raw.bin", b"\x00\x01\x02\xff", None)
    get = {"operation": "get", "bucket": "data", "path": "bin/raw.bin"}
    workflow_id = await _create(
        tools,
        "binary-get",
        [
            {"name": "b64", "type": "storage", "params": {**get, "encoding": "base64"}},
            {"name": "text", "type": "storage", "params": get},
        ],
    )
    with pytest.raises(ToolError) as failed:
        await _run(tools, workflow_id)
    assert (
        "step 'text' (storage): object 'bin/raw.bin' is not valid UTF-8 (byte 3)"
        in (failed.value.message)
    )
    assert "params.encoding base64" in failed.value.message
    named = re.search(r"execution (wfx_\w+)", failed.value.message)
    assert named is not None
    stored = await call(tools, "workflow_status", execution_id=named.group(1))
    steps = _steps(stored["execution"])
    assert steps["b64"]["output"]["content"] == "AAEC/w=="
    assert steps["text"]["status"] == "failed"


async def test_steps_keep_to_the_groups_of_the_key(
    flow_workers: Settings, tools: ToolContext
) -> None:
    """A run started by a key limited to some tool groups calls no tool of
    another group through its steps, as the key itself cannot."""
    storage_for(flow_workers).put("private", "s.txt", b"not for this key", None)
    limited = replace(tools, groups=("workflows",))
    workflow_id = await _create(
        limited,
        "limited-key",
        [
            {"name": "echo", "type": "echo", "params": {"n": 1}},
            {
                "name": "peek",
                "type": "storage",
                "params": {"operation": "get", "bucket": "private", "path": "s.txt"},
            },
        ],
    )
    with pytest.raises(ToolError) as failed:
        await _run(limited, workflow_id)
    assert "a storage step needs the tool group storage" in failed.value.message
    assert "limited to the groups: workflows" in failed.value.message
    assert "not for this key" not in failed.value.message
    named = re.search(r"execution (wfx_\w+)", failed.value.message)
    assert named is not None
    stored = await call(tools, "workflow_status", execution_id=named.group(1))
    steps = _steps(stored["execution"])
    assert steps["echo"]["status"] == "completed"
    assert steps["peek"]["status"] == "failed"
    # Only one attempt: the key's groups stay the same on a retry.
    assert steps["peek"]["attempts"] == 1
    # The same run by an unlimited caller reads the object.
    result = await _run(tools, workflow_id)
    assert _steps(result["result"])["peek"]["output"]["content"] == "not for this key"


async def test_storage_step_path_checked_at_create(tools: ToolContext) -> None:
    for params, problem in (
        ({"operation": "put", "bucket": "data", "content": "x"}, "path is missing"),
        (
            {"operation": "list", "bucket": "data", "path": "keep/"},
            "path 'keep/' is not read by list; give the folder to list as prefix",
        ),
        (
            {"operation": "get", "bucket": "data", "path": "../../escape.txt"},
            "'..' segments are not allowed",
        ),
        (
            {"operation": "get", "bucket": "data", "path": "a", "prefix": "b/"},
            "prefix 'b/' is read only by list",
        ),
        (
            {"operation": "list", "bucket": "data", "prefix": "../"},
            "prefix: invalid object path '../': '..' segments are not allowed",
        ),
    ):
        with pytest.raises(ToolError) as caught:
            await call(
                tools,
                "workflow_create",
                name="bad-storage",
                steps=[{"name": "s", "type": "storage", "params": params}],
            )
        assert problem in caught.value.message, caught.value.message
        assert "params.params" not in caught.value.message
        assert "Value error" not in caught.value.message


async def test_versions_and_audit_trail(
    flow_workers: Settings, tools: ToolContext
) -> None:
    steps = [{"name": "a", "type": "echo"}]
    first = await call(tools, "workflow_create", name="versioned", steps=steps)
    same = await call(tools, "workflow_create", name="versioned", steps=steps)
    assert same["version"] == 1
    assert same["new_version"] is False
    changed = await call(
        tools,
        "workflow_create",
        name="versioned",
        steps=[*steps, {"name": "b", "type": "echo", "depends_on": ["a"]}],
    )
    assert changed["workflow_id"] == first["workflow_id"]
    assert changed["version"] == 2
    assert first["features"] == ["message_queues", "audit_trail", "agent_assignment"]
    run_one = await _run(tools, first["workflow_id"])
    run_two = await _run(tools, first["workflow_id"])
    assert run_one["version"] == 2
    trail = await call(
        tools, "workflow_audit_trail", workflow_id=first["workflow_id"], limit=100
    )
    events = [(e["execution_id"], e["step"], e["event"]) for e in trail["events"]]
    one, two = run_one["execution_id"], run_two["execution_id"]
    assert events == [
        (one, None, "execution.started"),
        (one, "a", "step.running"),
        (one, "a", "step.completed"),
        (one, "b", "step.running"),
        (one, "b", "step.completed"),
        (one, None, "execution.completed"),
        (two, None, "execution.started"),
        (two, "a", "step.running"),
        (two, "a", "step.completed"),
        (two, "b", "step.running"),
        (two, "b", "step.completed"),
        (two, None, "execution.completed"),
    ]
    assert all(e["at"].endswith("Z") for e in trail["events"])
    listed = await call(tools, "workflow_list")
    names = {w["name"]: w for w in listed["workflows"]}
    assert names["versioned"]["version"] == 2
    assert names["versioned"]["last_execution_status"] == "completed"
    assert names["versioned"]["created_at"].endswith("Z")
    assert names["versioned"]["updated_at"].endswith("Z")


async def test_agent_assignment(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    workflow_id = await _create(
        tools,
        "assigned",
        [
            {"name": "wait", "type": "test_sleep", "params": {"seconds": 2}},
            {
                "name": "code",
                "type": "echo",
                "agent_type": "coder",
                "depends_on": ["wait"],
            },
        ],
    )
    started = await call(tools, "workflow_execute", workflow_id=workflow_id)
    execution_id = started["execution_id"]
    await _wait_for_step(tools, execution_id, "wait", "running")
    assigned = await call(
        tools,
        "workflow_agent_assign",
        task_id=f"{execution_id}/code",
        agent_type="reviewer",
    )
    assert assigned["agent_type"] == "reviewer"
    # No swarm runs in this test, so nothing resolves and the reason is kept.
    assert assigned["agent_id"] is None
    assert "type 'reviewer'" in assigned["unresolved_reason"]
    with pytest.raises(ToolError) as caught:
        await call(
            tools,
            "workflow_agent_assign",
            task_id=f"{execution_id}/nostep",
            agent_type="coder",
        )
    assert caught.value.kind == "not_found"
    assert "has no step 'nostep'" in caught.value.message
    with pytest.raises(ToolError, match="only a pending step"):
        await call(
            tools,
            "workflow_agent_assign",
            task_id=f"{execution_id}/wait",
            agent_type="coder",
        )
    handle = client.get_workflow_handle(execution_id, result_type=ExecutionState)
    final = await handle.result()
    assert _steps(final.model_dump(mode="json"))["code"]["agent_type"] == "reviewer"
    in_definition = await call(
        tools,
        "workflow_agent_assign",
        task_id=f"{workflow_id}/code",
        agent_type="analyst",
    )
    assert in_definition["version"] == 2
    trail = await call(tools, "workflow_audit_trail", workflow_id=workflow_id)
    assert "step.agent_assigned" in [e["event"] for e in trail["events"]]


async def test_queue_status_reports_pollers(
    flow_workers: Settings, tools: ToolContext
) -> None:
    result = await call(
        tools,
        "workflow_queue_status",
        queue_name="nexus-orchestration",
        include_messages=True,
    )
    queue = result["queues"][0]
    assert queue["task_queue"] == "nexus-orchestration"
    assert queue["workflow"]["pollers"]
    assert queue["activity"]["pollers"]
    assert queue["workflow"]["backlog"] >= 0
    assert queue["messages"] == []


async def test_sandbox_step_env_names_checked_at_create(tools: ToolContext) -> None:
    step = {
        "name": "run",
        "type": "sandbox_execution",
        "params": {"code": "print(1)", "env_vars": {"bad name": "SpaceNameSecret"}},
    }
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_create", name="bad-env", steps=[step])
    assert "env var name 'bad name' is invalid" in caught.value.message
    assert "SpaceNameSecret" not in caught.value.message
    # Values that no run could pass to a program fail here too, without the
    # value; one that a reference fills in is checked when the step runs.
    for value, problem in (
        ("Nul\x00Secret", "its value contains a NUL byte"),
        ("L" * 131072, "NAME=value takes 131079 bytes, over Linux's limit"),
    ):
        step["params"]["env_vars"] = {"TOKEN": value}
        with pytest.raises(ToolError) as bad_value:
            await call(tools, "workflow_create", name="bad-env", steps=[step])
        assert f"env var 'TOKEN' is invalid: {problem}" in bad_value.value.message
        assert "Secret" not in bad_value.value.message
        assert "LLLL" not in bad_value.value.message
    step["params"]["env_vars"] = {"TOKEN": "{{input.token}}"}
    await call(tools, "workflow_create", name="ref-env", steps=[step])


async def test_name_given_as_id_points_to_id(tools: ToolContext) -> None:
    created = await call(
        tools,
        "workflow_create",
        name="named-run",
        steps=[{"name": "a", "type": "echo"}],
    )
    with pytest.raises(ToolError) as caught:
        await call(tools, "workflow_execute", workflow_id="named-run")
    assert caught.value.kind == "not_found"
    assert (
        f"that is the name of workflow {created['workflow_id']!r}; pass its id"
        in caught.value.message
    )
    with pytest.raises(ToolError) as assign:
        await call(
            tools, "workflow_agent_assign", task_id="named-run/a", agent_type="coder"
        )
    assert assign.value.kind == "not_found"
    assert f"use {created['workflow_id']}/a to assign" in assign.value.message


async def test_status_shows_attempt_in_progress(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    """While a step retries, its live status gives the attempt in progress
    and why the last one failed."""
    workflow_id = await _create(
        tools,
        "retrying",
        [
            {
                "name": "wait",
                "type": "system_initialization",
                "retry_attempts": 8,
                "timeout": 20,
                "params": {"queues": ["nexus-neural-nosuchnode"]},
            }
        ],
    )
    started = await call(
        tools, "workflow_execute", workflow_id=workflow_id, **{"async": True}
    )
    execution_id = started["execution_id"]
    try:
        step: dict[str, Any] = {}
        for _ in range(200):
            state = await call(tools, "workflow_status", execution_id=execution_id)
            step = _steps(state["execution"])["wait"]
            if step["attempts"] >= 2:
                break
            await asyncio.sleep(0.1)
        assert step["status"] == "running"
        assert step["attempts"] >= 2, step
        assert step["error"].startswith(f"attempt {step['attempts'] - 1} failed: ")
        assert "no worker polls task queue 'nexus-neural-nosuchnode'" in step["error"]
    finally:
        await client.get_workflow_handle(execution_id).cancel()


async def test_result_over_payload_limit_leaves_outputs_out(
    client: Client, flow_workers: Settings, tools: ToolContext
) -> None:
    """Two outputs of 800 KB and their input would make a result over
    Temporal's 2 MB limit, which it refuses: the run would stay running and
    its steps run again. The result leaves the largest parts out, names
    them, and the database keeps them."""
    blob = "q" * 800_000
    workflow_id = await _create(
        tools,
        "big-outputs",
        [
            {"name": "a", "type": "echo", "params": {"b": "{{input.blob}}"}},
            {"name": "b", "type": "echo", "params": {"b": "{{input.blob}}"}},
        ],
    )
    result = await asyncio.wait_for(_run(tools, workflow_id, {"blob": blob}), 120)
    assert result["status"] == "completed"
    # The tool returns the whole execution, read from the database.
    assert {step["output"]["b"] for step in result["result"]["steps"]} == {blob}
    handle = client.get_workflow_handle(
        result["execution_id"], result_type=ExecutionState
    )
    carried = await handle.result()
    # 2.4 MB in all: both outputs go, and the input fits.
    assert sorted(carried.omitted) == ["steps.a.output", "steps.b.output"]
    assert carried.input_data == {"blob": blob}
    trail = await call(tools, "workflow_audit_trail", workflow_id=workflow_id)
    events = [(e["step"], e["event"]) for e in trail["events"]]
    assert events.count((None, "execution.started")) == 1
    assert events.count((None, "execution.completed")) == 1
    await replay_run(client, result["execution_id"], all_workflows())
