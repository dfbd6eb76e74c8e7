"""Workflow tools: definitions, executions, agent assignment, queues, audit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from temporalio import exceptions as temporal_errors
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.queues import ALL_QUEUES, NEURAL_NODE_PREFIX
from app.contracts.swarm import AGENT_TYPES
from app.contracts.types import UtcDateTime
from app.contracts.workflows import (
    AgentAssignment,
    AuditEntry,
    ExecutionState,
    WorkflowDefinition,
)
from app.sandbox.secrets import SealError, load_key
from app.suggest import closest_name
from app.tools.registry import ToolContext, ToolError, arguments_error, tool
from app.workflows import engine, locks, store
from app.workflows.agents import AgentResolution, resolve_agent
from app.workflows.secrets import (
    DefinitionSecretError,
    has_plain_secrets,
    seal_plain_values,
)
from app.workflows.steps import describe_step_types, step_type_names
from app.workflows.validation import (
    DefinitionError,
    agent_type_problem,
    check_cron_fields,
    check_step_params,
    validate_definition,
    workflow_name_problems,
)

logger = logging.getLogger(__name__)

FEATURES = ["message_queues", "audit_trail", "agent_assignment"]


def _not_found(error: store.NotFoundError) -> ToolError:
    return ToolError(str(error), kind="not_found")


class WorkflowCreateResult(BaseModel):
    workflow_id: str
    name: str
    version: int
    new_version: bool = Field(description="False when the body was unchanged.")
    status: str
    features: list[str]
    steps: int
    schedules: list[str] = Field(
        default_factory=list, description="Temporal Schedule ids of the triggers."
    )


# The Temporal server rejects a payload over 2 MiB (its default
# limit.blobSize.error). A run's input carries the definition together with
# its input_data, and sealing secrets makes the stored body larger, so a
# definition may use half of that and leaves the rest to them.
MAX_DEFINITION_BYTES = 1024 * 1024


def check_definition(definition: WorkflowDefinition) -> None:
    """Raise a ToolError naming every problem of `definition`."""
    size = len(definition.model_dump_json().encode())
    if size > MAX_DEFINITION_BYTES:
        raise ToolError(
            f"the definition is {size} bytes as JSON, over the limit of "
            f"{MAX_DEFINITION_BYTES} bytes, because each run carries it in a "
            "Temporal payload of at most 2 MiB; make the params smaller, for "
            "example by passing large values as input_data or as storage "
            "objects that a step reads",
            kind="invalid_argument",
        )
    problems = workflow_name_problems(definition.name)
    try:
        validate_definition(definition, step_type_names())
    except DefinitionError as error:
        problems += error.problems
    if problems:
        raise ToolError(str(DefinitionError(problems)), kind="invalid_argument")
    try:
        # Only here, not in the workflow, so that recorded runs still replay.
        check_cron_fields(definition)
        check_step_params(definition)
    except DefinitionError as error:
        raise ToolError(str(error), kind="invalid_argument") from None


@tool("workflow_create", group="workflows")
async def workflow_create(
    ctx: ToolContext, args: WorkflowDefinition
) -> WorkflowCreateResult:
    """Validate and store a workflow definition: steps (name, type, agent or
    agent_type, depends_on, params with {{input.FIELD}} and
    {{steps.NAME.output.FIELD}} references, timeout seconds, retry_attempts),
    triggers ({type: schedule, cron} creates a Temporal Schedule), priority
    0-10, description, metadata. The same name with a changed body makes a new
    version. Returns workflow_id."""
    check_definition(args)
    async with _definition_locked(ctx, args.name):
        return await _create(ctx, args)


@contextlib.asynccontextmanager
async def _definition_locked(ctx: ToolContext, name: str) -> AsyncIterator[None]:
    """Hold the lock of definition `name` (see app.workflows.locks), or raise
    a conflict when another call keeps it."""
    try:
        async with locks.definition_lock(ctx.database_url, name):
            yield
    except locks.DefinitionBusyError as error:
        raise ToolError(str(error), kind="conflict") from None


async def _create(ctx: ToolContext, args: WorkflowDefinition) -> WorkflowCreateResult:
    """Store the checked definition and make its schedules, all or nothing:
    when a schedule cannot be made, the new version and the schedules changed
    so far are rolled back. The caller holds the definition's lock."""
    url = ctx.database_url
    previous = await asyncio.to_thread(_previous_by_name, url, args.name)
    try:
        key = load_key(ctx.settings)
        row, version, is_new, stored = await asyncio.to_thread(
            store.save_definition, url, args, key=key
        )
    except DefinitionSecretError as error:
        raise ToolError(str(error), kind="invalid_argument") from None
    except SealError as error:
        raise ToolError(str(error), kind="failed") from None
    except store.ConflictError as error:
        raise ToolError(str(error), kind="conflict") from None
    schedules: list[str] = []
    count = engine.schedule_count(args)
    previous_count = engine.schedule_count(previous.definition)
    if count or previous_count:
        client = await ctx.client()
        try:
            # The sealed body, so that schedules and their runs carry no secret.
            schedules = await engine.sync_schedules(
                client, row.id, version, stored, previous_count, ctx.groups
            )
        except (engine.ScheduleSyncError, RPCError) as error:
            await _roll_back(ctx, row.id, version, is_new, previous, count)
            raise _schedule_error(error) from None
    return WorkflowCreateResult(
        workflow_id=row.id,
        name=row.name,
        version=version,
        new_version=is_new,
        status=row.status,
        features=FEATURES,
        steps=len(args.steps),
        schedules=schedules,
    )


