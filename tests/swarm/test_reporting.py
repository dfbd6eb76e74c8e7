"""What swarm tools report about queued, running and cancelled tasks and
their agents' sandboxes."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.contracts.swarm import (
    DESTROYED_WHILE_RUNNING,
    MAX_STEP_PART_CHARS,
    MAX_STEPS_TEXT_BYTES,
    MAX_TASK_OUTPUT_BYTES,
    StepResult,
    StopSandboxesRequest,
    TaskSpec,
    TaskWork,
    task_workflow_id,
)
from app.sandbox import service as sandbox_service
from app.settings import Settings
from app.swarm import planning
from app.swarm.executor import agent_sandbox_id, build_executor
from app.tools import ToolError, ToolInputError
from tests.support.replay import replay_run
from tests.swarm.conftest import (
    GATED_PROGRAM,
    TICKING_PROGRAM,
    Swarms,
    agent_folder,
    start_gated_task,
    wait_for_file,
    wait_until_still,
)
from workers.registry import all_workflows


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_queued_submission_time_and_first_sandbox(
    swarms: Swarms,
) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    agent_id = agents[0]["agent_id"]
    blocker = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    queued = await swarms.call(
        "task_orchestrate", task="next", code="print('next')", swarm_id=swarm_id
    )
    folder = await agent_folder(swarms, agent_id)
    await wait_for_file(folder / "started")
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    # The agent is in its first task, whose sandbox runs the program now.
    [agent] = status["agents"]
    assert agent["current_task_id"] == blocker["task_id"]
    assert agent["sandbox_id"] == agent_sandbox_id(agent_id)
    assert agent["sandbox_state"] == "running"
    submitted = {t["task_id"]: t["submitted_at"] for t in status["tasks"]}
    (folder / "gate").write_text("open")
    result = await swarms.call(
        "task_results", task_id=queued["task_id"], wait_seconds=60
    )
    assert result["status"] == "completed", result["error"]
    assert _time(result["submitted_at"]) == _time(submitted[queued["task_id"]])
    assert _time(result["submitted_at"]) < _time(result["started_at"])


async def test_destroy_counts_and_cancelled_steps(
    swarms: Swarms,
) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder", "coder"])
    scaled = await swarms.call("swarm_scale", target_agents=1, swarm_id=swarm_id)
    assert scaled["removed"] == [agents[1]["agent_id"]]
    remaining = agents[0]["agent_id"]
    task = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    folder = await agent_folder(swarms, remaining)
    await wait_for_file(folder / "started")
    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert destroyed["agents_removed"] == 1
    # The agent's first task had not reported its sandbox, which stops anyway.
    assert destroyed["sandboxes_stopped"] == [agent_sandbox_id(remaining)]
    executor = build_executor(swarms.client, swarms.settings)
    assert await executor.state(agent_sandbox_id(remaining)) == "stopped"
    result = await swarms.call("task_results", task_id=task["task_id"], wait_seconds=60)
    assert result["status"] == "cancelled"
    [step] = result["results"]
    assert step["status"] == "cancelled"
    assert step["finished_at"] is not None
    assert step["error"] == "the task was cancelled while the step ran"
    assert step["sandbox_id"] == agent_sandbox_id(remaining)
    # The task's own result and its swarm's record give the same reason.
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    [record] = status["tasks"]
    assert result["error"] == record["error"] == DESTROYED_WHILE_RUNNING


async def _running_step_agent(swarms: Swarms, task_id: str) -> str:
    """Wait until a step of the task runs, and return its agent's id."""
    for _ in range(600):
        status = await swarms.call("task_status", task_id=task_id)
        if status["running"]:
            return str(status["running"][0])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no step of task {task_id} started")


