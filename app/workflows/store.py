"""Database access for definitions, executions, step states and audit events."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from app.contracts.workflows import (
    AuditEntry,
    ExecutionState,
    ProgressRecord,
    StepState,
    WorkflowDefinition,
)
from app.db import session_scope
from app.db.models import utc_now
from app.realtime.output import insert_chunks
from app.workflows.locks import definition_lock_blocking
from app.workflows.models import (
    WorkflowAuditRow,
    WorkflowDefinitionRow,
    WorkflowExecutionRow,
    WorkflowStepRow,
    WorkflowVersionRow,
)
from app.workflows.secrets import DefinitionSecretError, seal_definition
from app.workflows.stream import progress_chunks

logger = logging.getLogger(__name__)


class NotFoundError(LookupError):
    """A definition or execution id that the database does not contain."""


def new_definition_id() -> str:
    return f"wf_{secrets.token_hex(6)}"


class DefinitionDeletedError(RuntimeError):
    """A run names a stored definition that was deleted, so it must not start."""


class DefinitionMismatchError(ValueError):
    """A run names a definition id and version that are not stored, or whose
    stored body differs from the run's definition."""


class ConflictError(RuntimeError):
    """Concurrent writes of one definition kept winning over this one."""


class SavedDefinition(NamedTuple):
    """The result of `save_definition`: the row, the version number, whether
    it is a new version, and the body as stored (secret values sealed)."""

    row: WorkflowDefinitionRow
    version: int
    is_new: bool
    definition: WorkflowDefinition


# Each round of concurrent writers of one name lets at least one commit, so
# this many attempts outlast that many writers at once.
SAVE_ATTEMPTS = 12


def save_definition(
    url: str, definition: WorkflowDefinition, *, key: bytes
) -> SavedDefinition:
    """Store `definition` under its name, its secret values sealed with `key`.

    The same name with a changed body makes a new version; an unchanged body
    keeps the latest version. A write that loses a race with a concurrent
    write of the same name (both inserted the same version number) is
    repeated on the newer state.

    Raises:
        DefinitionSecretError: a sealed value belongs to another definition.
        ConflictError: concurrent writes won every attempt.
    """
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            return _save_once(url, definition, key)
        except IntegrityError:
            logger.info(
                "workflow %r: a concurrent write took the same version; writing "
                "again (attempt %d of %d)",
                definition.name,
                attempt,
                SAVE_ATTEMPTS,
            )
    raise ConflictError(
        f"workflow {definition.name!r} was changed by {SAVE_ATTEMPTS} concurrent "
        "writes while this one was stored; nothing of this call was stored, "
        "send it again"
    )


def _save_once(url: str, definition: WorkflowDefinition, key: bytes) -> SavedDefinition:
    with session_scope(url) as session:
        # Row lock on PostgreSQL, so updates of one definition take turns;
        # SQLite has one writer at a time and the unique version catches it.
        row = session.exec(
            select(WorkflowDefinitionRow)
            .where(WorkflowDefinitionRow.name == definition.name)
            .with_for_update()
        ).first()
        definition_id = row.id if row is not None else new_definition_id()
        sealed, digest = seal_definition(key, definition_id, definition)
        spec = sealed.model_dump(mode="json")
        if row is None:
            row = WorkflowDefinitionRow(
                id=definition_id,
                name=definition.name,
                description=definition.description,
                priority=definition.priority,
                latest_version=1,
            )
            session.add(row)
            session.flush()
            session.add(
                WorkflowVersionRow(
                    definition_id=row.id, version=1, spec=spec, spec_hash=digest
                )
            )
            session.flush()
            return SavedDefinition(row, 1, True, sealed)
        latest = _version_row(session, row.id, row.latest_version)
        if latest.spec_hash == digest and row.status == "active":
            stored = WorkflowDefinition.model_validate(latest.spec)
            return SavedDefinition(row, row.latest_version, False, stored)
        row.latest_version += 1
        row.description = definition.description
        row.priority = definition.priority
        row.status = "active"
        row.updated_at = utc_now()
        session.add(row)
        session.add(
            WorkflowVersionRow(
                definition_id=row.id,
                version=row.latest_version,
                spec=spec,
                spec_hash=digest,
            )
        )
        session.flush()
        return SavedDefinition(row, row.latest_version, True, sealed)


