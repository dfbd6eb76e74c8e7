"""Heartbeats for activities that wait on long work they do not drive."""

import asyncio
from typing import Any

from temporalio import activity


async def heartbeat_every(seconds: float, *details: Any) -> None:
    """Heartbeat with `details` until cancelled, so the server records the
    activity as alive."""
    while True:
        activity.heartbeat(*details)
        await asyncio.sleep(seconds)