@pytest.mark.parametrize("topology", ["star", "hierarchical"])
async def test_destroy_skips_hub_without_sandbox(swarms: Swarms, topology: str) -> None:
    # Agent 0 of a star or hierarchical task only hands parts out and
    # collects them, so it never gets a sandbox, even in its first task.
    swarm_id, agents = await swarms.swarm(topology, ["coordinator", "coder"])
    task = await swarms.call(
        "task_orchestrate",
        task="block",
        code=GATED_PROGRAM,
        maxAgents=2,
        swarm_id=swarm_id,
    )
    worker = await _running_step_agent(swarms, task["task_id"])
    [hub] = [a["agent_id"] for a in agents if a["agent_id"] != worker]
    folder = await agent_folder(swarms, worker)
    await wait_for_file(folder / "started")
    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert destroyed["agents_removed"] == 2
    assert destroyed["sandboxes_stopped"] == [agent_sandbox_id(worker)]
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    sandboxes = {a["agent_id"]: a["sandbox_id"] for a in status["agents"]}
    assert sandboxes[hub] is None
    assert sandboxes[worker] == agent_sandbox_id(worker)
    executor = build_executor(swarms.client, swarms.settings)
    assert await executor.state(agent_sandbox_id(hub)) == "not_created"
    assert await executor.state(agent_sandbox_id(worker)) == "stopped"
    result = await swarms.call("task_results", task_id=task["task_id"], wait_seconds=60)
    assert result["status"] == "cancelled"
    assert [s["agent_id"] for s in result["results"]] == [worker]
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


async def _cancel_first_task_outside(swarms: Swarms) -> tuple[str, str, str]:
    """Start a one-agent swarm whose first task runs a gated program, and
    cancel that task's workflow through the SDK, as an operator would.
    Return the swarm id, the agent id and the task id."""
    swarm_id, agent_id, task, _ = await start_gated_task(swarms)
    handle = swarms.client.get_workflow_handle(task_workflow_id(task["task_id"]))
    await handle.cancel(reason="stopped by an operator")
    return swarm_id, agent_id, task["task_id"]


async def test_task_cancelled_outside_swarm_frees_its_agent(
    swarms: Swarms,
) -> None:
    # A cancel from the web UI or `temporal workflow cancel` reaches only the
    # task's workflow; the swarm must still hear of it and free the agent.
    swarm_id, _, task_id = await _cancel_first_task_outside(swarms)
    result = await swarms.call("task_results", task_id=task_id, wait_seconds=60)
    assert result["status"] == "cancelled"
    assert result["error"] == "stopped by an operator"
    after = await swarms.call(
        "task_orchestrate", task="next", code="print('next')", swarm_id=swarm_id
    )
    done = await swarms.call("task_results", task_id=after["task_id"], wait_seconds=60)
    assert done["status"] == "completed", done["error"]
    assert done["output"] == "next\n"
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    records = {t["task_id"]: t for t in status["tasks"]}
    assert records[task_id]["status"] == "cancelled"
    assert records[task_id]["error"] == "stopped by an operator"
    [agent] = status["agents"]
    assert agent["status"] == "idle"
    assert agent["tasks_completed"] == 1
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())
    await replay_run(swarms.client, task_workflow_id(task_id), all_workflows())


async def test_destroy_after_outside_cancel_stops_sandbox(
    swarms: Swarms,
) -> None:
    # The agent's first task is cancelled before its step reports the
    # sandbox, which was created and still runs the program.
    swarm_id, agent_id, task_id = await _cancel_first_task_outside(swarms)
    result = await swarms.call("task_results", task_id=task_id, wait_seconds=60)
    assert result["status"] == "cancelled"
    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    [agent] = status["agents"]
    assert agent["status"] == "idle"
    assert agent["sandbox_id"] == agent_sandbox_id(agent_id)
    assert agent["sandbox_state"] == "running"
    destroyed = await swarms.call("swarm_destroy", swarm_id=swarm_id)
    assert destroyed["sandboxes_stopped"] == [agent_sandbox_id(agent_id)]
    executor = build_executor(swarms.client, swarms.settings)
    assert await executor.state(agent_sandbox_id(agent_id)) == "stopped"
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


async def test_interrupted_step_fails_without_retry(swarms: Swarms) -> None:
    # An operator who interrupts a step's call wants the program stopped, not
    # started again by a retry.
    swarm_id, agent_id, task, folder = await start_gated_task(swarms)
    call_id = f"agent-step-{task['task_id']}-{agent_id}-0-0"
    await sandbox_service.interrupt(swarms.client, agent_sandbox_id(agent_id), call_id)
    result = await swarms.call("task_results", task_id=task["task_id"], wait_seconds=60)
    assert result["status"] == "failed"
    [step] = result["results"]
    assert "was interrupted, and its program was stopped" in step["error"]
    assert step["attempt"] == 1
    assert (folder / "attempts").read_text() == "x"
    await swarms.call("swarm_destroy", swarm_id=swarm_id)


