"""`system_health`: every figure read live when it is asked for."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    DescribeTaskQueueRequest,
    GetSystemInfoRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError

import app
from app.contracts.queues import ALL_QUEUES, ORCHESTRATION
from app.contracts.system import (
    DatabaseHealth,
    HealthReport,
    Poller,
    QueueHealth,
    Status,
    TemporalHealth,
)
from app.db import get_engine
from app.db.migrate import current_heads, expected_heads
from app.services.memory import read_memory
from app.settings import Settings, mask_url_passwords, url_passwords

logger = logging.getLogger(__name__)

PROCESS_STARTED = time.monotonic()
_RPC_TIMEOUT = timedelta(seconds=5)

# Temporal stores a poller's last access when its poll arrives and keeps
# listing the poller for minutes after it stops. A live idle worker starts a
# new long poll about every 60 to 70 s (an estimate from Temporal's default
# long-poll timeout), so an older entry belongs to a worker that is stopped,
# frozen or busy in all its task slots.
POLLER_STALE_AFTER = timedelta(seconds=90)

ComponentCheck = Callable[[Settings], Awaitable[dict[str, Any]]]
_component_checks: dict[str, ComponentCheck] = {}


def register_component_check(name: str, check: ComponentCheck) -> None:
    """Add a capability's check; its dict appears under `components[name]`.

    A check returns at least {"status": "healthy"|"degraded"|"unhealthy"}.
    """
    _component_checks[name] = check


def check_database(settings: Settings) -> DatabaseHealth:
    url = settings.effective_database_url
    parsed = make_url(url)
    masked = mask_url_passwords(url)
    started = time.perf_counter()
    try:
        with get_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
        latency = (time.perf_counter() - started) * 1000
        heads = current_heads(url)
    except Exception as error:  # any driver error means the database is down
        # The driver's message may quote the URL or a part of its password,
        # as a host name that an unencoded `@` split off.
        reason = mask_url_passwords(str(error))
        for secret in url_passwords(url):
            reason = reason.replace(secret, "***")
        reason = reason.splitlines()[0]
        logger.warning("database health check failed for %s: %s", masked, reason)
        return DatabaseHealth(
            status="unhealthy",
            backend=parsed.get_backend_name(),
            url=masked,
            error=reason,
        )
    expected = expected_heads()
    status: Status = "healthy" if heads == expected else "degraded"
    return DatabaseHealth(
        status=status,
        backend=parsed.get_backend_name(),
        url=masked,
        latency_ms=round(latency, 3),
        revision=heads,
        error=None
        if status == "healthy"
        else f"migrations at {heads}, expected {expected}; run `nexus db upgrade`",
    )


async def check_temporal(
    settings: Settings, client: Client | None, address: str
) -> TemporalHealth:
    if client is None:
        return TemporalHealth(
            status="unhealthy",
            address=address,
            namespace=settings.namespace,
            error=f"not connected to Temporal at {address}; start it with `nexus up`",
        )
    started = time.perf_counter()
    latency = 0.0

    async def describe_namespace() -> Any:
        nonlocal latency
        response = await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=settings.namespace), timeout=_RPC_TIMEOUT
        )
        latency = (time.perf_counter() - started) * 1000
        return response

    try:
        # Both RPCs at once, so that a reading waits for one round trip.
        namespace, info = await asyncio.gather(
            describe_namespace(),
            client.workflow_service.get_system_info(
                GetSystemInfoRequest(), timeout=_RPC_TIMEOUT
            ),
        )
    except (RPCError, RuntimeError) as error:
        return TemporalHealth(
            status="unhealthy",
            address=address,
            namespace=settings.namespace,
            error=str(error),
        )
    state = namespace.namespace_info.state
    return TemporalHealth(
        status="healthy",
        address=address,
        namespace=settings.namespace,
        namespace_state=_namespace_state_name(state),
        server_version=info.server_version or None,
        latency_ms=round(latency, 3),
    )


def _namespace_state_name(state: int) -> str:
    names = {0: "UNSPECIFIED", 1: "REGISTERED", 2: "DEPRECATED", 3: "DELETED"}
    return names.get(state, str(state))


async def describe_queue(
    client: Client,
    namespace: str,
    queue: str,
    stale_after: timedelta = POLLER_STALE_AFTER,
) -> QueueHealth:
    try:
        workflow, activity = await asyncio.gather(
            *(
                client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=namespace,
                        task_queue=TaskQueue(name=queue),
                        task_queue_type=kind,
                    ),
                    timeout=_RPC_TIMEOUT,
                )
                for kind in (
                    TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                )
            )
        )
    except (RPCError, RuntimeError) as error:
        return QueueHealth(status="unhealthy", error=str(error))
    now = datetime.now(UTC)
    workflow_pollers = [_poller(p, now, stale_after) for p in workflow.pollers]
    activity_pollers = [_poller(p, now, stale_after) for p in activity.pollers]
    return queue_health(queue, workflow_pollers, activity_pollers, stale_after)


def queue_health(
    queue: str,
    workflow_pollers: list[Poller],
    activity_pollers: list[Poller],
    stale_after: timedelta = POLLER_STALE_AFTER,
) -> QueueHealth:
    """Rate a queue by its pollers: unhealthy with none, degraded when any
    did not poll within `stale_after`.

    A stale poller makes the queue degraded, never unhealthy, because a
    worker whose task slots are all busy stops polling as a frozen one does.
    """
    pollers = workflow_pollers + activity_pollers
    exited = sorted({p.identity for p in pollers if p.process_exited})
    stale = sorted({p.identity for p in pollers if p.stale and not p.process_exited})
    status: Status = "healthy"
    error = None
    problems = []
    if exited:
        problems.append(
            f"the process of {', '.join(exited)} no longer runs on this host"
        )
    if stale:
        seconds = int(stale_after.total_seconds())
        problems.append(
            f"no poll on {queue} for over {seconds} s from {', '.join(stale)}; "
            "such a worker is stopped, frozen or busy in all its task slots"
        )
    if all(p.process_exited for p in pollers):
        status = "unhealthy"
        error = "; ".join([f"no worker polls {queue}", *problems])
    elif problems:
        status = "degraded"
        error = "; ".join(problems)
    return QueueHealth(
        status=status,
        workflow_pollers=workflow_pollers,
        activity_pollers=activity_pollers,
        error=error,
    )


async def _describe_queues(
    client: Client | None, namespace: str, queues: tuple[str, ...]
) -> list[QueueHealth]:
    if client is None:
        return []
    return list(
        await asyncio.gather(*(describe_queue(client, namespace, q) for q in queues))
    )


def _poller(info: Any, now: datetime, stale_after: timedelta) -> Poller:
    last = (
        info.last_access_time.ToDatetime(tzinfo=UTC)
        if info.HasField("last_access_time")
        else None
    )
    exited = worker_process_exited(info.identity)
    stale = exited or (last is not None and now - last > stale_after)
    return Poller(
        identity=info.identity,
        last_access_time=last,
        stale=stale,
        process_exited=exited,
    )


def worker_process_exited(identity: str) -> bool:
    """Return whether a worker identity (`QUEUE@HOST:PID`, see
    `worker_identity`) names a process of this host that no longer runs.

    Temporal lists a poller for minutes after its last poll, so a killed
    worker would otherwise count as live until `POLLER_STALE_AFTER`.
    """
    _, _, where = identity.rpartition("@")
    host, _, pid = where.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, owned by another user
    return False


async def system_health(
    settings: Settings,
    client: Client | None,
    *,
    queues: tuple[str, ...] = ALL_QUEUES,
    required_queue: str = ORCHESTRATION,
) -> HealthReport:
    """Read the health of the database, Temporal, every queue and this process.

    The platform is unhealthy when the database, Temporal or
    `required_queue` is: every Flow Nexus workflow runs on the orchestration
    queue, so with no worker there no tool that starts one does any work.
    Another queue without a worker makes it degraded.
    """
    address = settings.effective_temporal_address
    # The queues are described while the namespace is checked, so that a
    # reading waits for one round of RPCs instead of two. Their results are
    # dropped when the namespace check finds Temporal unreachable.
    database, temporal, described = await asyncio.gather(
        asyncio.to_thread(check_database, settings),
        check_temporal(settings, client, address),
        _describe_queues(client, settings.namespace, queues),
    )
    workers: dict[str, QueueHealth] = {}
    if client is not None and temporal.status == "healthy":
        workers = dict(zip(queues, described, strict=True))
    else:
        workers = {
            q: QueueHealth(status="unhealthy", error="Temporal is unreachable")
            for q in queues
        }
    components: dict[str, dict[str, Any]] = {}
    for name, check in _component_checks.items():
        try:
            components[name] = await check(settings)
        except Exception as error:  # a broken check must not hide the others
            logger.exception("health check %s failed", name)
            components[name] = {"status": "unhealthy", "error": str(error)}
    statuses: list[str] = [database.status, temporal.status]
    statuses += [q.status for q in workers.values()]
    statuses += [str(c.get("status", "unhealthy")) for c in components.values()]
    overall: Status = "healthy"
    required = workers.get(required_queue)
    if (
        database.status == "unhealthy"
        or temporal.status == "unhealthy"
        or (required is not None and required.status == "unhealthy")
    ):
        overall = "unhealthy"
    elif any(s != "healthy" for s in statuses):
        overall = "degraded"
    return HealthReport(
        status=overall,
        database=database,
        temporal=temporal,
        workers=workers,
        components=components,
        timestamp=datetime.now(UTC),
        uptime=round(time.monotonic() - PROCESS_STARTED, 3),
        memory=read_memory(),
        version=app.__version__,
    )
