"""A short-lived `system_health` reading shared by the calls of one process.

A reading makes about a dozen Temporal RPCs and a few database queries, so
a server that serves many health calls a second would spend most of its
time re-reading the same figures. `HealthSnapshots` keeps the last reading
for `max_age` seconds and returns it with `age_seconds` set, so a caller
sees how old the figures are. A reading is renewed in the background once
it is older than half of `max_age`, or earlier when the last reading took so
long that a renewal started then would finish after `max_age`. Callers that
find no reading young enough wait for the one under way instead of starting
another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from app.contracts.system import HealthReport

logger = logging.getLogger(__name__)


class HealthSnapshots:
    """The last health reading of this process and its age.

    Use it from one event loop.

    Args:
        max_age: seconds a reading is returned again; 0 reads on every call.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._report: HealthReport | None = None
        self._read_at = 0.0
        self._last_duration = 0.0
        self._reading: asyncio.Task[HealthReport] | None = None

    @property
    def renew_after(self) -> float:
        """Age in seconds past which a reading is renewed in the background."""
        # Twice the last reading's duration, because a loaded machine
        # (Temporal and this server sharing the cores) makes readings vary.
        return max(0.0, min(self.max_age / 2, self.max_age - 2 * self._last_duration))

    async def read(self, probe: Callable[[], Awaitable[HealthReport]]) -> HealthReport:
        """Return a reading at most `max_age` seconds old, calling `probe` for
        a new one when the last is older.

        Raises:
            Exception: whatever `probe` raised; a failed reading is not kept.
        """
        if self.max_age <= 0:
            return await probe()
        now = time.monotonic()
        age = now - self._read_at
        if self._report is not None and age <= self.max_age:
            # Renewed in the background before it expires, so under steady
            # traffic no caller waits for a reading.
            if age > self.renew_after:
                self._start_reading(probe)
            return self._report.model_copy(update={"age_seconds": round(age, 3)})
        # A caller that is cancelled must not cancel the reading that the
        # other callers wait for.
        return await asyncio.shield(self._start_reading(probe))

    def _start_reading(
        self, probe: Callable[[], Awaitable[HealthReport]]
    ) -> asyncio.Task[HealthReport]:
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(
                self._refresh(probe), name="system-health-reading"
            )
            self._reading.add_done_callback(_log_failure)
        return self._reading

    async def _refresh(
        self, probe: Callable[[], Awaitable[HealthReport]]
    ) -> HealthReport:
        # The age counts from the start of the reading, so it is never
        # understated.
        started = time.monotonic()
        try:
            report = await probe()
            self._report = report
            self._read_at = started
            self._last_duration = time.monotonic() - started
            return report
        finally:
            self._reading = None


def _log_failure(task: asyncio.Task[HealthReport]) -> None:
    # Retrieves the error of a reading that no caller awaited (one renewed
    # in the background), which asyncio would otherwise report as unhandled.
    if not task.cancelled() and task.exception() is not None:
        logger.error("system_health reading failed: %s", task.exception())
