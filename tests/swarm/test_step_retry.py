"""A retried agent step does not run its program a second time."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from app.contracts.swarm import AgentState, AgentStepRequest, TaskWork
from app.sandbox.service import SandboxServiceError
from app.swarm.executor import ExecutionOutput, build_executor
from app.swarm.service import StepFailedError, run_step
from tests.swarm.conftest import Swarms

# Appends a line to a file in the agent's sandbox and prints the line count,
# so the output shows how often the program ran.
COUNT_RUNS = (
    "with open('runs.txt', 'a') as f:\n"
    "    f.write('x\\n')\n"
    "print(len(open('runs.txt').read().splitlines()))\n"
)


def step_request(swarm_id: str, agent_id: str, step: int) -> AgentStepRequest:
    agent = AgentState(
        agent_id=agent_id,
        type="coder",
        name="coder-0",
        joined_at=datetime.now(UTC),
        seq=0,
    )
    return AgentStepRequest(
        swarm_id=swarm_id,
        task_id="task_retried",
        step=step,
        agent=agent,
        work=TaskWork(kind="code", task="count runs", code=COUNT_RUNS),
        part_index=0,
        part_count=1,
        part="count runs",
    )


async def test_retried_step_returns_first_output(swarms: Swarms) -> None:
    swarm_id, spawned = await swarms.swarm("mesh", ["coder"])
    request = step_request(swarm_id, spawned[0]["agent_id"], step=0)
    executor = build_executor(swarms.client, swarms.settings)
    first = await run_step(swarms.settings, executor, swarms.client, request)
    assert (first.stdout, first.exit_code) == ("1\n", 0)
    # As after a worker that died once the program had run: the next attempt
    # sends the same step again.
    retried = await run_step(
        swarms.settings, executor, swarms.client, request, attempt=2
    )
    assert (retried.stdout, retried.exit_code) == ("1\n", 0)
    assert retried.attempt == 2
    following = await run_step(
        swarms.settings,
        executor,
        swarms.client,
        step_request(swarm_id, spawned[0]["agent_id"], step=1),
    )
    assert following.stdout == "2\n"


class FailsFirstCall:
    """An executor whose first call fails, as the repeated id of an earlier
    attempt's failed call returns that failure again."""

    def __init__(self, kind: str = "failed") -> None:
        self.kind = kind
        self.call_ids: list[str | None] = []

    async def ensure_sandbox(self, agent_id: str) -> str:
        return f"sbx_{agent_id}"

    async def run_code(
        self,
        sandbox_id: str,
        language: str,
        code: str,
        *,
        env: Mapping[str, str],
        timeout: float,
        call_id: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> ExecutionOutput:
        self.call_ids.append(call_id)
        if len(self.call_ids) == 1:
            raise SandboxServiceError("sandbox busy, retry later", self.kind)
        return ExecutionOutput(
            stdout="ran\n", stderr="", exit_code=0, timed_out=False, duration_ms=1.0
        )


async def test_retry_after_failed_call_runs_again(swarms: Swarms) -> None:
    executor = FailsFirstCall()
    request = step_request("swarm_x", "agent_1", step=0)
    result = await run_step(
        swarms.settings,
        executor,  # type: ignore[arg-type]
        swarms.client,
        request,
        attempt=3,
    )
    assert result.stdout == "ran\n"
    step_id = "agent-step-task_retried-agent_1-0-0"
    assert executor.call_ids == [step_id, f"{step_id}-attempt-3"]


@pytest.mark.parametrize("kind", ["timed_out", "connection_lost"])
async def test_retry_keeps_call_that_may_still_run(swarms: Swarms, kind: str) -> None:
    # The session may have recorded such a call and run its program later,
    # so a call with a new id could run it a second time: the attempt fails
    # and the next one sends the same id again.
    executor = FailsFirstCall(kind)
    request = step_request("swarm_x", "agent_1", step=0)
    with pytest.raises(StepFailedError) as caught:
        await run_step(
            swarms.settings,
            executor,  # type: ignore[arg-type]
            swarms.client,
            request,
            attempt=3,
        )
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, SandboxServiceError)
    assert caught.value.__cause__.kind == kind
    assert executor.call_ids == ["agent-step-task_retried-agent_1-0-0"]
