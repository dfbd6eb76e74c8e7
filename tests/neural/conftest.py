"""Fixtures of the neural tests: SQLite settings and in-process node workers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from app.contracts.neural import ModelConfig, NodeRef, SessionPlan
from app.contracts.queues import NEURAL, ORCHESTRATION, neural_node_queue
from app.db.migrate import upgrade
from app.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, running_workers, wait_for_pollers


def one_worker_plan(session_id: str, **changes: object) -> SessionPlan:
    """A one-round federated plan on iris for a single worker node_a."""
    worker = NodeRef(node_id="node_a", task_queue="nexus-neural-node_a", role="worker")
    fields: dict[str, object] = {
        "session_id": session_id,
        "cluster_id": f"dnc_{session_id}",
        "model": ModelConfig(architecture="feedforward", widths=[8]),
        "dataset": "iris",
        "epochs": 1,
        "batch_size": 32,
        "learning_rate": 0.01,
        "optimizer": "adam",
        "federated": True,
        "consensus": "raft",
        "jit": True,
        "workers": [worker],
        "default_queue": NEURAL,
        "rounds": 1,
    }
    return SessionPlan.model_validate(fields | changes)


@pytest.fixture
def neural_settings(tmp_path: Path, temporal_address: str) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'nexus.db'}"
    upgrade(url)
    yield Settings(
        data_dir=tmp_path,
        database_url=url,
        temporal_address=temporal_address,
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
        neural_embedded_nodes=False,
    )


@pytest.fixture
def offline_settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings on each database backend whose Temporal address is a port
    where nothing listens."""
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        temporal_address="127.0.0.1:1",
        encryption_key=TEST_ENCRYPTION_KEY,
        neural_embedded_nodes=False,
    )


@pytest.fixture
async def neural_workers(
    client: Client, neural_settings: Settings
) -> AsyncIterator[Settings]:
    async with running_workers(client, neural_settings, [ORCHESTRATION, NEURAL]):
        yield neural_settings


@contextlib.asynccontextmanager
async def node_workers(
    client: Client,
    settings: Settings,
    node_ids: list[str],
    activities: dict[str, list] | None = None,
) -> AsyncIterator[dict[str, object]]:
    """Run node workers in this process; `activities` replaces a node's
    activities (to force a fault)."""
    from temporalio.worker import Worker

    from workers.neural_nodes import build_node_worker

    workers: dict[str, object] = {}
    async with contextlib.AsyncExitStack() as stack:
        for node_id in node_ids:
            if activities and node_id in activities:
                worker = Worker(
                    client,
                    task_queue=neural_node_queue(node_id),
                    activities=activities[node_id],
                    activity_executor=__import__(
                        "concurrent.futures"
                    ).futures.ThreadPoolExecutor(2),
                )
            else:
                worker = build_node_worker(client, settings, node_id)
            await stack.enter_async_context(worker)
            workers[node_id] = worker
        await wait_for_pollers(
            client, settings.namespace, [neural_node_queue(n) for n in node_ids]
        )
        yield workers