def _version_row(session: Any, definition_id: str, version: int) -> WorkflowVersionRow:
    found = session.exec(
        select(WorkflowVersionRow).where(
            WorkflowVersionRow.definition_id == definition_id,
            WorkflowVersionRow.version == version,
        )
    ).first()
    if found is None:
        raise NotFoundError(
            f"workflow {definition_id!r} has no version {version}; list versions "
            "with `nexus workflow list`"
        )
    return found


def get_definition(
    url: str, workflow_id: str, version: int | None = None
) -> tuple[WorkflowDefinitionRow, int, WorkflowDefinition]:
    """Return the definition row, the version number and that version's body.

    Raises:
        NotFoundError: no such workflow id or version.
    """
    with session_scope(url) as session:
        row = session.get(WorkflowDefinitionRow, workflow_id)
        if row is None:
            named = _id_of_name(session, workflow_id)
            if named is not None:
                raise NotFoundError(
                    f"workflow {workflow_id!r} not found: that is the name of "
                    f"workflow {named!r}; pass its id as workflow_id"
                )
            raise NotFoundError(
                f"workflow {workflow_id!r} not found; create it with "
                "workflow_create or list ids with workflow_list"
            )
        chosen = version or row.latest_version
        spec = _version_row(session, workflow_id, chosen).spec
        return row, chosen, WorkflowDefinition.model_validate(spec)


def _id_of_name(session: Any, name: str) -> str | None:
    row = session.exec(
        select(WorkflowDefinitionRow).where(WorkflowDefinitionRow.name == name)
    ).first()
    return None if row is None else str(row.id)


def definition_id_named(url: str, name: str) -> str | None:
    """Return the id of the definition called `name`, or None."""
    with session_scope(url) as session:
        return _id_of_name(session, name)


def delete_definition(url: str, workflow_id: str) -> WorkflowDefinitionRow:
    with session_scope(url) as session:
        row = session.get(WorkflowDefinitionRow, workflow_id)
        if row is None:
            raise NotFoundError(f"workflow {workflow_id!r} not found")
        row.status = "deleted"
        row.updated_at = utc_now()
        session.add(row)
        return row


def list_definitions(
    url: str, *, limit: int, offset: int, status: str | None
) -> list[dict[str, Any]]:
    """Return definitions, newest first, each with its latest execution."""
    with session_scope(url) as session:
        query = select(WorkflowDefinitionRow).order_by(
            col(WorkflowDefinitionRow.created_at).desc(),
            col(WorkflowDefinitionRow.id),
        )
        rows = session.exec(query).all()
        listed: list[dict[str, Any]] = []
        for row in rows:
            last = session.exec(
                select(WorkflowExecutionRow)
                .where(WorkflowExecutionRow.definition_id == row.id)
                .order_by(col(WorkflowExecutionRow.started_at).desc())
                .limit(1)
            ).first()
            last_status = last.status if last else None
            if status is not None and status not in (row.status, last_status):
                continue
            listed.append(
                {
                    "workflow_id": row.id,
                    "name": row.name,
                    "description": row.description,
                    "priority": row.priority,
                    "version": row.latest_version,
                    "status": row.status,
                    "created_at": row.created_at,
                    "updated_at": row.updated_at,
                    "last_execution_id": last.id if last else None,
                    "last_execution_status": last_status,
                }
            )
        return listed[offset : offset + limit]


