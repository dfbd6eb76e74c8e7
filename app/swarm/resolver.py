"""Resolution of a workflow step's `agent` / `agent_type` to a swarm agent,
read from the swarm mirror tables."""

from __future__ import annotations

from sqlmodel import col, select

from app.db import session_scope
from app.settings import Settings
from app.swarm.models import AgentRow, SwarmRow
from app.workflows.agents import AgentResolution

# Agent statuses that can take a step; `removing` agents are draining.
_AVAILABLE = ("idle", "busy")


def _choice_key(agent: AgentRow) -> tuple[int, int, float, str]:
    # Idle before busy, then fewest finished tasks, then oldest, then id, so
    # the same mirror rows always give the same agent.
    return (
        0 if agent.status == "idle" else 1,
        agent.tasks_completed + agent.tasks_failed,
        agent.joined_at.timestamp(),
        agent.agent_id,
    )


def resolve_swarm_agent(
    settings: Settings, agent: str | None, agent_type: str | None
) -> AgentResolution:
    """Pick the swarm agent that runs a step.

    Candidates are agents of active swarms whose status is idle or busy:
    with `agent`, the agent with that id or name, and with `agent_type`,
    agents of that type; with both, both must match. Among the candidates
    the choice is the idle one with the fewest finished tasks, then the
    oldest, then the smallest id.
    """
    with session_scope(settings.effective_database_url) as session:
        query = (
            select(AgentRow)
            .join(SwarmRow, col(SwarmRow.swarm_id) == col(AgentRow.swarm_id))
            .where(SwarmRow.status == "active")
            .where(col(AgentRow.status).in_(_AVAILABLE))
        )
        if agent is not None:
            query = query.where(
                (col(AgentRow.agent_id) == agent) | (col(AgentRow.name) == agent)
            )
        if agent_type is not None:
            query = query.where(AgentRow.type == agent_type)
        candidates = list(session.exec(query).all())
    wanted = " and ".join(
        part
        for part in (
            f"id or name {agent!r}" if agent is not None else "",
            f"type {agent_type!r}" if agent_type is not None else "",
        )
        if part
    )
    if not candidates:
        return AgentResolution(
            reason=(
                f"no agent with {wanted} in an active swarm; spawn one with "
                "agent_spawn, or assign another type with workflow_agent_assign"
            )
        )
    chosen = min(candidates, key=_choice_key)
    return AgentResolution(agent_id=chosen.agent_id, swarm_id=chosen.swarm_id)


def find_agent(settings: Settings, agent_id: str) -> tuple[AgentRow, SwarmRow] | None:
    """Return a mirrored agent and its swarm, or None when the id is unknown."""
    with session_scope(settings.effective_database_url) as session:
        agent = session.get(AgentRow, agent_id)
        if agent is None:
            return None
        swarm = session.get(SwarmRow, agent.swarm_id)
        if swarm is None:
            return None
        session.expunge(agent)
        session.expunge(swarm)
        return agent, swarm
