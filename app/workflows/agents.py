"""Resolution of a step's `agent` / `agent_type` to a swarm agent.

The default resolver reads the swarm mirror tables (`app.swarm.resolver`);
`set_agent_resolver` replaces it, for a build without swarms or a test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.settings import Settings


@dataclass(frozen=True)
class AgentResolution:
    """The agent chosen for a step, or why none was.

    Attributes:
        agent_id: the swarm agent, None when unresolved.
        swarm_id: that agent's swarm.
        reason: why nothing matched, set when agent_id is None.
    """

    agent_id: str | None = None
    swarm_id: str | None = None
    reason: str | None = None


# (settings, agent, agent_type) -> the resolution.
AgentResolver = Callable[[Settings, str | None, str | None], AgentResolution]


def _swarm_mirror(
    settings: Settings, agent: str | None, agent_type: str | None
) -> AgentResolution:
    # Imported here because app.swarm.resolver imports this module.
    from app.swarm.resolver import resolve_swarm_agent

    return resolve_swarm_agent(settings, agent, agent_type)


_resolver: AgentResolver = _swarm_mirror


def set_agent_resolver(resolver: AgentResolver) -> None:
    global _resolver
    _resolver = resolver


def resolve_agent(
    settings: Settings, agent: str | None, agent_type: str | None
) -> AgentResolution:
    """Return the swarm agent that should run a step, or why there is none."""
    if agent is None and agent_type is None:
        return AgentResolution(reason="the step names no agent or agent_type")
    return _resolver(settings, agent, agent_type)
