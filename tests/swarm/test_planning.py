"""Agent selection of the swarm planner, without Temporal."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.contracts.swarm import AgentState, TaskSpec, TaskWork
from app.swarm import planning


def _agent(seq: int, kind: str, capabilities: list[str]) -> AgentState:
    return AgentState(
        agent_id=f"agent_{seq}",
        type=kind,
        name=f"{kind}-{seq}",
        capabilities=capabilities,
        joined_at=datetime(2026, 1, 1, tzinfo=UTC),
        seq=seq,
    )


def _shell_task(text: str) -> TaskSpec:
    return TaskSpec(
        task_id="task_1", work=TaskWork(kind="shell", task=text, command="true")
    )


@pytest.mark.parametrize("capability", ["日本語", "ü", "!!", ""])
def test_unnamed_capability_scores_zero(capability: str) -> None:
    # A capability that the task text does not name must not count as named.
    agent = _agent(1, "tester", [capability])
    assert planning.capability_score(agent, _shell_task("count words")) == 0


def test_capability_matched_in_any_script() -> None:
    agent = _agent(1, "tester", ["日本語"])
    assert planning.capability_score(agent, _shell_task("翻訳 日本語 text")) == 1
    assert planning.capability_score(agent, _shell_task("übersetze ins Deutsche")) == 0


def test_unnamed_capability_keeps_type_order() -> None:
    # A coder fits a shell task better than a tester, and the tester's
    # capability is not named in the task.
    coder = _agent(0, "coder", [])
    tester = _agent(1, "tester", ["日本語"])
    [chosen] = planning.select_agents([coder, tester], _shell_task("count words"), 1)
    assert chosen.agent_id == coder.agent_id
