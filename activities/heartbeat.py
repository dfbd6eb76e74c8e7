"""Heartbeats for activities that wait on long work they do not drive."""

import asyncio
import contextvars
import threading
from types import TracebackType
from typing import Any

from temporalio import activity


async def heartbeat_every(seconds: float, *details: Any) -> None:
    """Heartbeat with `details` until cancelled, so the server records the
    activity as alive."""
    while True:
        activity.heartbeat(*details)
        await asyncio.sleep(seconds)


class ThreadHeartbeat:
    """Heartbeats of a thread activity: each progress report at once, and the
    latest one again every `seconds` from a helper thread.

    A step between two reports (JIT compilation, a long epoch) then does not
    look like a dead worker, so the activity's heartbeat timeout can be short
    enough to notice a killed worker soon. The repeats start from the details
    of the previous attempt, so they never replace those with nothing.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._latest: tuple[Any, ...] = tuple(activity.info().heartbeat_details[-1:])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The activity's context, for activity.heartbeat in the helper thread.
        self._context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=self._repeat, name="activity-heartbeat", daemon=True
        )

    def __call__(self, details: Any) -> None:
        with self._lock:
            self._latest = (details,)
        activity.heartbeat(details)

    def __enter__(self) -> "ThreadHeartbeat":
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _repeat(self) -> None:
        while not self._stop.wait(self.seconds):
            with self._lock:
                latest = self._latest
            self._context.run(activity.heartbeat, *latest)
