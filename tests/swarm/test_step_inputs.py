"""What a step receives: the previous output and its task's dependency
outputs, in the environment, in files and in the LLM prompt."""

from __future__ import annotations

import pytest

from app.contracts.swarm import MAX_STEP_INPUT_BYTES
from app.swarm.service import (
    INLINE_INPUT_BYTES,
    StepFailedError,
    dependency_outputs,
    llm_prompt,
    step_env,
    step_input_files,
)
from tests.swarm.conftest import Swarms
from tests.swarm.test_step_retry import step_request


def test_small_inputs_are_inline_and_in_files() -> None:
    request = step_request("swarm_x", "agent_1", step=1).model_copy(
        update={"previous_output": "prev\n", "dependencies": ["task_a"]}
    )
    outputs = {"task_a": "a\n"}
    env = step_env(request, outputs)
    assert env["NEXUS_PREVIOUS_OUTPUT"] == "prev\n"
    assert env["NEXUS_DEPENDENCY_OUTPUTS"] == '{"task_a": "a\\n"}'
    assert step_input_files(request, outputs) == {
        "NEXUS_PREVIOUS_OUTPUT_FILE": "prev\n",
        "NEXUS_DEPENDENCY_OUTPUTS_FILE": '{"task_a": "a\\n"}',
    }


def test_large_inputs_are_only_in_files() -> None:
    large = "é" * (INLINE_INPUT_BYTES // 2 + 1)  # two bytes each in UTF-8
    request = step_request("swarm_x", "agent_1", step=1).model_copy(
        update={"previous_output": large, "dependencies": ["task_a"]}
    )
    env = step_env(request, {"task_a": large})
    assert "NEXUS_PREVIOUS_OUTPUT" not in env
    assert "NEXUS_DEPENDENCY_OUTPUTS" not in env
    files = step_input_files(request, {"task_a": large})
    assert files["NEXUS_PREVIOUS_OUTPUT_FILE"] == large


def test_first_step_without_dependencies_gets_no_files() -> None:
    request = step_request("swarm_x", "agent_1", step=0)
    env = step_env(request, {})
    assert env["NEXUS_PREVIOUS_OUTPUT"] == ""
    assert "NEXUS_DEPENDENCY_OUTPUTS" not in env
    assert step_input_files(request, {}) == {}


def test_prompt_holds_dependency_outputs() -> None:
    request = step_request("swarm_x", "agent_1", step=0)
    prompt = llm_prompt(request, {"task_a": "alpha", "task_b": "beta"})
    assert prompt == (
        "Task: count runs\n\n"
        "Output of task task_a, which this task depends on:\nalpha\n\n"
        "Output of task task_b, which this task depends on:\nbeta"
    )


async def test_unknown_dependency_fails_the_step(swarms: Swarms) -> None:
    request = step_request("swarm_x", "agent_1", step=0).model_copy(
        update={"dependencies": ["task_swarm_x_00000000"]}
    )
    with pytest.raises(StepFailedError) as caught:
        await dependency_outputs(swarms.client, request)
    assert "task_swarm_x_00000000" in str(caught.value)
    assert not caught.value.retryable


def test_nul_byte_goes_only_to_the_file() -> None:
    request = step_request("swarm_x", "agent_1", step=1).model_copy(
        update={"previous_output": "x\0y\n"}
    )
    assert "NEXUS_PREVIOUS_OUTPUT" not in step_env(request, {})
    assert step_input_files(request, {}) == {"NEXUS_PREVIOUS_OUTPUT_FILE": "x\0y\n"}


def test_inputs_over_the_limit_fail_the_step() -> None:
    half = "z" * (MAX_STEP_INPUT_BYTES // 2)
    request = step_request("swarm_x", "agent_1", step=1).model_copy(
        update={"previous_output": half, "dependencies": ["task_a"]}
    )
    with pytest.raises(StepFailedError, match="over the 1048576 bytes"):
        step_input_files(request, {"task_a": half})