@dataclass(frozen=True)
class _Previous:
    """The stored definition of a name before a create: its row's status, and
    its latest version when it is active (which then has schedules)."""

    status: str | None = None
    version: int | None = None
    definition: WorkflowDefinition | None = None


def _previous_by_name(url: str, name: str) -> _Previous:
    from sqlmodel import select

    from app.db import session_scope
    from app.workflows.models import WorkflowDefinitionRow

    with session_scope(url) as session:
        row = session.exec(
            select(WorkflowDefinitionRow).where(WorkflowDefinitionRow.name == name)
        ).first()
        if row is None:
            return _Previous()
        row_id, status = row.id, row.status
    if status != "active":
        return _Previous(status=status)
    _, version, definition = store.get_definition(url, row_id)
    return _Previous(status=status, version=version, definition=definition)


async def _roll_back(
    ctx: ToolContext,
    workflow_id: str,
    version: int,
    is_new: bool,
    previous: _Previous,
    count: int,
) -> None:
    """Put the schedules back as the previous version had them, then drop the
    new version. A failure here is only logged, because the caller reports
    the error that caused the roll-back."""
    total = max(count, engine.schedule_count(previous.definition))
    try:
        if previous.definition is not None and previous.version is not None:
            await engine.sync_schedules(
                await ctx.client(),
                workflow_id,
                previous.version,
                previous.definition,
                total,
                ctx.groups,
            )
        else:
            await engine.delete_schedules(await ctx.client(), workflow_id, range(total))
    except (engine.ScheduleSyncError, RPCError):
        logger.exception("cannot restore the schedules of workflow %s", workflow_id)
    if is_new:
        await asyncio.to_thread(
            store.discard_version,
            ctx.database_url,
            workflow_id,
            version,
            previous.status,
        )
    logger.warning(
        "rolled back version %d of workflow %s: a schedule failed", version, workflow_id
    )