def register_execution(
    url: str, state: ExecutionState, definition: WorkflowDefinition, *, key: bytes
) -> tuple[str, int]:
    """Insert the execution and its pending steps; bind an unsaved snapshot to
    a stored definition first. Return (workflow_id, version).

    Idempotent: an activity retry finds the rows it wrote and keeps them.

    Raises:
        DefinitionBusyError: another call held the lock of the snapshot's
            name for longer than the wait.
        DefinitionMismatchError: the run names a definition id or version
            that is not stored, or its definition is not that version's body.
        DefinitionDeletedError: the run names a stored definition that is
            deleted, for example through a schedule left from before the
            delete; nothing is written.
    """
    workflow_id, version = state.workflow_id, state.version
    bound = workflow_id is not None and version is not None
    if workflow_id is None or version is None:
        # Under the name's lock, so that a create or delete of that name does
        # not interleave with this new version.
        with definition_lock_blocking(url, definition.name):
            saved = save_definition(url, definition, key=key)
        workflow_id, version = saved.row.id, saved.version
    with session_scope(url) as session:
        existing = session.get(WorkflowExecutionRow, state.execution_id)
        if existing is None and bound:
            _require_active(session, workflow_id, version)
            _require_same_body(session, workflow_id, version, definition, key)
        if existing is None:
            session.add(
                WorkflowExecutionRow(
                    id=state.execution_id,
                    run_id=state.run_id,
                    definition_id=workflow_id,
                    version=version,
                    name=state.name,
                    status=state.status,
                    priority=state.priority,
                    input_data=state.input_data,
                    started_at=state.started_at,
                )
            )
            for position, step in enumerate(state.steps):
                session.add(_step_row(state.execution_id, position, step))
    return workflow_id, version


def _require_active(session: Any, workflow_id: str, version: int) -> None:
    row = session.get(WorkflowDefinitionRow, workflow_id)
    if row is not None and row.status == "deleted":
        raise DefinitionDeletedError(
            f"workflow {workflow_id!r} ({row.name!r}) was deleted, so this run of "
            f"its version {version} is rejected; create the definition again with "
            "workflow_create to run it"
        )


def _require_same_body(
    session: Any,
    workflow_id: str,
    version: int,
    definition: WorkflowDefinition,
    key: bytes,
) -> None:
    """Reject a run that claims a definition id and version that do not exist,
    or whose definition is not that version's body. Such a run would be
    listed among that definition's executions with steps it does not have."""
    fix = (
        "start it with that version's definition, as workflow_execute does, or "
        "give only the definition to store it as a version of its name"
    )
    row = session.get(WorkflowDefinitionRow, workflow_id)
    if row is None:
        raise DefinitionMismatchError(
            f"workflow {workflow_id!r} not found, so this run cannot be one of its "
            f"executions; {fix}"
        )
    try:
        stored = _version_row(session, workflow_id, version)
    except NotFoundError:
        raise DefinitionMismatchError(
            f"workflow {workflow_id!r} ({row.name!r}) has no version {version} "
            f"(its latest is {row.latest_version}); {fix}"
        ) from None
    # Compared by the hash that versions use, through the model, so fields
    # added since the version was stored compare as their defaults. Secret
    # values compare by their plain value, sealed or not, because a version
    # stored before sealing existed runs with its values sealed.
    body = WorkflowDefinition.model_validate(stored.spec)
    try:
        same = (
            seal_definition(key, workflow_id, body)[1]
            == seal_definition(key, workflow_id, definition)[1]
        )
    except DefinitionSecretError:
        same = False
    if not same:
        raise DefinitionMismatchError(
            f"the definition of this run is not version {version} of workflow "
            f"{workflow_id!r} ({row.name!r}); {fix}"
        )


def _step_row(execution_id: str, position: int, step: StepState) -> WorkflowStepRow:
    row = WorkflowStepRow(
        execution_id=execution_id,
        position=position,
        name=step.name,
        type=step.type,
        status=step.status,
    )
    _copy_step(row, step)
    return row


def _copy_step(row: WorkflowStepRow, step: StepState) -> None:
    row.type = step.type
    row.status = step.status
    row.depends_on = list(step.depends_on)
    row.task_queue = step.task_queue
    row.agent = step.agent
    row.agent_type = step.agent_type
    row.agent_id = step.agent_id
    row.attempts = step.attempts
    row.started_at = step.started_at
    row.finished_at = step.finished_at
    row.output = step.output
    row.error = step.error


