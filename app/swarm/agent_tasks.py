"""Tasks that run on one named swarm agent: how a workflow step assigned to
an agent runs (`sandbox_execution` steps)."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.swarm import (
    TaskCancelRequest,
    TaskProgress,
    TaskRecord,
    TaskSpec,
    TaskWork,
    task_workflow_id,
)
from app.temporal.cancels import cancelled_by_worker_shutdown, current_task_cancelling
from app.temporal.endings import workflow_ending

logger = logging.getLogger(__name__)

UPDATE_RETRY_SECONDS = 60.0
# Maximum pause between two checks for the workflow of a queued task, which
# starts once the task's agent is idle.
QUEUED_POLL_SECONDS = 2.0
# How long a cancelled caller waits for its task's cancel to reach the server.
CANCEL_SECONDS = 10.0


class AgentTaskError(Exception):
    """Submission to the agent's swarm failed; the message gives the reason."""


def step_task_id(swarm_id: str, execution_id: str, step: str) -> str:
    """Return a task id fixed by the swarm, execution and step, so a retried
    activity finds the task its first attempt submitted. It has the form of
    `service.new_task_id`."""
    digest = hashlib.sha256(f"{execution_id}/{step}".encode()).hexdigest()
    return f"task_{swarm_id}_{digest[:8]}"


async def run_on_agent(
    client: Client,
    swarm_id: str,
    agent_id: str,
    task_id: str,
    work: TaskWork,
    *,
    cancel_reason: str = "the caller that waited for the task was cancelled",
) -> TaskProgress:
    """Submit `work` as a task of `swarm_id` pinned to `agent_id` and wait for
    its end, first while the swarm queues it until the agent is idle, then
    while it runs.

    A second call with the same `task_id` waits for the task that the first
    call submitted. When the caller is cancelled, the task is cancelled too,
    with `cancel_reason` as its error: a queued task never runs, and a
    running task's program is stopped. An activity attempt cancelled for
    any reason other than a cancel request (its worker's shutdown, its
    start-to-close or heartbeat timeout) leaves the task alone while its
    activity has a next attempt to wait for it (see `_task_outlives_cancel`).

    Raises:
        AgentTaskError: the swarm rejected the task (the agent left, the swarm
            is destroyed) or cannot be reached, or the swarm or the task's
            workflow ended without the task's result.
    """
    spec = TaskSpec(
        task_id=task_id, work=work, strategy="parallel", max_agents=1, agent_id=agent_id
    )
    try:
        await _submit(client, swarm_id, spec)
        return await _wait_for_end(client, swarm_id, task_id)
    except (asyncio.CancelledError, WorkflowUpdateRPCTimeoutOrCancelledError):
        if not current_task_cancelling():
            raise  # an update that timed out, not a cancelled caller
        if await _task_outlives_cancel(client):
            logger.info(
                "activity attempt cancelled (%s): task %s of swarm %s goes on, "
                "and the next attempt waits for it",
                _cancel_source(),
                task_id,
                swarm_id,
            )
        else:
            logger.info(
                "caller cancelled (%s): cancelling task %s of swarm %s",
                _cancel_source(),
                task_id,
                swarm_id,
            )
            await _cancel_quietly(client, swarm_id, task_id, cancel_reason)
        # The client turns a cancel during an update into its own error.
        raise asyncio.CancelledError() from None


async def _task_outlives_cancel(client: Client) -> bool:
    """Return whether a cancelled activity attempt must leave its task
    running, because a next attempt of the activity will wait for it.

    A cancel request, or a cancel outside an activity, ends the wait for
    good. A worker's shutdown is followed by a retry on another worker. Any
    other cancel (a start-to-close or heartbeat timeout, a pause, a reset, a
    heartbeat that found the attempt gone) keeps the task while the caller's
    workflow execution runs and lists the activity as pending, since the
    server has then scheduled the next attempt. A heartbeat also finds the
    attempt gone when the workflow execution closed right after its cancel
    request, and then no attempt follows.
    """
    if not activity.in_activity():
        return False
    details = activity.cancellation_details()
    if cancelled_by_worker_shutdown():
        return True
    if details is None or details.cancel_requested:
        return False
    info = activity.info()
    if info.workflow_id is None:
        return False  # an activity started without a workflow
    handle = client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
    try:
        description = await asyncio.wait_for(handle.describe(), CANCEL_SECONDS)
    except (TimeoutError, RPCError) as error:
        if isinstance(error, RPCError) and error.status == RPCStatusCode.NOT_FOUND:
            return False
        # Keeping a task that nobody waits for costs only its agent's time,
        # while cancelling one that a retry waits for fails the step.
        logger.warning(
            "could not read workflow %s to see whether activity %s is retried, "
            "so its task goes on: %s",
            info.workflow_id,
            info.activity_id,
            error,
        )
        return True
    if description.status != WorkflowExecutionStatus.RUNNING:
        return False
    return any(
        pending.activity_id == info.activity_id
        for pending in description.raw_description.pending_activities
    )


