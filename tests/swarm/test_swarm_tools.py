"""Swarm lifecycle through the tools: limits, inputs, results, scaling,
destruction and the database mirror."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.queues import ORCHESTRATION, SANDBOX
from app.contracts.swarm import (
    MAX_CAPABILITIES,
    MAX_CAPABILITY_CHARS,
    AgentState,
    Assignment,
    SpawnAgentRequest,
    SwarmState,
    SwarmTaskInput,
    TaskRecord,
    TaskSpec,
    TaskWork,
    task_workflow_id,
)
from app.sandbox import service as sandbox_service
from app.settings import Settings
from app.swarm import service
from app.swarm.executor import agent_sandbox_id, build_executor
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool
from tests.conftest import running_workers
from tests.support.replay import replay_run, replay_saved
from tests.swarm.conftest import (
    GATED_PROGRAM,
    SWARM_QUEUES,
    Swarms,
    agent_folder,
    start_gated_task,
    wait_for_file,
)
from workers.registry import all_workflows
from workflows.swarm import SwarmTaskWorkflow


async def test_spawn_limit_rejects_past_max(swarms: Swarms) -> None:
    swarm = await swarms.call("swarm_init", topology="mesh", maxAgents=2)
    assert swarm["max_agents"] == 2
    assert swarm["status"] == "active"
    assert swarm["agents"] == []
    for _ in range(2):
        agent = await swarms.call("agent_spawn", type="coder")
        assert agent["swarm_id"] == swarm["swarm_id"]
        assert agent["sandbox_id"] is None
    with pytest.raises(ToolError) as caught:
        await swarms.call("agent_spawn", type="coder")
    assert "already has 2 agents" in caught.value.message
    assert "maxAgents is 2" in caught.value.message
    status = await swarms.call("swarm_status", swarm_id=swarm["swarm_id"])
    assert len(status["agents"]) == 2


_real_execute_update = WorkflowHandle.execute_update


async def _apply_then_lose_reply(
    self: WorkflowHandle, *args: Any, **kwargs: Any
) -> Any:
    """Apply the update, then fail as a connection lost before its reply does."""
    await _real_execute_update(self, *args, **kwargs)
    raise RPCError("http2 error", RPCStatusCode.UNAVAILABLE, b"")


async def test_lost_update_reply_names_check(
    swarms: Swarms, monkeypatch: pytest.MonkeyPatch
) -> None:
    swarm = await swarms.call("swarm_init", topology="mesh", maxAgents=2)
    swarm_id = swarm["swarm_id"]
    with monkeypatch.context() as patch:
        patch.setattr(WorkflowHandle, "execute_update", _apply_then_lose_reply)
        with pytest.raises(ToolError) as spawn_error:
            await swarms.call("agent_spawn", type="coder", swarm_id=swarm_id)
        with pytest.raises(ToolError) as task_error:
            await swarms.call(
                "task_orchestrate", task="greet", command="echo hi", swarm_id=swarm_id
            )

    assert spawn_error.value.kind == "unavailable"
    assert "http2 error" in spawn_error.value.message
    assert "may have accepted the change" in spawn_error.value.message
    assert (
        f"Check with swarm_status with swarm_id {swarm_id} before you send it again"
        in spawn_error.value.message
    )
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len(status["agents"]) == 1

    assert task_error.value.kind == "unavailable"
    found = re.search(
        r"Check with task_status with task_id (\S+) ", task_error.value.message
    )
    assert found is not None, task_error.value.message
    task = await swarms.call("task_results", task_id=found[1], wait_seconds=120)
    assert task["swarm_id"] == swarm_id
    assert task["status"] == "completed"
    await swarms.call("swarm_destroy", swarm_id=swarm_id)


async def test_generated_names_skip_taken_names(swarms: Swarms) -> None:
    swarm = await swarms.call("swarm_init", topology="mesh", strategy="balanced")
    swarm_id = swarm["swarm_id"]
    # Agent 0 takes the name that agent 1 would be given.
    chosen = await swarms.call(
        "agent_spawn", type="coder", name="coder-1", swarm_id=swarm_id
    )
    generated = await swarms.call("agent_spawn", type="coder", swarm_id=swarm_id)
    assert chosen["name"] == "coder-1"
    assert generated["name"] == "coder-2"
    # Agent 3 of a balanced swarm is a tester, and swarm_scale names it too.
    await swarms.call(
        "agent_spawn", type="reviewer", name="tester-3", swarm_id=swarm_id
    )
    await swarms.call("swarm_scale", target_agents=4, swarm_id=swarm_id)
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    names = [a["name"] for a in status["agents"]]
    assert names == ["coder-1", "coder-2", "tester-3", "tester-4"]
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


async def test_defaults_follow_tools_md(swarms: Swarms) -> None:
    swarm = await swarms.call("swarm_init", topology="ring")
    assert swarm["max_agents"] == 8
    assert swarm["strategy"] == "balanced"
    await swarms.call("agent_spawn", type="coder")
    task = await swarms.call("task_orchestrate", task="x", code="print(1)")
    assert task["priority"] == "medium"
    assert task["strategy"] == "adaptive"


async def test_result_has_real_stdout(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("star", ["coder"])
    result = await swarms.run_task(
        task="compute",
        code="import sys; print(sum(range(101))); print('warn', file=sys.stderr)",
        swarm_id=swarm_id,
    )
    assert result["status"] == "completed"
    [step] = result["results"]
    assert step["stdout"] == "5050\n"
    assert step["stderr"] == "warn\n"
    assert step["exit_code"] == 0
    assert step["agent_id"] == agents[0]["agent_id"]
    assert step["duration_ms"] > 0
    assert step["sandbox_id"]
    assert result["output"] == "5050\n"
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    [agent] = status["agents"]
    assert agent["sandbox_id"] == step["sandbox_id"]
    assert agent["sandbox_state"] == "running"
    assert agent["tasks_completed"] == 1


async def test_failing_program_reports_exit_code(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    result = await swarms.run_task(
        task="fail", command="echo out; echo broken >&2; exit 3", swarm_id=swarm_id
    )
    assert result["status"] == "failed"
    [step] = result["results"]
    assert step["exit_code"] == 3
    assert step["stdout"] == "out\n"
    assert "exit code 3: broken" in step["error"]
    assert "exit code 3" in result["error"]
    # The step's stdout stays in the step, since no step completed.
    assert result["output"] is None


async def test_bash_language_runs(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    bash = await swarms.run_task(
        task="b", code="echo $((6*7))", language="bash", swarm_id=swarm_id
    )
    assert bash["results"][0]["stdout"] == "42\n"


async def test_bad_inputs_are_rejected(swarms: Swarms) -> None:
    with pytest.raises(ToolInputError, match="topology"):
        await swarms.call("swarm_init", topology="blob")
    with pytest.raises(ToolInputError, match="maxAgents"):
        await swarms.call("swarm_init", topology="mesh", maxAgents=101)
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    with pytest.raises(ToolInputError, match="type"):
        await swarms.call("agent_spawn", type="wizard", swarm_id=swarm_id)
    with pytest.raises(ToolInputError, match="task is empty"):
        await swarms.call("task_orchestrate", task="   ", swarm_id=swarm_id)
    with pytest.raises(ToolInputError, match="maxAgents"):
        await swarms.call("task_orchestrate", task="a", maxAgents=11)
    with pytest.raises(ToolInputError, match="at most one of code, command"):
        await swarms.call("task_orchestrate", task="a", code="1", command="true")
    with pytest.raises(ToolError, match="unknown dependencies"):
        await swarms.call(
            "task_orchestrate", task="a", code="1", dependencies=["task_nope"]
        )
    with pytest.raises(ToolInputError) as caught:
        await swarms.call(
            "task_orchestrate",
            task="a",
            code="1",
            dependencies=["task_a", "task_b", "task_a"],
        )
    assert caught.value.errors[0]["field"] == "dependencies"
    assert "dependencies name ['task_a'] more than once" in caught.value.message
    assert "list each task once" in caught.value.message
    with pytest.raises(ToolError, match="not found"):
        await swarms.call("task_status", task_id="task_missing")
    with pytest.raises(ToolError, match="not found"):
        await swarms.call("swarm_status", swarm_id="doesnotexist")
    with pytest.raises(ToolError, match="above the swarm's maxAgents 8"):
        await swarms.call("swarm_scale", target_agents=9, swarm_id=swarm_id)
    with pytest.raises(ToolInputError, match=r"target_agents: 0 .*swarm_destroy"):
        await swarms.call("swarm_scale", target_agents=0, swarm_id=swarm_id)


async def test_empty_swarm_id_rejected(swarms: Swarms) -> None:
    # Only a missing swarm_id means the newest active swarm; an empty one
    # (an unset shell variable) must not destroy or change that swarm.
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    calls: list[tuple[str, dict[str, Any]]] = [
        ("agent_spawn", {"type": "coder"}),
        ("task_orchestrate", {"task": "x", "command": "true"}),
        ("swarm_status", {}),
        ("swarm_scale", {"target_agents": 2}),
        ("swarm_destroy", {}),
    ]
    for tool, arguments in calls:
        for empty in ("", "  "):
            with pytest.raises(ToolInputError) as caught:
                await swarms.call(tool, swarm_id=empty, **arguments)
            assert caught.value.errors[0]["field"] == "swarm_id"
            assert f"swarm_id: {empty!r} is invalid" in caught.value.message
            assert "swarm_id is empty" in caught.value.message
            assert "leave swarm_id out" in caught.value.message
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert status["status"] == "active"
    assert len(status["agents"]) == 1
    assert status["tasks"] == []


async def test_blank_capabilities_rejected(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"], maxAgents=2)
    for blank in ("", " "):
        with pytest.raises(ToolInputError) as caught:
            await swarms.call(
                "agent_spawn",
                type="coder",
                capabilities=["gpu", blank],
                swarm_id=swarm_id,
            )
        assert caught.value.errors[0]["field"] == "capabilities.1"
        assert f"capabilities.1: {blank!r} is invalid" in caught.value.message
        assert f"capability {blank!r} is empty" in caught.value.message
        with pytest.raises(ToolInputError) as caught:
            await swarms.call(
                "task_orchestrate",
                task="x",
                command="true",
                required_capabilities=[blank],
                swarm_id=swarm_id,
            )
        assert caught.value.errors[0]["field"] == "required_capabilities.0"
        assert f"capability {blank!r} is empty" in caught.value.message
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len(status["agents"]) == 1
    assert status["tasks"] == []


async def test_large_capabilities_rejected(swarms: Swarms) -> None:
    # Capabilities stay in the swarm's state, which must stay below the
    # server's 2 MB payload limit, so both their count and length are capped.
    swarm_id, _ = await swarms.swarm("mesh", ["coder"], maxAgents=2)
    too_many = [f"cap-{index}" for index in range(MAX_CAPABILITIES + 1)]
    too_long = "y" * (MAX_CAPABILITY_CHARS + 1)
    for field, tool, extra in (
        ("capabilities", "agent_spawn", {"type": "coder"}),
        ("required_capabilities", "task_orchestrate", {"task": "x", "command": "true"}),
    ):
        with pytest.raises(ToolInputError) as caught:
            await swarms.call(tool, **{field: too_many}, **extra, swarm_id=swarm_id)
        assert caught.value.errors[0]["field"] == field
        assert f"the list has {MAX_CAPABILITIES + 1} entries" in caught.value.message
        # Too many bad entries give one error, not one per entry.
        with pytest.raises(ToolInputError) as caught:
            await swarms.call(
                tool, **{field: [too_long] * 2000}, **extra, swarm_id=swarm_id
            )
        assert len(caught.value.errors) == 1
        assert "the list has 2000 entries" in caught.value.message
        with pytest.raises(ToolInputError) as caught:
            await swarms.call(tool, **{field: [too_long]}, **extra, swarm_id=swarm_id)
        assert caught.value.errors[0]["field"] == f"{field}.0"
        assert f"has {MAX_CAPABILITY_CHARS + 1} characters" in caught.value.message
    # The swarm's own validators check clients that bypass the tools.
    handle = swarms.client.get_workflow_handle(f"swarm-{swarm_id}")
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await handle.execute_update(
            "spawn_agent",
            SpawnAgentRequest(type="coder", capabilities=[too_long]),
            result_type=AgentState,
        )
    assert "has 101 characters" in str(failed.value.cause)
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len(status["agents"]) == 1
    assert status["tasks"] == []


async def test_nul_bytes_rejected_at_submission(swarms: Swarms) -> None:
    # A NUL byte cannot reach a program's environment, so these could
    # never run: the name is NEXUS_AGENT_NAME and a part is NEXUS_PART.
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    with pytest.raises(ToolInputError, match=r"name 'a\\x00b' contains a NUL byte"):
        await swarms.call("agent_spawn", type="coder", name="a\0b", swarm_id=swarm_id)
    for work in ({"code": "print(1)"}, {"command": "true"}):
        with pytest.raises(ToolInputError, match=r"task 'x\\x00y' contains a NUL"):
            await swarms.call(
                "task_orchestrate", task="x\0y", swarm_id=swarm_id, **work
            )
    for field, work in (("code", "print(1)\0"), ("command", "echo a\0b")):
        with pytest.raises(ToolInputError, match=f"{field} contains a NUL byte"):
            await swarms.call(
                "task_orchestrate", task="x", swarm_id=swarm_id, **{field: work}
            )
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len(status["agents"]) == 1
    assert status["tasks"] == []


async def test_lone_surrogates_rejected(swarms: Swarms) -> None:
    # JSON can carry "\\ud800", which is not valid Unicode text.
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    with pytest.raises(ToolInputError) as caught:
        await swarms.call(
            "task_orchestrate", task="\ud800", code="print(1)", swarm_id=swarm_id
        )
    assert "task: '\ufffd' is invalid: it contains the lone UTF-16 surrogate" in (
        caught.value.message
    )
    assert "'\\ud800' at character 0" in caught.value.message
    assert caught.value.errors[0]["field"] == "task"
    with pytest.raises(ToolInputError, match=r"capabilities\.1: 'b"):
        await swarms.call(
            "agent_spawn",
            type="coder",
            capabilities=["a", "b\udc80"],
            swarm_id=swarm_id,
        )
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len(status["agents"]) == 1
    assert status["tasks"] == []


async def test_validators_reject_direct_updates(swarms: Swarms) -> None:
    """Callers that skip the tools meet the workflow's own validators."""
    swarm_id, _ = await swarms.swarm("mesh", ["coder"], maxAgents=1)
    handle = swarms.client.get_workflow_handle(f"swarm-{swarm_id}")
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update("spawn_agent", SpawnAgentRequest(type="wizard"))
    assert "unknown agent type 'wizard'" in str(caught.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update("spawn_agent", SpawnAgentRequest(type="coder"))
    assert "maxAgents is 1" in str(caught.value.cause)
    empty = TaskSpec(task_id="task_empty", work=TaskWork(kind="llm", task=" "))
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update("submit_task", empty)
    assert "task is empty" in str(caught.value.cause)
    no_action = TaskSpec(
        task_id="task_no_action", work=TaskWork(kind="action", task="x", action="")
    )
    with pytest.raises(WorkflowUpdateFailedError) as caught:
        await handle.execute_update("submit_task", no_action)
    assert "action is empty" in str(caught.value.cause)
    # Rejected updates leave no trace in the state.
    state = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert state["tasks"] == []
    assert len(state["agents"]) == 1


async def test_dependencies_wait(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder", "coder"])
    first = await swarms.call(
        "task_orchestrate", task="slow", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    second = await swarms.call(
        "task_orchestrate",
        task="after",
        code="print('second done')",
        dependencies=[first["task_id"]],
        swarm_id=swarm_id,
    )
    # An agent is free, but the dependency has not finished.
    assert second["status"] == "queued"
    assert second["assigned_agents"] == []
    status = await swarms.call("task_status", task_id=second["task_id"])
    assert status["status"] == "queued"
    assert status["waiting_for"] == [first["task_id"]]
    folder = await agent_folder(swarms, first["assigned_agents"][0])
    await wait_for_file(folder / "started")
    still = await swarms.call("task_status", task_id=second["task_id"])
    assert still["status"] == "queued"
    (folder / "gate").write_text("open")
    results = await swarms.call(
        "task_results", task_id=second["task_id"], wait_seconds=60
    )
    first_results = await swarms.call("task_results", task_id=first["task_id"])
    assert first_results["output"] == "gate opened\n"
    assert results["status"] == "completed"
    assert results["output"] == "second done\n"
    assert results["started_at"] >= first_results["finished_at"]


# Prints what the program got from the tasks it depends on: the variable,
# then the file, then whether both agree.
_READ_DEPENDENCIES = (
    "import json, os\n"
    "inline = json.loads(os.environ['NEXUS_DEPENDENCY_OUTPUTS'])\n"
    "with open(os.environ['NEXUS_DEPENDENCY_OUTPUTS_FILE']) as f:\n"
    "    from_file = json.load(f)\n"
    "print(json.dumps(from_file, sort_keys=True))\n"
    "print(inline == from_file)\n"
)


async def test_dependent_task_reads_dependency_outputs(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder", "coder"])
    first = await swarms.call(
        "task_orchestrate", task="a", code="print('alpha')", swarm_id=swarm_id
    )
    second = await swarms.call(
        "task_orchestrate", task="b", command="echo beta", swarm_id=swarm_id
    )
    third = await swarms.call(
        "task_orchestrate",
        task="combine",
        code=_READ_DEPENDENCIES,
        dependencies=[second["task_id"], first["task_id"]],
        swarm_id=swarm_id,
    )
    results = await swarms.call(
        "task_results", task_id=third["task_id"], wait_seconds=60
    )
    assert results["status"] == "completed", results["error"]
    expected = {first["task_id"]: "alpha\n", second["task_id"]: "beta\n"}
    assert results["output"] == f"{json.dumps(expected, sort_keys=True)}\nTrue\n"


async def test_large_previous_output_goes_to_a_file(swarms: Swarms) -> None:
    # 150,000 characters: execve refuses a variable of 128 KiB or more.
    swarm_id, _ = await swarms.swarm("ring", ["coder", "coder"])
    program = (
        "import os\n"
        "if os.environ['NEXUS_PART'] == 'first':\n"
        "    print('x' * 150000)\n"
        "else:\n"
        "    print('inline' if 'NEXUS_PREVIOUS_OUTPUT' in os.environ else 'file')\n"
        "    with open(os.environ['NEXUS_PREVIOUS_OUTPUT_FILE']) as f:\n"
        "        print(len(f.read()))\n"
    )
    results = await swarms.run_task(
        task="first\nsecond",
        strategy="sequential",
        code=program,
        swarm_id=swarm_id,
    )
    assert results["status"] == "completed", results["error"]
    assert results["output"] == "file\n150001\n"
    # The input files of each call are removed after it.
    folder = await agent_folder(swarms, results["results"][1]["agent_id"])
    assert not list((folder / ".nexus").glob("input-*"))


async def test_large_parallel_outputs_trimmed(
    swarms: Swarms,
) -> None:
    # Five parts of 250,000 bytes: whole, the record would pass the 2 MB
    # that Temporal takes in one payload, and the task could not end.
    swarm_id, _ = await swarms.swarm("mesh", ["coder", "coder"])
    first = await swarms.call(
        "task_orchestrate",
        task="a\nb\nc\nd\ne",
        strategy="parallel",
        code="import os; print(os.environ['NEXUS_PART'] * 250000)",
        swarm_id=swarm_id,
    )
    results = await swarms.call(
        "task_results", task_id=first["task_id"], wait_seconds=120
    )

    assert results["status"] == "completed", results["error"]
    assert len(results["output"].encode()) < 270_000
    assert results["output"].startswith("a" * 250_000 + "\nbbb")
    assert results["output"].endswith(" bytes left out of the task's record]\n")
    assert all(step["trimmed_bytes"] > 0 for step in results["results"])
    # A dependent task receives that kept output.
    reader = await swarms.run_task(
        task="size",
        code=(
            "import json, os\n"
            "with open(os.environ['NEXUS_DEPENDENCY_OUTPUTS_FILE']) as f:\n"
            "    print(len(next(iter(json.load(f).values()))))\n"
        ),
        dependencies=[first["task_id"]],
        swarm_id=swarm_id,
    )
    assert reader["status"] == "completed", reader["error"]
    assert reader["output"] == f"{len(results['output'])}\n"


async def test_broken_chain_keeps_whole_last_output(swarms: Swarms) -> None:
    # Four parts give each step a 196,608-byte share of the record's
    # stdout, so the record of a 250,000-byte step is trimmed. The task's
    # output is capped at 262,144 bytes, so it keeps that output whole.
    swarm_id, _ = await swarms.swarm("ring", ["coder", "coder"])
    results = await swarms.run_task(
        task="first\nsecond\nthird\nfourth",
        strategy="sequential",
        code=(
            "import os, sys\n"
            "if os.environ['NEXUS_PART'] == 'second':\n"
            "    sys.exit(2)\n"
            "sys.stdout.write('x' * 250000)\n"
        ),
        swarm_id=swarm_id,
    )

    assert results["status"] == "failed"
    statuses = [step["status"] for step in results["results"]]
    assert statuses == ["completed", "failed", "skipped", "skipped"]
    assert results["results"][0]["trimmed_bytes"] > 0
    assert results["output"] == "x" * 250_000


async def test_failed_part_left_out_of_parallel_output(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder", "coder"])
    results = await swarms.run_task(
        task="p0\np1\np2",
        strategy="parallel",
        command='echo "$NEXUS_PART"; [ "$NEXUS_PART" != p1 ]',
        swarm_id=swarm_id,
    )
    assert results["status"] == "failed"
    assert results["output"] == "p0\np2\n"
    [failed] = [s for s in results["results"] if s["status"] == "failed"]
    assert failed["stdout"] == "p1\n"


async def test_failed_dependency_fails_dependent(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    first = await swarms.call(
        "task_orchestrate", task="boom", command="exit 1", swarm_id=swarm_id
    )
    second = await swarms.call(
        "task_orchestrate",
        task="after",
        code="print(1)",
        dependencies=[first["task_id"]],
        swarm_id=swarm_id,
    )
    results = await swarms.call(
        "task_results", task_id=second["task_id"], wait_seconds=60
    )
    assert results["status"] == "failed"
    assert first["task_id"] in results["error"]
    assert results["results"] == []


async def test_priority_orders_queued_tasks(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    blocker = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    record = (
        "import os; open('order.log', 'a').write(os.environ['NEXUS_TASK_ID'] + '\\n')"
    )
    submitted = {}
    for priority in ("low", "medium", "critical", "high"):
        task = await swarms.call(
            "task_orchestrate",
            task=priority,
            code=record,
            priority=priority,
            swarm_id=swarm_id,
        )
        assert task["status"] == "queued"
        submitted[task["task_id"]] = priority
    folder = await agent_folder(swarms, agents[0]["agent_id"])
    await wait_for_file(folder / "started")
    (folder / "gate").write_text("open")
    for task_id in submitted:
        await swarms.call("task_results", task_id=task_id, wait_seconds=60)
    await swarms.call("task_results", task_id=blocker["task_id"])
    order = [submitted[t] for t in (folder / "order.log").read_text().split()]
    assert order == ["critical", "high", "medium", "low"]


async def test_capability_match_selects_agent(swarms: Swarms) -> None:
    swarm = await swarms.call("swarm_init", topology="mesh")
    await swarms.call("agent_spawn", type="coder", capabilities=["python"])
    expert = await swarms.call("agent_spawn", type="coder", capabilities=["rust"])
    result = await swarms.run_task(
        task="compile the rust crate", command="echo built", maxAgents=1
    )
    assert [s["agent_id"] for s in result["results"]] == [expert["agent_id"]]
    required = await swarms.run_task(
        task="anything", command="echo ok", required_capabilities=["rust"]
    )
    assert [s["agent_id"] for s in required["results"]] == [expert["agent_id"]]
    assert swarm["swarm_id"] == expert["swarm_id"]


async def test_scale_and_destroy_stop_sandboxes(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder", "coder", "coder"])
    result = await swarms.run_task(
        task="touch", code="print('hi')", maxAgents=3, swarm_id=swarm_id
    )
    sandboxes = sorted({s["sandbox_id"] for s in result["results"]})
    assert len(sandboxes) == 3
    executor = build_executor(swarms.client, swarms.settings)
    scaled = await swarms.call("swarm_scale", target_agents=1, swarm_id=swarm_id)
    assert scaled["agents"] == 1
    assert len(scaled["removed"]) == 2
    assert len(scaled["sandboxes_stopping"]) == 2
    grown = await swarms.call("swarm_scale", target_agents=4, swarm_id=swarm_id)
    assert len(grown["added"]) == 3
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    states = {
        a["sandbox_id"]: a["sandbox_state"] for a in status["agents"] if a["sandbox_id"]
    }
    assert sorted(s for s, v in states.items() if v == "stopped") == sorted(
        scaled["sandboxes_stopping"]
    )
    # Balanced swarms add types in turn, continuing from the spawn count (3).
    assert [a["type"] for a in status["agents"] if a["status"] == "idle"][1:] == [
        "tester",
        "reviewer",
        "coder",
    ]
    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert destroyed["status"] == "destroyed"
    for sandbox_id in sandboxes:
        assert await executor.state(sandbox_id) == "stopped"
        await sandbox_service.wait_ended(swarms.client, sandbox_id)
    # Each stopped session deleted its sandbox's folder when it ended; only
    # the workers' spare sandboxes are left.
    folder = swarms.settings.resolved_data_dir / "sandboxes"
    left = [p.name for p in folder.iterdir() if not p.name.startswith("_spare-")]
    assert left == []
    with pytest.raises(ToolError, match="destroyed"):
        await swarms.call("agent_spawn", type="coder", swarm_id=swarm_id)
    listed = await swarms.call("swarm_list", status="destroyed")
    assert swarm_id in [s["swarm_id"] for s in listed["swarms"]]
    active = await swarms.call("swarm_list")
    assert swarm_id not in [s["swarm_id"] for s in active["swarms"]]


async def test_scale_up_keeps_draining_agents(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm(
        "mesh", ["coder", "coder", "coder"], maxAgents=3
    )
    task = await swarms.call(
        "task_orchestrate",
        task="wait",
        code=GATED_PROGRAM,
        maxAgents=3,
        swarm_id=swarm_id,
    )
    folders = [await agent_folder(swarms, a["agent_id"]) for a in agents]
    for folder in folders:
        await wait_for_file(folder / "started")
    shrunk = await swarms.call("swarm_scale", target_agents=1, swarm_id=swarm_id)
    assert len(shrunk["draining"]) == 2

    # Agents that have not left yet are kept, rather than new ones added
    # next to them past maxAgents.
    grown = await swarms.call("swarm_scale", target_agents=3, swarm_id=swarm_id)
    assert grown["agents"] == 3
    assert grown["added"] == []
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert len([a for a in status["agents"] if a["status"] != "removed"]) == 3
    assert [a["status"] for a in status["agents"]] == ["busy", "busy", "busy"]

    for folder in folders:
        (folder / "gate").touch()
    results = await swarms.call(
        "task_results", task_id=task["task_id"], wait_seconds=60
    )
    assert results["status"] == "completed", results["error"]
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert [a["status"] for a in status["agents"]] == ["idle", "idle", "idle"]


async def test_destroy_cancels_running_task(swarms: Swarms, tmp_path) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    task = await swarms.call(
        "task_orchestrate",
        task="forever",
        code="import time\nwhile True: time.sleep(0.1)",
        swarm_id=swarm_id,
    )
    queued = await swarms.call(
        "task_orchestrate", task="later", code="print(1)", swarm_id=swarm_id
    )
    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert sorted(destroyed["tasks_cancelled"]) == sorted(
        [task["task_id"], queued["task_id"]]
    )
    for task_id in (task["task_id"], queued["task_id"]):
        results = await swarms.call("task_results", task_id=task_id, wait_seconds=60)
        assert results["status"] == "cancelled"


async def test_destroy_after_workflow_terminated(swarms: Swarms) -> None:
    # An operator may terminate the swarm's workflow in the web UI. Its
    # state then still reads active, and only the tools can clean up.
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    agent_id = agents[0]["agent_id"]
    task = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    queued = await swarms.call(
        "task_orchestrate", task="next", code="print('next')", swarm_id=swarm_id
    )
    folder = await agent_folder(swarms, agent_id)
    await wait_for_file(folder / "started")
    await swarms.client.get_workflow_handle(f"swarm-{swarm_id}").terminate("operator")

    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert status["status"] == "terminated"
    # The terminated workflow will never run the queued task.
    never_ran = "the task never ran: its swarm's workflow is terminated"
    records = {t["task_id"]: t for t in status["tasks"]}
    assert records[queued["task_id"]]["status"] == "cancelled"
    assert records[queued["task_id"]]["error"] == never_ran
    assert status["task_counts"] == {"running": 1, "cancelled": 1}
    waited = await swarms.call(
        "task_status", task_id=queued["task_id"], wait_seconds=600
    )
    assert waited["status"] == "cancelled"
    assert waited["error"] == never_ran
    assert waited["waiting_reason"] is None
    with pytest.raises(ToolError) as caught:
        await swarms.call("agent_spawn", type="coder", swarm_id=swarm_id)
    assert caught.value.kind == "conflict"
    assert f"swarm {swarm_id} ended without swarm_destroy" in caught.value.message
    assert "its workflow is terminated" in caught.value.message
    assert "call swarm_destroy" in caught.value.message

    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert destroyed["status"] == "destroyed"
    assert destroyed["agents_removed"] == 1
    assert destroyed["sandboxes_stopped"] == [agent_sandbox_id(agent_id)]
    assert destroyed["tasks_cancelled"] == [task["task_id"], queued["task_id"]]
    results = await swarms.call(
        "task_results", task_id=task["task_id"], wait_seconds=60
    )
    assert results["status"] == "cancelled"
    assert results["error"] == "the swarm was destroyed while the task ran"
    results = await swarms.call("task_results", task_id=queued["task_id"])
    assert results["status"] == "cancelled"
    assert results["error"] == never_ran
    info = await sandbox_service.info(swarms.client, agent_sandbox_id(agent_id))
    assert info.status == "stopped"

    url = swarms.settings.effective_database_url
    [row] = service.list_swarm_rows(url, "destroyed")
    assert row.swarm_id == swarm_id
    assert row.agent_count == 0
    assert service.newest_active_swarm_id(url) is None
    kinds = [e.kind for e in service.list_events(url, swarm_id)]
    assert kinds[-2:] == ["agent_left", "swarm_destroyed"]
    seqs = [e.seq for e in service.list_events(url, swarm_id)]
    assert seqs == list(range(len(seqs)))

    with pytest.raises(ToolError, match=f"swarm {swarm_id} is destroyed"):
        await swarms.call("swarm_destroy", swarm_id=swarm_id)


async def test_terminated_swarm_reads_task_outcomes(swarms: Swarms) -> None:
    # Task workflows outlive their swarm's workflow, so the status tools read
    # what became of the tasks that ran when it was terminated.
    swarm_id, agent_id, task, folder = await start_gated_task(swarms)
    await swarms.client.get_workflow_handle(f"swarm-{swarm_id}").terminate("operator")
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert [t["status"] for t in status["tasks"]] == ["running"]
    assert [a["status"] for a in status["agents"]] == ["busy"]

    (folder / "gate").write_text("open")
    result = await swarms.call("task_results", task_id=task["task_id"], wait_seconds=60)
    assert result["status"] == "completed", result["error"]
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert status["status"] == "terminated"
    [record] = status["tasks"]
    assert record["status"] == "completed"
    assert record["finished_at"] is not None
    [agent] = status["agents"]
    assert agent["status"] == "idle"
    assert agent["current_task_id"] is None
    # The agent got its sandbox in that first task, which its step names.
    assert agent["sandbox_id"] == agent_sandbox_id(agent_id)
    assert agent["sandbox_state"] == "running"
    assert agent["tasks_completed"] == 1

    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert destroyed["tasks_cancelled"] == []
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert status["status"] == "destroyed"
    assert [a["status"] for a in status["agents"]] == ["removed"]
    assert [t["status"] for t in status["tasks"]] == ["completed"]


# Prints its part, but waits at part c until the test writes `gate`.
_GATED_AT_C = (
    'if [ "$NEXUS_PART" = c ]; then touch started; '
    "while [ ! -f gate ]; do sleep 0.05; done; fi; "
    'echo "$NEXUS_PART"'
)


async def _destroy_at_part_c(
    swarms: Swarms, strategy: str, command: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Run a task of parts a to d on one agent, destroy the swarm while the
    agent waits at part c, and return the agent id, the task and its
    results."""
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    task = await swarms.call(
        "task_orchestrate",
        task="a\nb\nc\nd",
        strategy=strategy,
        command=command,
        swarm_id=swarm_id,
    )
    folder = await agent_folder(swarms, agents[0]["agent_id"])
    await wait_for_file(folder / "started")
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    results = await swarms.call(
        "task_results", task_id=task["task_id"], wait_seconds=60
    )
    return agents[0]["agent_id"], task, results


@pytest.mark.parametrize(
    ("strategy", "output"), [("sequential", "b\n"), ("parallel", "a\nb\n")]
)
async def test_destroy_keeps_finished_steps(
    swarms: Swarms, strategy: str, output: str
) -> None:
    agent_id, task, results = await _destroy_at_part_c(swarms, strategy, _GATED_AT_C)
    assert results["status"] == "cancelled"
    assert results["output"] == output
    steps = sorted(results["results"], key=lambda s: s["part_index"])
    assert [s["part"] for s in steps] == ["a", "b", "c", "d"]
    assert [s["status"] for s in steps] == [
        "completed",
        "completed",
        "cancelled",
        "skipped",
    ]
    assert [s["stdout"] for s in steps] == ["a\n", "b\n", None, None]
    assert steps[3]["agent_id"] == agent_id
    assert "cancelled" in steps[3]["error"]
    await replay_run(swarms.client, task_workflow_id(task["task_id"]), all_workflows())


@pytest.mark.parametrize("strategy", ["sequential", "parallel"])
async def test_destroy_keeps_whole_finished_outputs(
    swarms: Swarms, strategy: str
) -> None:
    # Four parts give each step a 196,608-byte share of the record's stdout,
    # so the records of the two finished steps are trimmed. The output
    # comes from the whole outputs, as for a task that was not cancelled.
    command = (
        'if [ "$NEXUS_PART" = c ]; then touch started; '
        "while [ ! -f gate ]; do sleep 0.05; done; fi; "
        "head -c 250000 /dev/zero | tr '\\0' \"$NEXUS_PART\""
    )
    _, _, results = await _destroy_at_part_c(swarms, strategy, command)

    assert results["status"] == "cancelled"
    finished = [s for s in results["results"] if s["status"] == "completed"]
    assert [s["trimmed_bytes"] > 0 for s in finished] == [True, True]
    if strategy == "sequential":
        assert results["output"] == "b" * 250_000
    else:
        assert results["output"].startswith("a" * 250_000 + "\n" + "b" * 12_000)
        assert len(results["output"].encode()) < 262_144 + 100


async def test_task_size_limits(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    with pytest.raises(ToolError) as caught:
        await swarms.call(
            "task_orchestrate", task="x" * 100_001, command="true", swarm_id=swarm_id
        )
    assert "task is 100001 bytes; at most 100000" in caught.value.message
    with pytest.raises(ToolError) as caught:
        await swarms.call(
            "task_orchestrate",
            task="big",
            code=f"DATA = {'z' * 300_000!r}\nprint(len(DATA))",
            swarm_id=swarm_id,
        )
    assert "take 300" in caught.value.message
    assert "at most 262144" in caught.value.message

    # The only agent is busy, so the next tasks queue with their code in
    # the swarm's state, up to its budget.
    gated = await swarms.call(
        "task_orchestrate", task="gate", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    program = f"DATA = {'z' * 250_000!r}\nprint(len(DATA))"
    queued = [
        await swarms.call(
            "task_orchestrate", task=f"q{i}", code=program, swarm_id=swarm_id
        )
        for i in range(4)
    ]
    assert [q["status"] for q in queued] == ["queued"] * 4
    with pytest.raises(ToolError) as caught:
        await swarms.call(
            "task_orchestrate", task="q4", code=program, swarm_id=swarm_id
        )
    assert "tasks that have not started" in caught.value.message
    assert "1048576 bytes allowed" in caught.value.message

    folder = await agent_folder(swarms, agents[0]["agent_id"])
    await wait_for_file(folder / "started")
    (folder / "gate").write_text("open")
    for task in queued:
        results = await swarms.call(
            "task_results", task_id=task["task_id"], wait_seconds=120
        )
        assert results["status"] == "completed", results
        # The agent ran the whole program, which the swarm no longer keeps.
        assert results["output"] == "250000\n"
    handle = swarms.client.get_workflow_handle(f"swarm-{swarm_id}")
    state = await handle.query("status", result_type=SwarmState)
    records = {t.spec.task_id: t for t in state.tasks}
    for task in [gated, *queued]:
        record = records[task["task_id"]]
        assert record.work_trimmed
        assert record.spec.work.code is None
    assert len(state.model_dump_json()) < 20_000
    # A retried submission of a task whose record was trimmed still returns
    # the first record instead of clashing with it.
    spec = TaskSpec(
        task_id=f"retry-{swarm_id}",
        work=TaskWork(kind="code", task="retry", code=program),
    )
    first = await handle.execute_update("submit_task", spec, result_type=TaskRecord)
    results = await swarms.call("task_results", task_id=spec.task_id, wait_seconds=120)
    assert results["output"] == "250000\n"
    again = await handle.execute_update("submit_task", spec, result_type=TaskRecord)
    assert again.seq == first.seq
    assert again.work_trimmed
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


async def _start_lone_task(client: Client, assignment: Assignment | None) -> str:
    """Start a task workflow outside any swarm, with no worker polling yet."""
    task_id = f"lone-{uuid.uuid4().hex[:8]}"
    spec = TaskSpec(
        task_id=task_id, work=TaskWork(kind="code", task="lone", code="print(1)")
    )
    await client.start_workflow(
        SwarmTaskWorkflow.run,
        SwarmTaskInput(swarm_id="lone", spec=spec, assignment=assignment),
        id=task_workflow_id(task_id),
        task_queue=ORCHESTRATION,
    )
    return task_id


async def test_cancel_before_start_reads_cancelled(
    client: Client, swarm_settings: Settings
) -> None:
    # A destroy can cancel a task whose child has not run its first workflow
    # task: the start and the cancel then reach the child together.
    task_id = await _start_lone_task(client, Assignment(topology="mesh"))
    await client.get_workflow_handle(task_workflow_id(task_id)).cancel()
    helper = Swarms(client, swarm_settings)
    async with running_workers(client, swarm_settings, SWARM_QUEUES):
        results = await helper.call("task_results", task_id=task_id, wait_seconds=60)
        assert results["status"] == "cancelled"
        assert results["error"] == "the task was cancelled before it started"
        assert results["finished_at"] is not None
        status = await helper.call("task_status", task_id=task_id)
        assert status["status"] == "cancelled"
    await replay_run(client, task_workflow_id(task_id), all_workflows())


async def test_cancel_before_start_older_replays(
    client: Client,
) -> None:
    # Older code let the cancel end the workflow as cancelled, with no result.
    await replay_saved(client, "swarm_task_cancelled_before_start", all_workflows())


async def test_terminated_task_reads_failed(
    client: Client, swarm_settings: Settings
) -> None:
    task_id = await _start_lone_task(client, None)
    handle = client.get_workflow_handle(task_workflow_id(task_id))
    helper = Swarms(client, swarm_settings)
    async with running_workers(client, swarm_settings, SWARM_QUEUES):
        waiting = await helper.call("task_status", task_id=task_id)
        assert waiting["status"] == "queued"
        await handle.terminate(reason="operator stopped it")
        results = await helper.call("task_results", task_id=task_id, wait_seconds=5)
    assert results["status"] == "failed"
    assert results["error"] == (
        "the task's workflow was terminated: operator stopped it"
    )


async def test_events_and_mirror_on_both_databases(
    client: Client, settings: Settings
) -> None:
    helper = Swarms(client, settings)
    async with running_workers(client, settings, SWARM_QUEUES):
        try:
            swarm_id, agents = await helper.swarm("ring", ["coder", "tester"])
            done = await helper.run_task(task="a", code="print(1)", swarm_id=swarm_id)
            failed = await helper.run_task(
                task="b", command="exit 2", swarm_id=swarm_id
            )
            await helper.call("swarm_scale", target_agents=1, swarm_id=swarm_id)
            await helper.call("swarm_destroy", swarm_id=swarm_id)
        finally:
            await helper.cleanup()
    url = settings.effective_database_url
    events = service.list_events(url, swarm_id)
    kinds = [e.kind for e in events]
    assert kinds[0] == "swarm_started"
    assert kinds.count("agent_joined") == 2
    assert ("task_completed", done["task_id"]) in [(e.kind, e.task_id) for e in events]
    assert ("task_failed", failed["task_id"]) in [(e.kind, e.task_id) for e in events]
    assert kinds.count("task_assigned") == 2
    assert kinds.count("agent_left") == 2
    assert kinds[-1] == "swarm_destroyed"
    assert [e.seq for e in events] == list(range(len(events)))
    [row] = service.list_swarm_rows(url, "all")
    assert row.status == "destroyed"
    assert row.task_count == 2
    assert {a["agent_id"] for a in agents} <= {
        e.agent_id for e in events if e.kind == "agent_joined"
    }


async def test_swarm_workflows_replay(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("hierarchical", ["coordinator", "coder", "coder"])
    result = await swarms.run_task(task="- a\n- b", code="print(1)", swarm_id=swarm_id)
    await swarms.call("swarm_scale", target_agents=2, swarm_id=swarm_id)
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())
    await replay_run(swarms.client, f"swarm-task-{result['task_id']}", all_workflows())


async def test_swarm_replays_run_of_older_code(client: Client) -> None:
    """A swarm recorded before the patched changes (children started at
    submission, assignments by signal, a mirror write per change): tasks
    with a dependency, a failure, a queued task and destroy."""
    await replay_saved(client, "swarm_before_patches", all_workflows())


async def test_swarm_replays_run_with_mirror_activity(client: Client) -> None:
    """A swarm recorded while mirror writes were activities on the
    orchestration queue: dependencies, a failure, queued tasks, a two-part
    task, scale-down and destroy with a running and a queued task."""
    await replay_saved(client, "swarm_before_local_mirror", all_workflows())
    await replay_saved(client, "swarm_before_local_mirror_task", all_workflows())


async def test_swarm_replays_run_with_mirror_patches_after_write(
    client: Client,
) -> None:
    """A swarm recorded while the batching patch was decided after the first
    mirror write: tasks, a dependency, a failure, a two-part task,
    scale-down and destroy with a running task."""
    await replay_saved(client, "swarm_before_mirror_decided_at_start", all_workflows())


def _patch_ids(events: list[Any]) -> list[tuple[int, str]]:
    found = []
    for event in events:
        attributes = event.marker_recorded_event_attributes
        if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED and (
            attributes.marker_name == "core_patch"
        ):
            [payload] = attributes.details["patch-data"].payloads
            found.append((event.event_id, json.loads(payload.data)["id"]))
    return found


async def test_mirror_patch_decided_in_first_workflow_task(swarms: Swarms) -> None:
    """Each run takes its mirror decision in its first workflow task, which a
    replay reaches whatever became of the run's later local activities."""
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    await swarms.run_task(task="a", code="print(1)", swarm_id=swarm_id)
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    handle = swarms.client.get_workflow_handle(f"swarm-{swarm_id}")
    events = list((await handle.fetch_history()).events)
    first_completed = next(
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    second_scheduled = next(
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED
        and e.event_id > first_completed
    )
    patches = _patch_ids(events)
    [decided_at] = [
        event_id
        for event_id, patch_id in patches
        if patch_id == "swarm-mirror-decided-at-start"
    ]
    assert first_completed < decided_at < second_scheduled
    assert {patch_id for _, patch_id in patches}.isdisjoint(
        {"swarm-task-event-batch", "swarm-local-mirror-write"}
    )
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


async def test_swarm_list_starts_empty(swarms: Swarms) -> None:
    ctx: ToolContext = swarms.ctx
    listed = await invoke_tool(ctx, "swarm_list", {"status": "all"})
    assert listed["count"] == 0


async def test_lost_sandbox_shows_live_and_recovers(swarms: Swarms) -> None:
    """swarm_status reads the backend: a sandbox killed behind the session's
    back shows as lost, and the agent's next step recreates it."""
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    first = await swarms.run_task(task="a", code="print('one')", swarm_id=swarm_id)
    sandbox_id = first["results"][0]["sandbox_id"]
    assert sandbox_id == agent_sandbox_id(agents[0]["agent_id"])
    await sandbox_service.discard_backend_sandbox(
        swarms.client, swarms.settings, sandbox_id
    )
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert status["agents"][0]["sandbox_state"] in ("lost", "stopped")
    second = await swarms.run_task(task="b", code="print('two')", swarm_id=swarm_id)
    assert second["status"] == "completed", second["error"]
    assert second["results"][0]["stdout"] == "two\n"
    info = await sandbox_service.info(swarms.client, sandbox_id)
    assert info.recreated == 1
    again = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert again["agents"][0]["sandbox_state"] == "running"


async def test_queued_tasks_start_with_assignment(swarms: Swarms) -> None:
    """A queued task's child starts once it has its agent, so neither side
    sends an assign signal; task_status reads it from the swarm meanwhile."""
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    gate = await swarms.call(
        "task_orchestrate",
        task="hold",
        code="import time; time.sleep(2)",
        swarm_id=swarm_id,
    )
    queued = await swarms.call(
        "task_orchestrate", task="next", code="print('next')", swarm_id=swarm_id
    )
    assert queued["status"] == "queued"
    status = await swarms.call("task_status", task_id=queued["task_id"])
    assert status["status"] == "queued"
    assert status["swarm_id"] == swarm_id
    for task in (gate, queued):
        result = await swarms.call(
            "task_results", task_id=task["task_id"], wait_seconds=60
        )
        assert result["status"] == "completed", result["error"]
    child_events = [
        event.event_type
        async for event in swarms.client.get_workflow_handle(
            queued["workflow_id"]
        ).fetch_history_events()
    ]
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED not in child_events
    parent_events = [
        event.event_type
        async for event in swarms.client.get_workflow_handle(
            f"swarm-{swarm_id}"
        ).fetch_history_events()
    ]
    signal = EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    assert signal not in parent_events


async def test_destroying_swarm_rejects_as_conflict(
    client: Client, swarm_settings: Settings
) -> None:
    # Without a sandbox worker the destroy cannot stop the agent's sandbox,
    # so the swarm stays destroying until the test starts one.
    helper = Swarms(client, swarm_settings)
    try:
        async with running_workers(client, swarm_settings, (ORCHESTRATION,)):
            swarm_id, _ = await helper.swarm("mesh", ["coder"])
            await helper.call(
                "task_orchestrate", task="wait", command="true", swarm_id=swarm_id
            )
            destroy = asyncio.create_task(
                helper.call("swarm_destroy", swarm_id=swarm_id)
            )
            while (await helper.call("swarm_status", swarm_id=swarm_id))[
                "status"
            ] != "destroying":
                await asyncio.sleep(0.05)
            calls: list[tuple[str, dict[str, Any]]] = [
                ("agent_spawn", {"type": "coder"}),
                ("task_orchestrate", {"task": "more", "command": "true"}),
                ("swarm_scale", {"target_agents": 1}),
            ]
            for tool, arguments in calls:
                with pytest.raises(ToolError) as caught:
                    await helper.call(tool, swarm_id=swarm_id, **arguments)
                assert caught.value.kind == "conflict", tool
                assert f"swarm {swarm_id} is destroying" in caught.value.message
            async with running_workers(client, swarm_settings, (SANDBOX,)):
                await destroy
            with pytest.raises(ToolError) as caught:
                await helper.call("agent_spawn", type="coder", swarm_id=swarm_id)
            assert caught.value.kind == "conflict"
            assert f"swarm {swarm_id} is destroyed" in caught.value.message
    finally:
        await helper.cleanup()
