"""A short-lived `system_health` reading shared by the calls of one process.

A reading makes about a dozen Temporal RPCs and a few database queries, so
a server that answers many health calls a second would spend most of its
time re-reading the same figures. `HealthSnapshots` keeps the last reading
for `max_age` seconds and returns it with `age_seconds` set, so a caller
sees how old the figures are. Callers that arrive while a reading is under
way wait for that reading and start no new one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from app.contracts.system import HealthReport


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
        self._reading: asyncio.Task[HealthReport] | None = None

    async def read(self, probe: Callable[[], Awaitable[HealthReport]]) -> HealthReport:
        """Return a reading at most `max_age` seconds old, calling `probe` for
        a new one when the last is older.

        Raises:
            Exception: whatever `probe` raised; a failed reading is not kept.
        """
        if self.max_age <= 0:
            return await probe()
        now = time.monotonic()
        if self._report is not None and now - self._read_at <= self.max_age:
            age = round(now - self._read_at, 3)
            return self._report.model_copy(update={"age_seconds": age})
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(
                self._refresh(probe), name="system-health-reading"
            )
        # A caller that is cancelled must not cancel the reading that the
        # other callers wait for.
        return await asyncio.shield(self._reading)

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
            return report
        finally:
            self._reading = None