def _cancel_source() -> str:
    """Name what cancelled the running activity attempt, for the log."""
    if not activity.in_activity():
        return "not in an activity"
    details = activity.cancellation_details()
    if details is None:
        return "no details"
    sources = [
        name
        for name in (
            "cancel_requested",
            "timed_out",
            "not_found",
            "worker_shutdown",
            "paused",
            "reset",
        )
        if getattr(details, name)
    ]
    return ", ".join(sources) or "no details"


async def _cancel_quietly(
    client: Client, swarm_id: str, task_id: str, reason: str
) -> None:
    try:
        await asyncio.wait_for(
            cancel_task(client, swarm_id, task_id, reason), CANCEL_SECONDS
        )
    except (TimeoutError, RPCError) as error:
        logger.warning(
            "could not cancel task %s of swarm %s: %s", task_id, swarm_id, error
        )


async def _submit(client: Client, swarm_id: str, spec: TaskSpec) -> TaskRecord:
    handle = client.get_workflow_handle(f"swarm-{swarm_id}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPDATE_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return await handle.execute_update(
                "submit_task",
                spec,
                id=f"submit-{spec.task_id}",
                result_type=TaskRecord,
            )
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            message = cause.message if isinstance(cause, ApplicationError) else cause
            raise AgentTaskError(
                f"swarm {swarm_id} rejected the task: {message}"
            ) from None
        except RPCError as error:
            # The server admits a bounded number of in-flight updates per
            # workflow, and returns RESOURCE_EXHAUSTED to the others.
            if error.status == RPCStatusCode.RESOURCE_EXHAUSTED and (
                loop.time() < deadline
            ):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if error.status == RPCStatusCode.NOT_FOUND:
                # The update reached a closed swarm workflow.
                raise AgentTaskError(
                    f"swarm {swarm_id} was destroyed or has ended, so its agents "
                    "take no more tasks; resolve the step to an agent of an "
                    "active swarm"
                ) from None
            raise AgentTaskError(
                f"swarm {swarm_id} cannot take tasks: {error.message}"
            ) from None


async def _wait_for_end(client: Client, swarm_id: str, task_id: str) -> TaskProgress:
    """Return the task's result once its workflow completes.

    A queued task has no workflow yet: the swarm starts it once the task's
    agent is idle. Until then, check for it again after pauses that grow to
    QUEUED_POLL_SECONDS, and check that the swarm's workflow still runs,
    since a swarm that ended without a destroy starts no more tasks."""
    handle: WorkflowHandle[object, TaskProgress] = client.get_workflow_handle(
        task_workflow_id(task_id), result_type=TaskProgress
    )
    delay = 0.1
    swarm_ended = False
    while True:
        try:
            return await handle.result()
        except WorkflowFailureError as failure:
            raise AgentTaskError(
                f"the workflow of task {task_id} ended without a result "
                f"({workflow_ending(failure.cause)})"
            ) from None
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
        if swarm_ended:
            raise AgentTaskError(
                f"swarm {swarm_id} ended before its task {task_id} started, so "
                "the task will not run; resolve the step to an agent of an "
                "active swarm"
            )
        # A destroy starts the workflows of the queued tasks it cancels before
        # the swarm's workflow completes, so check for the task's once more.
        swarm_ended = not await _workflow_running(client, f"swarm-{swarm_id}")
        if not swarm_ended:
            await asyncio.sleep(delay)
            delay = min(delay * 2, QUEUED_POLL_SECONDS)


async def _workflow_running(client: Client, workflow_id: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


async def cancel_task(client: Client, swarm_id: str, task_id: str, reason: str) -> None:
    """Cancel a task of a swarm, with `reason` as its error.

    The swarm drops a queued task, which then never runs. A running task's
    workflow is cancelled as from outside the swarm: it stops its program
    and reports the cancel to the swarm. A task that has ended is left as
    it is.

    Raises:
        RPCError: the swarm's or the task's workflow could not be reached.
    """
    swarm = client.get_workflow_handle(f"swarm-{swarm_id}")
    try:
        record = await swarm.execute_update(
            "cancel_task",
            TaskCancelRequest(task_id=task_id, reason=reason),
            result_type=TaskRecord,
        )
    except WorkflowUpdateFailedError:
        return  # the swarm has no such task, since its submission never arrived
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        # The swarm's workflow has ended, but a task that runs outlives it.
    else:
        if record.status != "running":
            return
    task = client.get_workflow_handle(task_workflow_id(task_id))
    if not await _workflow_running(client, task.id):
        return
    try:
        await task.cancel(reason=reason)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