def record_progress(url: str, record: ProgressRecord) -> None:
    """Update the execution row and the changed steps, and append the events
    to the audit trail and the execution's output stream, in one
    transaction."""
    state = record.state
    with session_scope(url) as session:
        execution = session.get(WorkflowExecutionRow, state.execution_id)
        if execution is None:
            raise NotFoundError(
                f"execution {state.execution_id!r} was never registered"
            )
        execution.status = state.status
        execution.error = state.error
        execution.closed_at = state.closed_at
        execution.updated_at = utc_now()
        session.add(execution)
        steps = {s.name: s for s in state.steps}
        if record.changed_steps:
            rows = session.exec(
                select(WorkflowStepRow).where(
                    WorkflowStepRow.execution_id == state.execution_id,
                    col(WorkflowStepRow.name).in_(record.changed_steps),
                )
            ).all()
            for row in rows:
                _copy_step(row, steps[row.name])
                session.add(row)
        for entry in record.events:
            session.add(_audit_row(entry, execution.definition_id))
        insert_chunks(
            session.connection(),
            "workflow",
            state.execution_id,
            progress_chunks(record),
        )


def _audit_row(entry: AuditEntry, definition_id: str | None) -> WorkflowAuditRow:
    return WorkflowAuditRow(
        definition_id=entry.workflow_id or definition_id,
        execution_id=entry.execution_id,
        step=entry.step,
        event=entry.event,
        status=entry.status,
        at=entry.at,
        attempt=entry.attempt,
        details=entry.details,
    )


def append_audit(url: str, entry: AuditEntry) -> None:
    with session_scope(url) as session:
        session.add(_audit_row(entry, entry.workflow_id))


def get_execution(url: str, execution_id: str) -> ExecutionState:
    """Return an execution with its steps as last persisted.

    Raises:
        NotFoundError: no such execution.
    """
    with session_scope(url) as session:
        row = session.get(WorkflowExecutionRow, execution_id)
        if row is None:
            raise NotFoundError(
                f"execution {execution_id!r} not found; list executions with "
                "workflow_status and a workflow_id"
            )
        steps = session.exec(
            select(WorkflowStepRow)
            .where(WorkflowStepRow.execution_id == execution_id)
            .order_by(col(WorkflowStepRow.position))
        ).all()
        return ExecutionState(
            execution_id=row.id,
            run_id=row.run_id,
            workflow_id=row.definition_id,
            version=row.version,
            name=row.name,
            status=row.status,
            priority=row.priority,
            input_data=row.input_data,
            started_at=row.started_at,
            closed_at=row.closed_at,
            error=row.error,
            steps=[
                StepState(
                    name=s.name,
                    type=s.type,
                    status=s.status,
                    depends_on=s.depends_on,
                    task_queue=s.task_queue,
                    agent=s.agent,
                    agent_type=s.agent_type,
                    agent_id=s.agent_id,
                    attempts=s.attempts,
                    started_at=s.started_at,
                    finished_at=s.finished_at,
                    output=s.output,
                    error=s.error,
                )
                for s in steps
            ],
        )


def close_abandoned(
    url: str, execution_id: str, status: str, error: str, closed_at: datetime
) -> bool:
    """Record that Temporal closed a run that could not record it, such as a
    terminated one: the execution gets `status`, its running steps become
    cancelled and its pending steps skipped. Returns False, changing
    nothing, when the row's status is no longer running."""
    with session_scope(url) as session:
        row = session.get(WorkflowExecutionRow, execution_id)
        if row is None or row.status != "running":
            return False
        row.status = status
        row.error = error
        row.closed_at = closed_at
        row.updated_at = utc_now()
        session.add(row)
        steps = session.exec(
            select(WorkflowStepRow).where(
                WorkflowStepRow.execution_id == execution_id,
                col(WorkflowStepRow.status).in_(["running", "pending"]),
            )
        ).all()
        for step in steps:
            if step.status == "running":
                step.status = "cancelled"
                step.error = f"cancelled because {error}"
            else:
                step.status = "skipped"
                step.error = f"skipped because {error}"
            step.finished_at = closed_at
            session.add(step)
        session.add(
            WorkflowAuditRow(
                definition_id=row.definition_id,
                execution_id=execution_id,
                event=f"execution.{status}",
                status=status,
                at=closed_at,
                details={"error": error},
            )
        )
    return True