def _schedule_error(error: Exception) -> ToolError:
    if (
        isinstance(error, engine.ScheduleSyncError)
        and error.error.status == RPCStatusCode.RESOURCE_EXHAUSTED
    ):
        # Each schedule carries the whole definition, with the input_data of
        # every trigger, so a large one fails at its first schedule.
        return ToolError(
            f"triggers.{error.index}: the Temporal server refused the schedule "
            f"as too large ({error.error.message}). Every schedule carries the "
            "whole definition, including each trigger's input_data; nothing was "
            "stored and the schedules are as before. Make the definition or the "
            "triggers' input_data smaller, and pass large inputs as storage "
            "objects that a step reads",
            kind="invalid_argument",
        )
    if isinstance(error, engine.ScheduleSyncError):
        rejected = error.error.status == RPCStatusCode.INVALID_ARGUMENT
        return ToolError(
            f"triggers.{error.index}.cron: the Temporal server "
            f"{'rejected' if rejected else 'could not make'} the schedule for "
            f"{error.cron!r}: {error.error.message}; nothing was stored and the "
            "schedules are as before. "
            + (
                "Fix the cron and create the workflow again"
                if rejected
                else "Try again once the server is reachable"
            ),
            kind="invalid_argument" if rejected else "unavailable",
        )
    message = error.message if isinstance(error, RPCError) else str(error)
    return ToolError(
        f"cannot remove the schedules past the last trigger: {message}; nothing "
        "was stored and the schedules are as before. Try again once the Temporal "
        "server is reachable",
        kind="unavailable",
    )


class WorkflowDeleteInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workflow_id: str = Field(description="Id returned by workflow_create.")


class WorkflowDeleteResult(BaseModel):
    workflow_id: str
    name: str
    status: str
    schedules_deleted: list[str] = Field(
        description="Temporal Schedule ids of the triggers that existed and "
        "are now deleted."
    )


@tool("workflow_delete", group="workflows")
async def workflow_delete(
    ctx: ToolContext, args: WorkflowDeleteInput
) -> WorkflowDeleteResult:
    """Delete a stored workflow definition: it can no longer be executed, and
    the Temporal Schedules of its schedule triggers are deleted. Its versions,
    executions and audit trail stay readable; creating a definition of the
    same name makes it active again as a new version."""
    url = ctx.database_url
    try:
        row, _, _ = await asyncio.to_thread(store.get_definition, url, args.workflow_id)
    except store.NotFoundError as error:
        raise _not_found(error) from None
    async with _definition_locked(ctx, row.name):
        # Read again under the lock: a create may have added a version with
        # more schedule triggers meanwhile.
        row, _, definition = await asyncio.to_thread(
            store.get_definition, url, args.workflow_id
        )
        deleted: list[str] = []
        # Also for a definition deleted before, so that deleting it again
        # removes schedules that outlived it (a failed roll-back can leave some).
        client = await ctx.client()
        indexes = set(range(engine.schedule_count(definition)))
        indexes |= await engine.listed_schedule_indexes(client, args.workflow_id)
        if indexes:
            # Schedules first: a definition marked deleted must not start again.
            deleted = await engine.delete_schedules(
                client, args.workflow_id, sorted(indexes)
            )
        row = await asyncio.to_thread(store.delete_definition, url, args.workflow_id)
    return WorkflowDeleteResult(
        workflow_id=row.id, name=row.name, status=row.status, schedules_deleted=deleted
    )


class WorkflowExecuteInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    workflow_id: str = Field(description="Id returned by workflow_create.")
    input_data: dict[str, Any] = Field(
        default_factory=dict, description="Values for {{input.FIELD}} references."
    )
    run_async: bool = Field(
        True,
        alias="async",
        strict=True,
        description="False waits for the run and returns its final state.",
    )


class WorkflowExecuteResult(BaseModel):
    execution_id: str
    workflow_id: str
    version: int
    status: str
    run_id: str | None = None
    result: ExecutionState | None = None