async def test_terminated_task_frees_its_agent(swarms: Swarms) -> None:
    # A terminate (web UI, `temporal workflow terminate`) lets the task's
    # workflow report nothing, so the swarm learns of it from the close.
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    task = await swarms.call(
        "task_orchestrate", task="block", code=GATED_PROGRAM, swarm_id=swarm_id
    )
    queued = await swarms.call(
        "task_orchestrate", task="next", code="print('next')", swarm_id=swarm_id
    )
    folder = await agent_folder(swarms, agents[0]["agent_id"])
    await wait_for_file(folder / "started")
    handle = swarms.client.get_workflow_handle(task_workflow_id(task["task_id"]))
    await handle.terminate(reason="operator")
    done = await swarms.call("task_results", task_id=queued["task_id"], wait_seconds=60)
    assert done["status"] == "completed", done["error"]

    status = await swarms.call("swarm_status", swarm_id=swarm_id)
    records = {t["task_id"]: t for t in status["tasks"]}
    assert records[task["task_id"]]["status"] == "failed"
    assert records[task["task_id"]]["error"] == "the task's workflow was terminated"
    [agent] = status["agents"]
    assert agent["status"] == "idle"
    assert agent["tasks_failed"] == 1
    progress = await swarms.call("task_status", task_id=task["task_id"])
    assert progress["status"] == "failed"
    assert progress["running"] == []
    result = await swarms.call("task_results", task_id=task["task_id"])
    assert result["error"] == "the task's workflow was terminated: operator"
    [step] = result["results"]
    assert step["status"] == "cancelled"
    assert step["error"] == "the task's workflow ended while the step ran"
    assert step["finished_at"] is not None
    await swarms.call("swarm_destroy", swarm_id=swarm_id)
    await replay_run(swarms.client, f"swarm-{swarm_id}", all_workflows())


# Prints its part, but waits at part b until the test writes `gate`.
_GATED_AT_B = (
    'if [ "$NEXUS_PART" = b ]; then touch started; '
    "while [ ! -f gate ]; do sleep 0.05; done; fi; "
    'echo "$NEXUS_PART"'
)


async def test_terminated_sequential_task_keeps_steps(swarms: Swarms) -> None:
    # A terminate ends the workflow with no result, yet the task's result
    # keeps what it did, as a cancelled task's does.
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    agent_id = agents[0]["agent_id"]
    task = await swarms.call(
        "task_orchestrate",
        task="a\nb\nc",
        strategy="sequential",
        command=_GATED_AT_B,
        swarm_id=swarm_id,
    )
    folder = await agent_folder(swarms, agent_id)
    await wait_for_file(folder / "started")
    handle = swarms.client.get_workflow_handle(task_workflow_id(task["task_id"]))
    await handle.terminate(reason="operator")

    result = await swarms.call("task_results", task_id=task["task_id"])
    assert result["status"] == "failed"
    assert result["error"] == "the task's workflow was terminated: operator"
    assert result["output"] == "a\n"
    assert result["finished_at"] is not None
    steps = sorted(result["results"], key=lambda s: s["part_index"])
    assert [s["part"] for s in steps] == ["a", "b", "c"]
    assert [s["status"] for s in steps] == ["completed", "cancelled", "skipped"]
    assert [s["stdout"] for s in steps] == ["a\n", None, None]
    assert steps[1]["error"] == "the task's workflow ended while the step ran"
    assert steps[1]["sandbox_id"] == agent_sandbox_id(agent_id)
    assert steps[1]["finished_at"] == result["finished_at"]
    assert steps[2]["agent_id"] == agent_id
    assert steps[2]["error"] == (
        "not run: the task's workflow ended before this part started"
    )
    progress = await swarms.call("task_status", task_id=task["task_id"])
    assert progress["status"] == "failed"
    assert progress["steps_completed"] == 1
    assert progress["running"] == []
    await swarms.call("swarm_destroy", swarm_id=swarm_id)


