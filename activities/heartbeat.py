"""Heartbeats for activities that wait on long work they do not drive."""

import asyncio

from temporalio import activity


async def heartbeat_every(seconds: float) -> None:
    """Heartbeat until cancelled, so the server sees the activity alive."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(seconds)