@tool("workflow_execute", group="workflows")
async def workflow_execute(
    ctx: ToolContext, args: WorkflowExecuteInput
) -> WorkflowExecuteResult:
    """Start a Temporal run of the latest version of a stored workflow and
    return execution_id. With async=false, wait for the run and return every
    step's final state; a failed run is an error naming the failed step, and
    a cancelled, terminated or timed-out run returns with that status."""
    try:
        row, version, definition = await asyncio.to_thread(
            store.get_definition, ctx.database_url, args.workflow_id
        )
    except store.NotFoundError as error:
        raise _not_found(error) from None
    if row.status != "active":
        raise ToolError(
            f"workflow {args.workflow_id!r} is {row.status}; create it again to run it",
            kind="conflict",
        )
    # A definition stored before sealing existed: seal its values for the run.
    if has_plain_secrets(definition):
        definition = seal_plain_values(load_key(ctx.settings), row.id, definition)
    client = await ctx.client()
    try:
        handle = await engine.start_execution(
            client, row.id, version, definition, args.input_data, groups=ctx.groups
        )
    except RPCError as error:
        if not _too_large(error):
            raise
        raise ToolError(
            f"the Temporal server rejected the start of workflow {row.id} as too "
            f"large ({error.message}): a run's input, the definition together "
            "with input_data, must fit in 2 MiB. Make input_data smaller, and "
            "pass large values as storage objects that a step reads; nothing "
            "was started",
            kind="invalid_argument",
        ) from None
    result = WorkflowExecuteResult(
        execution_id=handle.id,
        workflow_id=row.id,
        version=version,
        status="running",
        run_id=handle.result_run_id,
    )
    if args.run_async:
        return result
    try:
        final = await handle.result()
    except WorkflowFailureError as error:
        cause = error.cause
        closed = await _closed_without_result(ctx, handle.id, cause)
        if closed is not None:
            result.status = closed.status
            result.result = closed
            return result
        raise ToolError(
            f"execution {handle.id} of workflow {row.id} failed: "
            f"{cause.message if hasattr(cause, 'message') else cause}; see the "
            "steps with workflow_status",
            kind="failed",
        ) from None
    if final.omitted:
        # The run's result left out what Temporal could not carry; the
        # database has the whole execution.
        final = await asyncio.to_thread(
            store.get_execution, ctx.database_url, handle.id
        )
    result.status = final.status
    result.result = final
    return result


async def _closed_without_result(
    ctx: ToolContext, execution_id: str, cause: BaseException | None
) -> ExecutionState | None:
    """Read the recorded state of a run that was cancelled, terminated or
    timed out, or return None when the run failed.

    Such a run did not fail, so it is reported the way workflow_status reports
    it: with its status and every step's state.
    """
    if isinstance(
        cause, (temporal_errors.TerminatedError, temporal_errors.TimeoutError)
    ):
        # The server closed the run without running its code again.
        await _record_unrecorded_closes(ctx, [execution_id])
    elif not isinstance(cause, temporal_errors.CancelledError):
        return None
    state = await asyncio.to_thread(store.get_execution, ctx.database_url, execution_id)
    # A close that could not be recorded is reported as the failure it is.
    return None if state.status == "running" else state


def _too_large(error: RPCError) -> bool:
    """Return whether the server rejected a request for its size: a payload
    over its blob size limit, or a message over the gRPC limit."""
    statuses = (RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.RESOURCE_EXHAUSTED)
    message = error.message.lower()
    return error.status in statuses and (
        "size exceeds limit" in message or "larger than max" in message
    )


class WorkflowStatusInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workflow_id: str | None = None
    # A blank id would reach Temporal as "WorkflowId is not set" (a 500).
    execution_id: str | None = Field(None, min_length=1)
    include_metrics: bool = Field(False, strict=True)

    @model_validator(mode="after")
    def _needs_target(self) -> WorkflowStatusInput:
        if self.workflow_id is None and self.execution_id is None:
            raise arguments_error(
                "pass workflow_id to list a workflow's recent executions, or "
                "execution_id for one execution's steps",
                "workflow_id",
                "execution_id",
            )
        return self


class ExecutionSummary(BaseModel):
    execution_id: str
    workflow_id: str
    version: int
    name: str
    status: str
    started_at: UtcDateTime | None = None
    closed_at: UtcDateTime | None = None
    error: str | None = None


class WorkflowStatusResult(BaseModel):
    execution: ExecutionState | None = None
    source: Literal["live", "database"] | None = Field(
        None, description="live: queried from the running workflow."
    )
    executions: list[ExecutionSummary] = Field(default_factory=list)
    metrics: dict[str, Any] | None = None