def list_executions(
    url: str, *, workflow_id: str | None, limit: int
) -> list[WorkflowExecutionRow]:
    with session_scope(url) as session:
        query = select(WorkflowExecutionRow).order_by(
            col(WorkflowExecutionRow.started_at).desc()
        )
        if workflow_id is not None:
            query = query.where(WorkflowExecutionRow.definition_id == workflow_id)
        return list(session.exec(query.limit(limit)).all())


def update_step_agent(
    url: str,
    execution_id: str,
    step: str,
    agent_type: str | None,
    agent_id: str | None,
) -> None:
    with session_scope(url) as session:
        row = session.exec(
            select(WorkflowStepRow).where(
                WorkflowStepRow.execution_id == execution_id,
                WorkflowStepRow.name == step,
            )
        ).first()
        if row is None:
            raise NotFoundError(f"execution {execution_id!r} has no step {step!r}")
        row.agent_type = agent_type
        row.agent = None
        row.agent_id = agent_id
        session.add(row)


def audit_trail(
    url: str,
    *,
    workflow_id: str | None,
    limit: int,
    start_time: datetime | None,
) -> list[WorkflowAuditRow]:
    """Return transitions in the order they were recorded, oldest first,
    merged across every execution of `workflow_id` (or of all definitions)."""
    with session_scope(url) as session:
        query = select(WorkflowAuditRow).order_by(
            col(WorkflowAuditRow.at), col(WorkflowAuditRow.id)
        )
        if workflow_id is not None:
            query = query.where(WorkflowAuditRow.definition_id == workflow_id)
        if start_time is not None:
            query = query.where(col(WorkflowAuditRow.at) >= start_time)
        return list(session.exec(query.limit(limit)).all())


def running_steps_on_queue(url: str, queue: str, limit: int) -> list[dict[str, Any]]:
    """Steps that are running on `queue` now, according to the database."""
    with session_scope(url) as session:
        rows = session.exec(
            select(WorkflowStepRow)
            .where(
                WorkflowStepRow.task_queue == queue,
                WorkflowStepRow.status == "running",
            )
            .order_by(col(WorkflowStepRow.started_at))
            .limit(limit)
        ).all()
        return [
            {
                "execution_id": r.execution_id,
                "step": r.name,
                "type": r.type,
                "started_at": r.started_at,
                "agent_type": r.agent_type,
            }
            for r in rows
        ]


def discard_version(
    url: str, workflow_id: str, version: int, previous_status: str | None
) -> None:
    """Undo `save_definition`'s new `version` of `workflow_id`, after its
    schedules could not be made.

    The definition row goes back to its previous latest version and
    `previous_status`; a definition left without versions is removed. A
    later version stored meanwhile by another call stays the latest.
    """
    with session_scope(url) as session:
        row = session.get(WorkflowDefinitionRow, workflow_id)
        if row is None:
            return
        session.delete(_version_row(session, workflow_id, version))
        session.flush()
        remaining = session.exec(
            select(WorkflowVersionRow)
            .where(WorkflowVersionRow.definition_id == workflow_id)
            .order_by(col(WorkflowVersionRow.version).desc())
        ).first()
        if remaining is None:
            session.delete(row)
            return
        if row.latest_version != version:
            return
        row.latest_version = remaining.version
        row.description = remaining.spec.get("description")
        row.priority = remaining.spec.get("priority", row.priority)
        row.status = previous_status or row.status
        row.updated_at = utc_now()
        session.add(row)
