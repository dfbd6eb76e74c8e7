"""Temporal side of user-defined workflows: starting executions, reading
their live state, schedules for triggers, and task queue statistics."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.common import Priority, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.queues import ORCHESTRATION
from app.contracts.workflows import ExecutionState, FlowInput, WorkflowDefinition
from app.temporal.search_attributes import (
    DEFINITION_ID,
    DEFINITION_NAME,
    EXECUTION_KIND,
)
from workflows.flow import EXECUTION_KIND_VALUE, FlowNexusWorkflow, priority_key

logger = logging.getLogger(__name__)

_RPC_TIMEOUT = timedelta(seconds=5)


def new_execution_id() -> str:
    return f"wfx_{secrets.token_hex(8)}"


def search_attributes(workflow_id: str, name: str) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(DEFINITION_ID, workflow_id),
            SearchAttributePair(DEFINITION_NAME, name),
            SearchAttributePair(EXECUTION_KIND, EXECUTION_KIND_VALUE),
        ]
    )


def memo(workflow_id: str, version: int, definition: WorkflowDefinition) -> dict:
    return {
        "definition_name": definition.name,
        "workflow_id": workflow_id,
        "version": version,
    }


async def start_execution(
    client: Client,
    workflow_id: str,
    version: int,
    definition: WorkflowDefinition,
    input_data: dict[str, Any],
    *,
    execution_id: str | None = None,
    groups: Sequence[str] | None = None,
) -> WorkflowHandle[FlowNexusWorkflow, ExecutionState]:
    """Start one run of a stored definition version on the orchestration queue.

    Eager start is requested: when this client's process also runs the
    orchestration worker, the server hands the first workflow task straight
    back, which saves a round trip through the task queue.
    """
    execution_id = execution_id or new_execution_id()
    handle = await client.start_workflow(
        FlowNexusWorkflow.run,
        FlowInput(
            definition=definition,
            workflow_id=workflow_id,
            version=version,
            input_data=input_data,
            groups=None if groups is None else list(groups),
        ),
        id=execution_id,
        task_queue=ORCHESTRATION,
        search_attributes=search_attributes(workflow_id, definition.name),
        memo=memo(workflow_id, version, definition),
        static_summary=f"{definition.name} (v{version})",
        static_details=definition.description,
        priority=Priority(priority_key=priority_key(definition.priority)),
        request_eager_start=True,
    )
    logger.info(
        "started execution %s of workflow %s v%d", execution_id, workflow_id, version
    )
    return handle


async def execution_started(client: Client, execution_id: str) -> bool:
    """Return whether Temporal has a run of a stored workflow under this id.

    A run's row is written by its first activity, so a run that
    `workflow_execute` has just started is in Temporal before it is in the
    database.
    """
    handle = client.get_workflow_handle(execution_id)
    try:
        description = await handle.describe(rpc_timeout=_RPC_TIMEOUT)
    except RPCError as error:
        # INVALID_ARGUMENT: an id that Temporal could not hold (empty, too long).
        if error.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return False
        raise
    return description.workflow_type == FlowNexusWorkflow.__name__


async def live_state(client: Client, execution_id: str) -> ExecutionState | None:
    """Query a running execution's state; None when it is closed or unknown."""
    handle = client.get_workflow_handle(execution_id)
    try:
        description = await handle.describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    if description.status != WorkflowExecutionStatus.RUNNING:
        return None
    try:
        state = await handle.query("state", result_type=ExecutionState)
    except RPCError as error:
        logger.warning("query of execution %s failed: %s", execution_id, error)
        return None
    # The workflow learns of a step's attempts only when the step ends. The
    # server's description has the attempt in progress and its last failure.
    pending = {
        activity.activity_id: activity
        for activity in description.raw_description.pending_activities
    }
    for step in state.steps:
        activity = pending.get(step.name)
        if step.status != "running" or activity is None:
            continue
        step.attempts = max(step.attempts, activity.attempt)
        if activity.attempt > 1 and activity.last_failure.message:
            step.error = (
                f"attempt {activity.attempt - 1} failed: "
                f"{activity.last_failure.message}; retrying"
            )
    return state


# Closed statuses that the workflow cannot record itself, because the server
# ends the run without running its code again.
_UNRECORDED_CLOSES = {
    WorkflowExecutionStatus.TERMINATED: ("terminated", "the execution was terminated"),
    WorkflowExecutionStatus.TIMED_OUT: ("timed_out", "the execution timed out"),
}


async def unrecorded_close(
    client: Client, execution_id: str
) -> tuple[str, str, datetime] | None:
    """Return (status, error, close time) of a run that Temporal closed by
    terminating it or timing it out, or None for any other run."""
    handle = client.get_workflow_handle(execution_id)
    try:
        description = await handle.describe(rpc_timeout=_RPC_TIMEOUT)
    except RPCError as error:
        if error.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return None
        raise
    if description.status not in _UNRECORDED_CLOSES:
        return None
    status, message = _UNRECORDED_CLOSES[description.status]
    return status, message, description.close_time or datetime.now(UTC)


def schedule_id(workflow_id: str, index: int) -> str:
    return f"{workflow_id}-schedule-{index}"


