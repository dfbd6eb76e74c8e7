"""Build and run the worker of one task queue."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from app.contracts.queues import NEURAL
from app.processes import freeze_startup_objects, worker_identity
from app.sandbox.runtime import close_local_backends
from app.services.audit_writer import AuditWriter, queued_audit
from app.settings import Settings
from workers.allocator import jemalloc_loaded
from workers.malloc import trim_malloc_every
from workers.memory_debug import report_on_signal
from workers.registry import QUEUE_WARM_UPS, queue_spec
from workers.warmup import warm_up

logger = logging.getLogger(__name__)


# Audit events of tool calls that a worker keeps queued while its database
# does not take writes, before it drops new ones. An estimate of the memory:
# most events take well under 10 KB (each string is cut at 4096 characters),
# so a full queue takes some tens of MB.
WORKER_AUDIT_QUEUE_EVENTS = 10_000


def worker_audit(settings: Settings) -> AbstractAsyncContextManager[AuditWriter]:
    """Queue and retry the audit events of the tool calls that this process's
    activities make, as the HTTP server does, until the block ends."""
    return queued_audit(
        settings.effective_database_url, max_pending=WORKER_AUDIT_QUEUE_EVENTS
    )


# How long a stopping worker lets its running activities go on before it
# cancels them; the server then retries them on another worker.
GRACEFUL_SHUTDOWN_TIMEOUT = timedelta(seconds=10)


def build_worker(
    client: Client,
    settings: Settings,
    task_queue: str,
    *,
    graceful_shutdown_timeout: timedelta = GRACEFUL_SHUTDOWN_TIMEOUT,
) -> Worker:
    """Create the typed worker of `task_queue` with its registered work."""
    spec = queue_spec(task_queue, settings)
    limits = spec.limits
    return Worker(
        client,
        task_queue=task_queue,
        workflows=spec.workflows,
        activities=spec.activities,
        identity=worker_identity(task_queue),
        max_concurrent_workflow_tasks=limits.max_concurrent_workflow_tasks,
        max_concurrent_activities=limits.max_concurrent_activities,
        max_concurrent_local_activities=limits.max_concurrent_local_activities,
        # Synchronous activities (JAX, blocking database calls) run here.
        activity_executor=ThreadPoolExecutor(max(4, limits.max_concurrent_activities)),
        graceful_shutdown_timeout=graceful_shutdown_timeout,
        # The SDK sends a heartbeat at most every 0.8 x the heartbeat timeout
        # by default (48 s for a benchmark phase), and a cancellation reaches
        # an activity only in a heartbeat's response. A cancelled benchmark
        # run waits for its phase activity to clean up, so it would wait that
        # long too.
        max_heartbeat_throttle_interval=timedelta(seconds=5),
    )


async def run_workers(
    client: Client, settings: Settings, task_queues: Sequence[str]
) -> None:
    """Run workers for `task_queues` until SIGINT or SIGTERM, then drain them."""
    if settings.worker_warm_up:
        for queue in task_queues:
            plan = QUEUE_WARM_UPS.get(queue)
            if plan is not None:
                await asyncio.to_thread(warm_up, queue, plan.modules, plan.steps)
    workers = [build_worker(client, settings, queue) for queue in task_queues]
    # Imports and the warm-up are done: what exists now lives as long as the
    # process, and full collections need not scan it again.
    freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1,
        report_on_signal,
        settings.resolved_data_dir / "logs",
        "+".join(task_queues),
    )
    logger.info("workers polling %s (pid %d)", ", ".join(task_queues), os.getpid())
    runs = [asyncio.create_task(worker.run()) for worker in workers]
    trimmer = None
    if settings.worker_malloc_trim_seconds and not jemalloc_loaded():
        # jemalloc purges freed pages itself; malloc_trim is glibc's.
        trimmer = asyncio.create_task(
            trim_malloc_every(settings.worker_malloc_trim_seconds, stop)
        )
    node_pool = None
    if NEURAL in task_queues and settings.neural_embedded_nodes:
        # Cluster nodes run beside the nexus-neural worker, where JAX is
        # already loaded (see workers/neural_nodes.py).
        from workers.neural_nodes import NodeWorkerPool

        node_pool = asyncio.create_task(NodeWorkerPool(client, settings).run(stop))
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopped and task.exception() is not None:
            logger.error("worker stopped with an error: %s", task.exception())
    logger.info("shutting down workers for %s", ", ".join(task_queues))
    stop.set()
    if node_pool is not None:
        await node_pool
    await asyncio.gather(*(worker.shutdown() for worker in workers))
    await close_local_backends()
    if trimmer is not None:
        await trimmer
    for task in runs:
        if not task.done():
            task.cancel()
    logger.info("workers for %s stopped", ", ".join(task_queues))


async def run_node_workers(
    client: Client,
    settings: Settings,
    task_queues: Sequence[str],
    node_ids: Sequence[str],
) -> None:
    """Run neural cluster node workers (and any `task_queues`) until SIGINT
    or SIGTERM."""
    from workers.neural_nodes import run_node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(run_node(client, settings, n, stop)) for n in node_ids]
    if task_queues:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        queues_task = asyncio.create_task(run_workers(client, settings, task_queues))
        await queues_task
        stop.set()
    await asyncio.gather(*tasks)
    logger.info("node workers %s stopped", ", ".join(node_ids))
