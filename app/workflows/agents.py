"""Resolution of a step's `agent` / `agent_type` to a swarm agent.

The swarms capability installs its resolver with `set_agent_resolver`; until
then a step's requested agent is recorded and left unresolved (agent_id None).
"""

from __future__ import annotations

from collections.abc import Callable

from app.settings import Settings

# (settings, agent, agent_type) -> agent id, or None when nothing matches.
AgentResolver = Callable[[Settings, str | None, str | None], str | None]


def _no_swarms(settings: Settings, agent: str | None, agent_type: str | None) -> None:
    return None


_resolver: AgentResolver = _no_swarms


def set_agent_resolver(resolver: AgentResolver) -> None:
    global _resolver
    _resolver = resolver


def resolve_agent(
    settings: Settings, agent: str | None, agent_type: str | None
) -> str | None:
    """Return the id of the swarm agent that should run a step, if any."""
    if agent is None and agent_type is None:
        return None
    return _resolver(settings, agent, agent_type)