def execution_metrics(state: ExecutionState) -> dict[str, Any]:
    """Durations, attempt totals and step counts by status."""
    counts: dict[str, int] = {}
    durations: dict[str, float] = {}
    for step in state.steps:
        counts[step.status] = counts.get(step.status, 0) + 1
        if step.started_at and step.finished_at:
            durations[step.name] = round(
                (step.finished_at - step.started_at).total_seconds() * 1000, 3
            )
    total = None
    if state.started_at and state.closed_at:
        total = round((state.closed_at - state.started_at).total_seconds() * 1000, 3)
    return {
        "duration_ms": total,
        "step_duration_ms": durations,
        "steps_by_status": counts,
        "attempts": sum(s.attempts for s in state.steps),
    }


@tool("workflow_status", group="workflows")
async def workflow_status(
    ctx: ToolContext, args: WorkflowStatusInput
) -> WorkflowStatusResult:
    """Return one execution with per-step state (pending, running, completed,
    failed, skipped, cancelled; times, attempts, outputs), read live from a
    running workflow or from the database once it closed; or, without
    execution_id, the recent executions of workflow_id."""
    url = ctx.database_url
    if args.workflow_id is not None:
        await _require_definition(url, args.workflow_id)
    if args.execution_id is None:
        rows = await asyncio.to_thread(
            store.list_executions, url, workflow_id=args.workflow_id, limit=20
        )
        running = [r.id for r in rows if r.status == "running"]
        if running and await _record_unrecorded_closes(ctx, running):
            rows = await asyncio.to_thread(
                store.list_executions, url, workflow_id=args.workflow_id, limit=20
            )
        return WorkflowStatusResult(
            executions=[
                ExecutionSummary(
                    execution_id=r.id,
                    workflow_id=r.definition_id,
                    version=r.version,
                    name=r.name,
                    status=r.status,
                    started_at=r.started_at,
                    closed_at=r.closed_at,
                    error=r.error,
                )
                for r in rows
            ]
        )
    state = await engine.live_state(await ctx.client(), args.execution_id)
    source: Literal["live", "database"] = "live"
    if state is None:
        source = "database"
        try:
            state = await asyncio.to_thread(store.get_execution, url, args.execution_id)
        except store.NotFoundError as error:
            raise _not_found(error) from None
        if state.status == "running" and await _record_unrecorded_closes(
            ctx, [args.execution_id]
        ):
            state = await asyncio.to_thread(store.get_execution, url, args.execution_id)
    if args.workflow_id is not None and state.workflow_id != args.workflow_id:
        raise ToolError(
            f"execution {args.execution_id!r} belongs to workflow "
            f"{state.workflow_id!r}, not {args.workflow_id!r}",
            kind="invalid_argument",
        )
    metrics = execution_metrics(state) if args.include_metrics else None
    return WorkflowStatusResult(execution=state, source=source, metrics=metrics)


async def _record_unrecorded_closes(ctx: ToolContext, execution_ids: list[str]) -> bool:
    """Record the closes of the runs that the database still has as running
    and Temporal terminated or timed out; return whether any was recorded."""
    client = await ctx.client()
    recorded = False
    for execution_id in execution_ids:
        closed = await engine.unrecorded_close(client, execution_id)
        if closed is None:
            continue
        status, error, closed_at = closed
        if await asyncio.to_thread(
            store.close_abandoned,
            ctx.database_url,
            execution_id,
            status,
            error,
            closed_at,
        ):
            logger.warning("recorded execution %s as %s", execution_id, status)
            recorded = True
    return recorded


async def _require_definition(url: str, workflow_id: str) -> None:
    """Raise not_found when no definition has this id."""
    try:
        await asyncio.to_thread(store.get_definition, url, workflow_id)
    except store.NotFoundError as error:
        raise _not_found(error) from None


class WorkflowListInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    limit: int = Field(10, ge=1, le=1000, strict=True)
    offset: int = Field(0, ge=0, strict=True)
    status: (
        Literal[
            "active",
            "deleted",
            "running",
            "completed",
            "failed",
            "cancelled",
            "terminated",
            "timed_out",
        ]
        | None
    ) = Field(
        None,
        description="active or deleted (the definition), or running, completed, "
        "failed, cancelled, terminated, timed_out (its latest execution).",
    )