async def test_outside_cancel_stops_the_program(swarms: Swarms) -> None:
    swarm_id, agents = await swarms.swarm("mesh", ["coder"])
    task = await swarms.call(
        "task_orchestrate",
        task="tick",
        code=TICKING_PROGRAM,
        timeout=600,
        swarm_id=swarm_id,
    )
    folder = await agent_folder(swarms, agents[0]["agent_id"])
    await wait_for_file(folder / "ticks")
    handle = swarms.client.get_workflow_handle(task_workflow_id(task["task_id"]))
    await handle.cancel(reason="stopped by an operator")
    # The session takes the interrupt at its workflow task's heartbeat.
    await wait_until_still(folder / "ticks", timeout=40)
    result = await swarms.call("task_results", task_id=task["task_id"], wait_seconds=60)
    assert result["status"] == "cancelled"
    info = await swarms.call(
        "sandbox_status", sandbox_id=agent_sandbox_id(agents[0]["agent_id"])
    )
    assert info["status"] == "running"
    assert "interrupted" in [event["kind"] for event in info["events"]]
    after = await swarms.call(
        "task_orchestrate", task="next", code="print('next')", swarm_id=swarm_id
    )
    done = await swarms.call("task_results", task_id=after["task_id"], wait_seconds=60)
    assert done["status"] == "completed", done["error"]
    await swarms.call("swarm_destroy", swarm_id=swarm_id)


class _GatheringExecutor:
    """Executor whose stops complete only once every stop is requested, so
    stopping sandboxes one at a time never finishes."""

    backend = "fake"

    def __init__(self, count: int) -> None:
        self.requested: list[str] = []
        self.count = count
        self.all_requested = asyncio.Event()

    async def stop(self, sandbox_id: str) -> bool:
        self.requested.append(sandbox_id)
        if len(self.requested) == self.count:
            self.all_requested.set()
        await self.all_requested.wait()
        return sandbox_id not in ("sbx_gone", "sbx_never")

    async def state(self, sandbox_id: str) -> str:
        return "not_created" if sandbox_id == "sbx_never" else "stopped"


async def test_stop_agent_sandboxes_stops_them_at_once(swarms: Swarms) -> None:
    from activities.swarm import SwarmActivities

    activities = SwarmActivities(swarms.settings)
    ids = ["sbx_a", "sbx_b", "sbx_gone", "sbx_c", "sbx_never"]
    fake = _GatheringExecutor(len(ids))
    activities.executor = fake  # type: ignore[assignment]
    result = await asyncio.wait_for(
        activities.stop_agent_sandboxes(StopSandboxesRequest(sandbox_ids=ids)), 30
    )
    assert result.stopped == ["sbx_a", "sbx_b", "sbx_c"]
    assert result.already_stopped == ["sbx_gone"]
    assert result.absent == ["sbx_never"]


async def test_ignored_arguments_and_bad_names(swarms: Swarms) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    for action_args in ({"a": 1}, {}):
        with pytest.raises(ToolInputError, match="action_args are given without"):
            await swarms.call(
                "task_orchestrate",
                task="x",
                action_args=action_args,
                swarm_id=swarm_id,
            )
    with pytest.raises(ToolInputError, match="language 'bash' is given without code"):
        await swarms.call(
            "task_orchestrate", task="x", language="bash", swarm_id=swarm_id
        )
    with pytest.raises(ToolInputError, match="name is empty"):
        await swarms.call("agent_spawn", type="coder", name=" ", swarm_id=swarm_id)
    with pytest.raises(ToolError, match="agent name 'coder-0' is taken"):
        await swarms.call(
            "agent_spawn", type="tester", name="coder-0", swarm_id=swarm_id
        )
    spawns = await asyncio.gather(
        *(
            swarms.call("agent_spawn", type="coder", name="dup", swarm_id=swarm_id)
            for _ in range(3)
        ),
        return_exceptions=True,
    )
    assert len([s for s in spawns if isinstance(s, dict)]) == 1
    assert all("is taken" in str(s) for s in spawns if not isinstance(s, dict))


