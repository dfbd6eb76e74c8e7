import asyncio
import os
import socket
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from app.contracts.queues import ALL_QUEUES
from app.contracts.system import Poller
from app.services.health import (
    POLLER_STALE_AFTER,
    describe_queue,
    queue_health,
    system_health,
    worker_process_exited,
)
from app.settings import Settings


async def test_health_sees_every_queue_poller(
    client: Client, workers: Settings
) -> None:
    report = await system_health(workers, client)
    assert report.status == "healthy", report.model_dump_json(indent=2)
    assert report.database.status == "healthy"
    assert report.database.latency_ms is not None
    assert report.temporal.namespace_state == "REGISTERED"
    assert report.temporal.server_version
    for queue in ALL_QUEUES:
        pollers = report.workers[queue].activity_pollers
        assert pollers, f"no activity poller on {queue}"
        assert pollers[0].identity.startswith(queue)
    assert report.memory.rss > 0
    assert report.uptime >= 0
    dumped = report.model_dump(mode="json", by_alias=True)
    assert {"heapTotal", "heapUsed", "rss"} <= dumped["memory"].keys()


async def test_health_without_temporal_is_unhealthy(settings: Settings) -> None:
    report = await system_health(settings, None)
    assert report.status == "unhealthy"
    assert report.temporal.status == "unhealthy"
    assert report.database.status == "healthy"
    assert all(q.status == "unhealthy" for q in report.workers.values())


async def test_health_without_orchestration_worker_is_unhealthy(
    settings: Settings, client: Client
) -> None:
    """No worker on the orchestration queue means no workflow runs: the
    platform is unhealthy. Another queue without a worker only degrades it."""
    orchestration = f"health-orchestration-{uuid.uuid4().hex[:8]}"
    other = f"health-other-{uuid.uuid4().hex[:8]}"
    report = await system_health(
        settings, client, queues=(orchestration, other), required_queue=orchestration
    )
    assert report.temporal.status == "healthy"
    assert report.workers[orchestration].status == "unhealthy"
    assert report.status == "unhealthy"
    async with Worker(
        client,
        task_queue=orchestration,
        activities=[_noop],
        identity=f"{orchestration}@{socket.gethostname()}:{os.getpid()}",
    ):
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            report = await system_health(
                settings,
                client,
                queues=(orchestration, other),
                required_queue=orchestration,
            )
            if report.workers[orchestration].status == "healthy":
                break
            assert asyncio.get_running_loop().time() < deadline, report
            await asyncio.sleep(0.2)
    assert report.workers[other].status == "unhealthy"
    assert report.status == "degraded"


async def test_health_with_dead_database(tmp_path, client: Client) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
    )
    report = await system_health(settings, client)
    assert report.status == "unhealthy"
    assert report.database.status == "unhealthy"
    assert report.database.error
    assert "nobody@127.0.0.1:1" in report.database.url


@activity.defn(name="health_test_noop")
async def _noop() -> None:
    return None


async def test_health_marks_silent_poller_stale(client: Client) -> None:
    queue = f"health-stale-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, activities=[_noop]):
        for _ in range(100):
            if (await describe_queue(client, "default", queue)).activity_pollers:
                break
            await asyncio.sleep(0.1)
    # Temporal keeps listing the stopped worker, with its last poll aging.
    await asyncio.sleep(1.5)
    live = await describe_queue(client, "default", queue)
    assert live.status == "healthy", live
    assert not live.activity_pollers[0].stale
    stale = await describe_queue(
        client, "default", queue, stale_after=timedelta(seconds=1)
    )
    # Degraded, not unhealthy: a worker busy in all its slots looks the same.
    assert stale.status == "degraded", stale
    assert stale.activity_pollers[0].stale
    assert stale.error is not None
    assert f"no poll on {queue} for over 1 s" in stale.error
    assert stale.activity_pollers[0].identity in stale.error


def test_queue_health_with_some_stale_pollers() -> None:
    now = datetime.now(UTC)
    live = Poller(identity="live@host:1", last_access_time=now)
    stale = Poller(
        identity="frozen@host:2",
        last_access_time=now - POLLER_STALE_AFTER * 2,
        stale=True,
    )
    health = queue_health("nexus-q", [], [live, stale])
    assert health.status == "degraded"
    assert health.error is not None
    assert "frozen@host:2" in health.error
    assert "live@host:1" not in health.error


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_worker_process_exited_reads_identity() -> None:
    host = socket.gethostname()
    dead = _dead_pid()
    assert worker_process_exited(f"nexus-q@{host}:{dead}")
    assert not worker_process_exited(f"nexus-q@{host}:{os.getpid()}")
    assert not worker_process_exited(f"nexus-q@other-host:{dead}")
    assert not worker_process_exited("1234@some-host")


async def test_poller_of_dead_process_is_not_live(client: Client) -> None:
    """A worker killed with SIGKILL stays listed by Temporal for minutes; a
    poller whose process on this host is gone does not count as live."""
    queue = f"health-gone-{uuid.uuid4().hex[:8]}"
    identity = f"{queue}@{socket.gethostname()}:{_dead_pid()}"
    async with Worker(client, task_queue=queue, activities=[_noop], identity=identity):
        for _ in range(100):
            if (await describe_queue(client, "default", queue)).activity_pollers:
                break
            await asyncio.sleep(0.1)
        health = await describe_queue(client, "default", queue)
    assert health.status == "unhealthy", health
    assert health.activity_pollers[0].process_exited
    assert health.error is not None
    assert f"the process of {identity} no longer runs on this host" in health.error
