"""A phase fails, instead of waiting without end, when a queue that its
work runs on has no live worker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from app.benchmark import phases
from app.benchmark.phases import PhaseFailed, _watched
from app.services.health import describe_queue


@activity.defn(name="phase_watch_noop")
async def _noop() -> None:
    return None


@pytest.fixture(autouse=True)
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "QUEUE_CHECK_SECONDS", 0.1)
    monkeypatch.setattr(phases, "QUEUE_LOST_SECONDS", 0.5)


async def test_phase_fails_when_its_queue_has_no_worker(client: Client) -> None:
    queue = f"phase-watch-{uuid.uuid4().hex[:8]}"
    cancelled = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(PhaseFailed) as failed:
        await asyncio.wait_for(
            _watched(stuck(), client, client.namespace, (queue,)), 60
        )
    assert str(failed.value).startswith(f"no live worker has polled {queue} for 0 s")
    assert "start that queue's worker" in str(failed.value)
    assert cancelled.is_set()


async def polled(client: Client, queue: str) -> None:
    """Wait until the server lists the new worker's poller."""
    for _ in range(200):
        if (await describe_queue(client, client.namespace, queue)).status != (
            "unhealthy"
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no poller on {queue}")


async def test_phase_with_its_workers_runs_to_its_end(client: Client) -> None:
    queue = f"phase-watch-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, activities=[_noop]):
        await polled(client, queue)
        # Long enough for several looks at the queue.
        await _watched(asyncio.sleep(2), client, client.namespace, (queue,))


async def test_cancelled_phase_cancels_its_work(client: Client) -> None:
    queue = f"phase-watch-{uuid.uuid4().hex[:8]}"
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with Worker(client, task_queue=queue, activities=[_noop]):
        await polled(client, queue)
        watched = asyncio.create_task(
            _watched(work(), client, client.namespace, (queue,))
        )
        await asyncio.sleep(0.3)
        watched.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watched
    assert cancelled.is_set()