class WorkflowListItem(BaseModel):
    workflow_id: str
    name: str
    description: str | None = None
    priority: int
    version: int
    status: str
    # Typed, so that a time read back from SQLite without its offset is
    # written as UTC with `Z`, as every other tool writes times.
    created_at: UtcDateTime | None = None
    updated_at: UtcDateTime | None = None
    last_execution_id: str | None = None
    last_execution_status: str | None = None


class WorkflowListResult(BaseModel):
    workflows: list[WorkflowListItem]
    count: int
    limit: int
    offset: int


@tool("workflow_list", group="workflows")
async def workflow_list(
    ctx: ToolContext, args: WorkflowListInput
) -> WorkflowListResult:
    """List stored workflow definitions, newest first, with their latest
    version and latest execution."""

    def list_definitions() -> list[dict[str, Any]]:
        return store.list_definitions(
            ctx.database_url, limit=args.limit, offset=args.offset, status=args.status
        )

    listed = await asyncio.to_thread(list_definitions)
    running = [
        item["last_execution_id"]
        for item in listed
        if item["last_execution_status"] == "running"
    ]
    if running and await _record_unrecorded_closes(ctx, running):
        listed = await asyncio.to_thread(list_definitions)
    return WorkflowListResult(
        workflows=[WorkflowListItem.model_validate(item) for item in listed],
        count=len(listed),
        limit=args.limit,
        offset=args.offset,
    )


class WorkflowAgentAssignInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task_id: str = Field(
        description="EXECUTION_ID/STEP for a pending step of a running execution, "
        "or WORKFLOW_ID/STEP to change the definition (a new version)."
    )
    agent_type: str | None = Field(
        None,
        description="The agent type to run the step: "
        f"{', '.join(AGENT_TYPES)}. A call without it is rejected.",
    )


class WorkflowAgentAssignResult(BaseModel):
    task_id: str
    step: str
    agent_type: str | None
    agent_id: str | None = Field(
        description="The resolved swarm agent; None while no swarm agent matches."
    )
    swarm_id: str | None = Field(None, description="The resolved agent's swarm.")
    unresolved_reason: str | None = Field(
        None, description="Why no swarm agent matches, when agent_id is None."
    )
    execution_id: str | None = None
    workflow_id: str
    version: int | None = None


