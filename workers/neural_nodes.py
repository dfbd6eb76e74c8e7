"""Workers of neural cluster nodes, one per `nexus-neural-<node_id>` queue.

`nexus worker --neural-node NODE_ID` runs one node on any machine that
reaches Temporal. Under `nexus up`, the `nexus-neural` worker process also
runs a `NodeWorkerPool` that starts a worker for every node of every active
cluster, so a cluster trains with nothing more to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.neural import node_queue_activities
from app.contracts.queues import neural_node_queue
from app.logs import RepeatedFailureLog
from app.neural import store
from app.processes import worker_identity
from app.settings import Settings

logger = logging.getLogger(__name__)


def build_node_worker(
    client: Client,
    settings: Settings,
    node_id: str,
    graceful_shutdown_seconds: float = 2.0,
) -> Worker:
    """Create the worker of one cluster node's queue."""
    queue = neural_node_queue(node_id)
    return Worker(
        client,
        task_queue=queue,
        activities=node_queue_activities(settings, node_id),
        identity=worker_identity(queue),
        # A node trains one shard at a time; aggregation or validation for
        # the same round may run beside it.
        max_concurrent_activities=2,
        activity_executor=ThreadPoolExecutor(2),
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_seconds),
    )


class NodeWorkerPool:
    """Keep one in-process worker per active cluster node, polling the
    database every `interval` seconds for deployed and terminated nodes."""

    def __init__(
        self, client: Client, settings: Settings, interval: float = 2.0
    ) -> None:
        self.client = client
        self.settings = settings
        self.interval = interval
        self.workers: dict[str, tuple[Worker, asyncio.Task[None]]] = {}
        self.sync_failures = RepeatedFailureLog(
            logger, "the sync of neural node workers"
        )

    async def sync(self) -> None:
        nodes = await asyncio.to_thread(store.active_nodes, self.settings)
        wanted = {node.id for node in nodes}
        for node_id in sorted(wanted - set(self.workers)):
            worker = build_node_worker(self.client, self.settings, node_id)
            self.workers[node_id] = (worker, asyncio.create_task(worker.run()))
            logger.info("node worker for %s started", node_id)
        for node_id in sorted(set(self.workers) - wanted):
            await self.stop(node_id)

    async def stop(self, node_id: str) -> None:
        worker, task = self.workers.pop(node_id)
        await worker.shutdown()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        # The worker does not own the executor it was given, so its threads
        # would outlive every terminated cluster without this.
        executor = worker.config().get("activity_executor")
        if executor is not None:
            executor.shutdown(wait=False)
        logger.info("node worker for %s stopped", node_id)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.sync()
                except Exception:
                    self.sync_failures.failed()
                else:
                    self.sync_failures.succeeded()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            for node_id in list(self.workers):
                await self.stop(node_id)


def node_problem(settings: Settings, node_id: str) -> str | None:
    """Return why `node_id` has no queue worth polling (an unknown node, or
    one that was terminated), or None for a node of an active cluster."""
    from app.db import session_scope
    from app.neural.models import NeuralCluster, NeuralNode

    with session_scope(settings.effective_database_url) as session:
        node = session.get(NeuralNode, node_id)
        cluster = session.get(NeuralCluster, node.cluster_id) if node else None
    if node is None:
        return (
            f"node {node_id} not found; give the node_id that neural_node_deploy "
            "returned"
        )
    if cluster is not None and cluster.status != "active":
        return (
            f"node {node_id} belongs to the {cluster.status} cluster "
            f"{cluster.id}; deploy a node on an active cluster"
        )
    if node.status == "terminated":
        return f"node {node_id} is terminated; deploy a new node"
    return None


async def run_node(
    client: Client, settings: Settings, node_id: str, stop: asyncio.Event
) -> None:
    """Run one node's worker until `stop` is set."""
    async with build_node_worker(client, settings, node_id):
        logger.info("polling %s", neural_node_queue(node_id))
        await stop.wait()
