"""The `sandbox` component of `system_health`: backend and isolation level."""

from __future__ import annotations

from typing import Any

from app.sandbox.backend import SandboxConfigurationError
from app.sandbox.runtime import get_backend
from app.services.health import register_component_check
from app.settings import Settings


async def check_sandbox(settings: Settings) -> dict[str, Any]:
    """Report the backend, whether local code runs isolated (degraded if not)
    and, for E2B, whether E2B accepts the key."""
    try:
        backend = get_backend(settings)
    except SandboxConfigurationError as error:
        return {
            "status": "unhealthy",
            "backend": settings.sandbox_backend,
            "error": str(error),
        }
    return dict(await backend.health())


def register_isolation_check() -> None:
    register_component_check("sandbox", check_sandbox)
