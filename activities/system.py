"""Activities of the foundation: health checks and worker probes."""

from __future__ import annotations

import os
import socket
import time

from temporalio import activity

from app.contracts.system import HealthReport, WorkerProbe
from app.processes import worker_identity
from app.services.health import system_health
from app.services.memory import read_memory
from app.settings import Settings


class SystemActivities:
    """Activities that read the platform's state; they run on the orchestration
    queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="check_health")
    async def check_health(self) -> HealthReport:
        return await system_health(self.settings, activity.client())


class ProbeActivities:
    """`probe_worker`, registered on every queue, so a workflow can ask a
    specific queue's worker process for its identity and memory."""

    def __init__(self, task_queue: str) -> None:
        self.task_queue = task_queue
        self.started = time.monotonic()

    @activity.defn(name="probe_worker")
    async def probe_worker(self) -> WorkerProbe:
        memory = read_memory()
        return WorkerProbe(
            task_queue=self.task_queue,
            identity=worker_identity(self.task_queue),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            rss=memory.rss,
            heap_used=memory.heap_used,
            python_heap_used=memory.python_heap_used,
            python_arenas=memory.python_arenas,
            uptime=round(time.monotonic() - self.started, 3),
        )