class ScheduleSyncError(Exception):
    """The server rejected the create or update of one trigger's schedule.

    Attributes:
        index: the trigger's position among the schedule triggers.
        cron: its cron expression.
        error: the server's error.
    """

    def __init__(self, index: int, cron: str, error: RPCError) -> None:
        super().__init__(f"schedule of trigger {index} ({cron!r}): {error.message}")
        self.index = index
        self.cron = cron
        self.error = error


async def sync_schedules(
    client: Client,
    workflow_id: str,
    version: int,
    definition: WorkflowDefinition | None,
    previous_count: int,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """Make the definition's Temporal Schedules match its schedule triggers.

    Schedules are numbered by trigger position; a new version updates them in
    place and deletes those past its last trigger. `definition=None` deletes
    all of them. Returns the ids of the schedules that now exist.

    Raises:
        ScheduleSyncError: a schedule could not be created or updated; the
            schedules before it are already changed.
    """
    triggers = (
        [t for t in definition.triggers if t.type == "schedule"] if definition else []
    )
    kept: list[str] = []
    for index, trigger in enumerate(triggers):
        assert definition is not None and trigger.cron is not None
        sid = schedule_id(workflow_id, index)
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                FlowNexusWorkflow.run,
                FlowInput(
                    definition=definition,
                    workflow_id=workflow_id,
                    version=version,
                    input_data=trigger.input_data,
                    groups=None if groups is None else list(groups),
                ),
                id=f"{workflow_id}-scheduled",
                task_queue=ORCHESTRATION,
                typed_search_attributes=search_attributes(workflow_id, definition.name),
                memo=memo(workflow_id, version, definition),
                static_summary=f"{definition.name} (v{version}, scheduled)",
                priority=Priority(priority_key=priority_key(definition.priority)),
            ),
            spec=ScheduleSpec(cron_expressions=[trigger.cron]),
        )
        try:
            await _put_schedule(client, sid, schedule, definition.name, workflow_id)
        except RPCError as error:
            raise ScheduleSyncError(index, trigger.cron, error) from error
        logger.info("put schedule %s (%s)", sid, trigger.cron)
        kept.append(sid)
    await delete_schedules(client, workflow_id, range(len(triggers), previous_count))
    return kept


async def _put_schedule(
    client: Client, sid: str, schedule: Schedule, name: str, workflow_id: str
) -> None:
    """Create the schedule, or replace the one with that id."""
    try:
        await client.create_schedule(
            sid, schedule, memo={"definition_name": name, "workflow_id": workflow_id}
        )
    except ScheduleAlreadyRunningError:

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(sid).update(replace)


async def delete_schedules(
    client: Client, workflow_id: str, indexes: Iterable[int]
) -> list[str]:
    """Delete the schedules at `indexes`; return the ids of those that
    existed (a missing one is skipped)."""
    deleted: list[str] = []
    for index in indexes:
        sid = schedule_id(workflow_id, index)
        try:
            await client.get_schedule_handle(sid).delete()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            continue
        logger.info("deleted schedule %s", sid)
        deleted.append(sid)
    return deleted


async def listed_schedule_indexes(client: Client, workflow_id: str) -> set[int]:
    """Return the indexes of the definition's schedules that Temporal lists.

    A version that was rolled back is no longer stored, so its trigger count
    cannot show which schedules a failed roll-back left, and the list can. The
    list comes from visibility and lags a create by up to a second, so
    callers add the indexes of the stored version too.
    """
    prefix = schedule_id(workflow_id, 0).removesuffix("0")
    found: set[int] = set()
    async for listed in await client.list_schedules():
        suffix = listed.id.removeprefix(prefix)
        if listed.id.startswith(prefix) and suffix.isdigit():
            found.add(int(suffix))
    return found


def schedule_count(definition: WorkflowDefinition | None) -> int:
    if definition is None:
        return 0
    return sum(1 for t in definition.triggers if t.type == "schedule")


async def describe_queue_stats(
    client: Client, namespace: str, queue: str
) -> dict[str, Any]:
    """Return pollers and backlog of `queue` for workflow and activity tasks."""
    described: dict[str, Any] = {"task_queue": queue}
    for label, kind in (
        ("workflow", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        ("activity", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
    ):
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=namespace,
                task_queue=TaskQueue(name=queue),
                task_queue_type=kind,
                report_stats=True,
            ),
            timeout=_RPC_TIMEOUT,
        )
        stats = response.stats
        backlog_age = (
            stats.approximate_backlog_age.ToTimedelta().total_seconds()
            if stats.HasField("approximate_backlog_age")
            else 0.0
        )
        described[label] = {
            "pollers": [
                {
                    "identity": p.identity,
                    "last_access_time": (
                        p.last_access_time.ToDatetime(tzinfo=UTC)
                        if p.HasField("last_access_time")
                        else None
                    ),
                }
                for p in response.pollers
            ],
            "backlog": int(stats.approximate_backlog_count),
            "backlog_age_seconds": backlog_age,
            "tasks_add_rate": round(stats.tasks_add_rate, 3),
            "tasks_dispatch_rate": round(stats.tasks_dispatch_rate, 3),
        }
    described["read_at"] = datetime.now(UTC)
    return described