async def test_unmatched_capability_rejected_or_explained(swarms: Swarms) -> None:
    full, _ = await swarms.swarm("mesh", ["coder"], maxAgents=1)
    with pytest.raises(ToolError, match=r"required_capabilities \['gpu'\]"):
        await swarms.call(
            "task_orchestrate",
            task="gpu job",
            command="echo x",
            required_capabilities=["gpu"],
            swarm_id=full,
        )
    room, _ = await swarms.swarm("mesh", ["coder"], maxAgents=2)
    task = await swarms.call(
        "task_orchestrate",
        task="gpu job",
        command="echo x",
        required_capabilities=["gpu"],
        swarm_id=room,
    )
    status = await swarms.call("task_status", task_id=task["task_id"])
    assert status["status"] == "queued"
    assert "has the required_capabilities ['gpu']" in status["waiting_reason"]
    assert status["waiting_reason"].endswith(
        "spawn one with agent_spawn and those capabilities"
    )
    # Once the swarm is full, an agent must leave before one can be spawned.
    await swarms.call("agent_spawn", type="tester", swarm_id=room)
    status = await swarms.call("task_status", task_id=task["task_id"])
    assert (
        "has maxAgents 2 agents, so remove one with swarm_scale"
        in (status["waiting_reason"])
    )


def test_adaptive_reason_single_part() -> None:
    spec = TaskSpec(task_id="t", work=TaskWork(kind="shell", task="x", command="x"))
    assert planning.choose_strategy(spec, ["x"], 1) == (
        "sequential",
        "the task has 1 part",
    )
    assert planning.choose_strategy(spec, ["a", "b"], 1)[1] == (
        "2 parts and only 1 working agent"
    )


@pytest.mark.parametrize(
    ("outputs", "joined"),
    [
        (["a\n"], "a\n"),
        (["a"], "a"),
        (["a\n", "b\n"], "a\nb\n"),
        (["a", "b"], "a\nb"),
        (["a\n\n", "", "c"], "a\n\nc"),
        (["", "a", "", "b"], "a\nb"),
        (["", ""], ""),
        ([], ""),
    ],
)
def test_part_outputs_join_on_lines_of_their_own(
    outputs: list[str], joined: str
) -> None:
    # A one-part task keeps its output as it is, whichever strategy ran it.
    # More parts each start on a line of their own, and empty ones add nothing.
    assert planning.join_outputs(outputs) == joined


def test_record_keeps_steps_within_budget() -> None:
    step = StepResult(
        step=0,
        agent_id="agent_1",
        agent_name="coder-1",
        agent_type="coder",
        part_index=0,
        part="ü" * 5_000,
        kind="code",
        status="completed",
        stdout="é" * 400_000,
        stderr="e" * 10,
    )
    kept = planning.trimmed_step(step, part_count=4)
    share = MAX_STEPS_TEXT_BYTES // 4
    assert kept.stdout is not None
    assert kept.stdout.endswith(" bytes left out of the task's record]\n")
    kept_bytes = len(kept.stdout.split("\n[")[0].encode())
    # Stdout keeps the share less what stderr takes.
    assert share - 10 - 1 <= kept_bytes <= share - 10
    assert kept.stderr == "e" * 10
    assert kept.part == "ü" * MAX_STEP_PART_CHARS + "…"
    # The part's cut counts bytes too: "ü" takes 2 in UTF-8.
    dropped = 800_000 - kept_bytes + 2 * (5_000 - MAX_STEP_PART_CHARS)
    assert kept.trimmed_bytes == dropped
    # Small steps are kept as they are.
    assert (
        planning.trimmed_step(kept.model_copy(update={"stdout": "x"}), 4).stdout == "x"
    )
    output = planning.trimmed_output("o" * (MAX_TASK_OUTPUT_BYTES + 10))
    assert output.startswith("o" * MAX_TASK_OUTPUT_BYTES + "\n[10 bytes left out")


def _step_with_output(stdout: str, stderr: str) -> StepResult:
    return StepResult(
        step=0,
        agent_id="agent_1",
        agent_name="coder-1",
        agent_type="coder",
        part_index=0,
        part="a",
        kind="code",
        status="completed",
        stdout=stdout,
        stderr=stderr,
    )


def _kept_bytes(text: str | None) -> int:
    assert text is not None
    return len(text.split("\n[")[0].encode())


