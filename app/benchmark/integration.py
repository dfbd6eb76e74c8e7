"""Parts of phases that reach into a capability beyond its tools: losing a
sandbox from outside, waiting for training, the streaming load, and the
cross-system checks."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from app.settings import Settings

if TYPE_CHECKING:
    from app.benchmark.phases import PhaseRunner


def claude_code_ready(settings: Settings) -> bool:
    """True where the `claude` command and an Anthropic key both exist."""
    return shutil.which("claude") is not None and settings.anthropic_api_key is not None


async def lose_sandbox(runner: PhaseRunner, sandbox_id: str) -> str:
    """Kill the session's sandbox on its backend, as an expiry or a crash
    would, without telling the session; return the backend id."""
    from app.sandbox.service import discard_backend_sandbox

    return await discard_backend_sandbox(runner.client, runner.settings, sandbox_id)


async def stream_load(runner: PhaseRunner) -> dict[str, Any]:
    from app.benchmark.phases import CapabilityUnavailable

    raise CapabilityUnavailable("not available: realtime streams are not installed")


async def cross_system(runner: PhaseRunner) -> None:
    from app.benchmark.phases import CapabilityUnavailable

    raise CapabilityUnavailable("not available: cross-system checks need storage")