@tool("workflow_agent_assign", group="workflows")
async def workflow_agent_assign(
    ctx: ToolContext, args: WorkflowAgentAssignInput
) -> WorkflowAgentAssignResult:
    """Assign a step to an agent type, resolved to an agent of that type in an
    active swarm, idle first, then least loaded (agent_id None and
    unresolved_reason when none exists). For EXECUTION_ID/STEP the pending step of
    the running execution changes now; for WORKFLOW_ID/STEP the definition gets
    a new version that later runs use. The assignment is audited."""
    owner, sep, step = args.task_id.partition("/")
    if not sep or not owner or not step:
        raise ToolError(
            f"invalid task_id {args.task_id!r}: use EXECUTION_ID/STEP or "
            "WORKFLOW_ID/STEP",
            kind="invalid_argument",
        )
    if args.agent_type is None:
        raise ToolError(
            f"agent_type is missing for step {step!r}: give the agent type to run "
            f"it, one of {', '.join(AGENT_TYPES)}",
            kind="invalid_argument",
        )
    if args.agent_type not in AGENT_TYPES:
        raise ToolError(
            agent_type_problem(f"agent_type of step {step!r}", args.agent_type),
            kind="invalid_argument",
        )
    url = ctx.database_url
    resolution = await asyncio.to_thread(
        resolve_agent, ctx.settings, None, args.agent_type
    )
    agent_id = resolution.agent_id
    if owner.startswith("wf_"):
        return await _assign_in_definition(ctx, owner, step, args, resolution)
    try:
        state = await asyncio.to_thread(store.get_execution, url, owner)
    except store.NotFoundError as error:
        named = await asyncio.to_thread(store.definition_id_named, url, owner)
        if named is not None:
            raise ToolError(
                f"execution {owner!r} not found: that is the name of workflow "
                f"{named!r}; use {named}/{step} to assign an agent in its "
                "definition",
                kind="not_found",
            ) from None
        raise _not_found(error) from None
    names = [s.name for s in state.steps]
    if step not in names:
        raise ToolError(
            f"execution {owner!r} has no step {step!r}; its steps: {names}",
            kind="not_found",
        )
    if state.status != "running":
        raise ToolError(
            f"execution {owner!r} is {state.status}; assign agents to a running "
            f"execution, or use {state.workflow_id}/{step} to change the definition",
            kind="conflict",
        )
    handle = (await ctx.client()).get_workflow_handle(owner)
    try:
        await handle.execute_update(
            "assign_agent",
            AgentAssignment(step=step, agent_type=args.agent_type, agent_id=agent_id),
        )
    except RPCError as error:
        raise ToolError(
            f"cannot assign step {step!r} of execution {owner!r}: {error.message}",
            kind="conflict",
        ) from None
    except WorkflowUpdateFailedError as error:
        # The workflow's validator rejected it; its message is the cause.
        raise ToolError(
            f"cannot assign step {step!r} of execution {owner!r}: "
            f"{error.cause.message if hasattr(error.cause, 'message') else error}",
            kind="conflict",
        ) from None
    await asyncio.to_thread(
        store.update_step_agent, url, owner, step, args.agent_type, agent_id
    )
    await asyncio.to_thread(
        store.append_audit,
        url,
        AuditEntry(
            execution_id=owner,
            workflow_id=state.workflow_id,
            step=step,
            event="step.agent_assigned",
            status="pending",
            at=datetime.now(UTC),
            details={
                "agent_type": args.agent_type,
                "agent_id": agent_id,
                "swarm_id": resolution.swarm_id,
                "unresolved_reason": resolution.reason,
            },
        ),
    )
    assert state.workflow_id is not None
    return WorkflowAgentAssignResult(
        task_id=args.task_id,
        step=step,
        agent_type=args.agent_type,
        agent_id=agent_id,
        swarm_id=resolution.swarm_id,
        unresolved_reason=resolution.reason,
        execution_id=owner,
        workflow_id=state.workflow_id,
        version=state.version,
    )


async def _assign_in_definition(
    ctx: ToolContext,
    workflow_id: str,
    step: str,
    args: WorkflowAgentAssignInput,
    resolution: AgentResolution,
) -> WorkflowAgentAssignResult:
    url = ctx.database_url
    try:
        row, _, _ = await asyncio.to_thread(store.get_definition, url, workflow_id)
    except store.NotFoundError as error:
        raise _not_found(error) from None
    async with _definition_locked(ctx, row.name):
        row, _, definition = await asyncio.to_thread(
            store.get_definition, url, workflow_id
        )
        # A new version would make a deleted definition active again and
        # bring back the schedules that workflow_delete removed.
        if row.status != "active":
            raise ToolError(
                f"workflow {workflow_id!r} is {row.status}; create it again with "
                "workflow_create before assigning agents to its steps",
                kind="conflict",
            )
        names = [s.name for s in definition.steps]
        if step not in names:
            raise ToolError(
                f"workflow {workflow_id!r} has no step {step!r}; its steps: {names}",
                kind="not_found",
            )
        changed = definition.model_copy(deep=True)
        for spec in changed.steps:
            if spec.name == step:
                spec.agent_type = args.agent_type
                spec.agent = None
        check_definition(changed)
        created = await _create(ctx, changed)
    return WorkflowAgentAssignResult(
        task_id=args.task_id,
        step=step,
        agent_type=args.agent_type,
        # Executions of the new version resolve the agent again when they start.
        agent_id=resolution.agent_id,
        swarm_id=resolution.swarm_id,
        unresolved_reason=resolution.reason,
        workflow_id=workflow_id,
        version=created.version,
    )


class WorkflowQueueStatusInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    queue_name: str | None = Field(
        None,
        description="A project queue, a step type's queue, or nexus-neural-NODE_ID "
        "for a neural cluster node. Default: every project queue.",
    )
    include_messages: bool = Field(
        False, strict=True, description="Also list the steps running on each queue."
    )


class WorkflowQueueStatusResult(BaseModel):
    queues: list[dict[str, Any]]


@tool("workflow_queue_status", group="workflows")
async def workflow_queue_status(
    ctx: ToolContext, args: WorkflowQueueStatusInput
) -> WorkflowQueueStatusResult:
    """Report each task queue's backlog (approximate count and age, add and
    dispatch rates) and pollers for workflow and activity tasks, read live from
    Temporal; include_messages adds the steps running on the queue."""
    if args.queue_name:
        _require_known_queue(args.queue_name)
    client = await ctx.client()
    names = [args.queue_name] if args.queue_name else list(ALL_QUEUES)
    described: list[dict[str, Any]] = []
    for name in names:
        try:
            queue = await engine.describe_queue_stats(
                client, ctx.settings.namespace, name
            )
        except RPCError as error:
            raise ToolError(
                f"cannot describe task queue {name!r}: {error.message}",
                kind="unavailable",
            ) from None
        if args.include_messages:
            queue["messages"] = await asyncio.to_thread(
                store.running_steps_on_queue, ctx.database_url, name, 100
            )
        described.append(queue)
    return WorkflowQueueStatusResult(queues=described)


def _require_known_queue(name: str) -> None:
    """Reject a queue that no worker of this platform polls: the server
    describes any name, so a mistyped one would report no pollers and no
    backlog as if it were an idle queue."""
    known = sorted(set(ALL_QUEUES) | {t["task_queue"] for t in describe_step_types()})
    node_id = name.removeprefix(NEURAL_NODE_PREFIX)
    if name in known or (node_id and node_id != name):
        return
    close = closest_name(name, known)
    hint = f" (did you mean {close}?)" if close else ""
    raise ToolError(
        f"queue_name: unknown task queue {name!r}{hint}; use one of "
        f"{', '.join(known)}, {NEURAL_NODE_PREFIX}NODE_ID for a neural cluster "
        "node, or leave queue_name out for the project queues",
        kind="invalid_argument",
    )


class WorkflowAuditTrailInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workflow_id: str | None = Field(None, description="Default: every workflow.")
    limit: int = Field(50, ge=1, le=10000, strict=True)
    start_time: UtcDateTime | None = Field(
        None, description="ISO 8601; only transitions at or after it."
    )


class AuditTrailEvent(BaseModel):
    id: int
    at: UtcDateTime
    workflow_id: str | None
    execution_id: str
    step: str | None
    event: str
    status: str
    attempt: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class WorkflowAuditTrailResult(BaseModel):
    events: list[AuditTrailEvent]
    count: int


@tool("workflow_audit_trail", group="workflows")
async def workflow_audit_trail(
    ctx: ToolContext, args: WorkflowAuditTrailInput
) -> WorkflowAuditTrailResult:
    """Return the ordered transitions (execution started, step running,
    completed, failed, skipped, cancelled, agent assigned) of every execution of
    a workflow, oldest first, merged across executions."""
    if args.workflow_id is not None:
        await _require_definition(ctx.database_url, args.workflow_id)
    rows = await asyncio.to_thread(
        store.audit_trail,
        ctx.database_url,
        workflow_id=args.workflow_id,
        limit=args.limit,
        start_time=args.start_time,
    )
    events = [
        AuditTrailEvent(
            id=r.id or 0,
            at=r.at,
            workflow_id=r.definition_id,
            execution_id=r.execution_id,
            step=r.step,
            event=r.event,
            status=r.status,
            attempt=r.attempt,
            details=r.details,
        )
        for r in rows
    ]
    return WorkflowAuditTrailResult(events=events, count=len(events))