def test_record_stdout_takes_unused_stderr_share() -> None:
    share = MAX_STEPS_TEXT_BYTES // 4
    step = _step_with_output("a" * 150_000, "")
    assert share * 3 // 4 < 150_000 < share
    kept = planning.trimmed_step(step, part_count=4)
    assert kept.stdout == "a" * 150_000
    assert kept.trimmed_bytes == 0
    # Stdout gets the whole share when stderr is empty.
    kept = planning.trimmed_step(_step_with_output("a" * 400_000, ""), 4)
    assert _kept_bytes(kept.stdout) == share
    assert kept.trimmed_bytes == 400_000 - share


def test_record_stderr_takes_unused_stdout_share() -> None:
    share = MAX_STEPS_TEXT_BYTES // 4
    kept = planning.trimmed_step(_step_with_output("o" * 100, "e" * 400_000), 4)
    assert kept.stdout == "o" * 100
    assert _kept_bytes(kept.stderr) == share - 100


def test_record_splits_share_when_both_long() -> None:
    share = MAX_STEPS_TEXT_BYTES // 4
    kept = planning.trimmed_step(
        _step_with_output("o" * 400_000, "e" * 400_000), part_count=4
    )
    assert _kept_bytes(kept.stdout) == share * 3 // 4
    assert _kept_bytes(kept.stderr) == share // 4
    assert kept.trimmed_bytes == 800_000 - share


@pytest.mark.parametrize("topology", ["ring", "mesh"])
async def test_sequential_failure_skips_rest(swarms: Swarms, topology: str) -> None:
    swarm_id, agents = await swarms.swarm(topology, ["coder", "tester"])
    result = await swarms.run_task(
        task="1. ok\n2. bad\n3. after",
        command='[ "$NEXUS_PART" = bad ] && exit 5; echo "$NEXUS_PART"',
        strategy="sequential",
        swarm_id=swarm_id,
    )
    assert result["status"] == "failed"
    steps = result["results"]
    assert [(s["part"], s["status"]) for s in steps] == [
        ("ok", "completed"),
        ("bad", "failed"),
        ("after", "skipped"),
    ]
    assert steps[2]["error"] == "not run: step 1 (part 1) failed before it"
    assert steps[2]["agent_id"] == agents[0]["agent_id"]
    assert result["output"] == "ok\n"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"code": ""}, "code is empty ('')"),
        ({"code": "   "}, "code is empty ('   ')"),
        ({"code": "", "language": "bash"}, "code is empty ('')"),
        ({"command": ""}, "command is empty ('')"),
        ({"action": ""}, "action is empty ('')"),
    ],
)
async def test_empty_work_is_rejected(
    swarms: Swarms, arguments: dict[str, str], message: str
) -> None:
    swarm_id, _ = await swarms.swarm("mesh", ["coder"])
    with pytest.raises(ToolInputError) as caught:
        await swarms.call("task_orchestrate", task="x", swarm_id=swarm_id, **arguments)
    assert message in caught.value.message
    assert "or leave" in caught.value.message
    state = await swarms.call("swarm_status", swarm_id=swarm_id)
    assert state["tasks"] == []


def test_cli_empty_code_is_rejected(swarm_settings: Settings) -> None:
    environment = {
        "NEXUS_DATA_DIR": str(swarm_settings.data_dir),
        "NEXUS_DATABASE_URL": swarm_settings.effective_database_url,
        "NEXUS_TEMPORAL_ADDRESS": swarm_settings.effective_temporal_address,
    }
    result = CliRunner().invoke(
        cli, ["swarm", "task", "x", "--code", ""], env=environment
    )
    assert result.exit_code == 1
    assert "code is empty ('')" in result.output


def test_cut_of_sandbox_cut_output_counts_both() -> None:
    output = "x" * 300 + "\n[output truncated: 37856 bytes dropped]"
    kept, dropped = planning.cut_text(output, 200)
    assert dropped == len(output) - 200
    assert kept == (
        "x" * 200 + f"\n[{dropped} bytes left out of the task's record, and 37856 "
        "bytes before that by the sandbox's output limit]\n"
    )
    # Output that the sandbox did not cut names only the record's cut.
    plain, _ = planning.cut_text("y" * 300, 200)
    assert plain.endswith("\n[100 bytes left out of the task's record]\n")
