"""Swarm services: one agent step's execution, and the database mirror."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.swarm import (
    MAX_STEP_INPUT_BYTES,
    AgentState,
    AgentStepRequest,
    StepResult,
    SwarmMirror,
    TaskProgress,
    task_workflow_id,
)
from app.db import session_scope
from app.sandbox.service import SandboxServiceError
from app.settings import Settings
from app.swarm import llm
from app.swarm.actions import ActionNotAvailableError, run_action
from app.swarm.executor import AgentExecutor, ExecutionOutput
from app.swarm.models import AgentRow, SwarmEventRow, SwarmRow
from app.temporal.cancels import cancelled_by_worker_shutdown, current_task_cancelling

logger = logging.getLogger(__name__)

# Kinds of sandbox call failures that a later attempt would meet again. An
# interrupted program was stopped on purpose, so it does not run again.
_PERMANENT_SANDBOX_ERRORS = ("configuration", "invalid_argument", "interrupted")
# How long a cancelled step waits for the server to take its interrupt.
INTERRUPT_SECONDS = 10.0

LLM_SYSTEM_PROMPT = (
    "You are {name}, {article} {type} agent in a multi-agent swarm. Your "
    "capabilities: {capabilities}. Do the part of the task you are given and "
    "answer with the result only."
)


def llm_system_prompt(agent: AgentState) -> str:
    """Build the system prompt of an agent's natural-language step."""
    # Every agent type is an English noun, and those that start with a vowel
    # letter (analyst, architect, optimizer) are also spoken with a vowel.
    article = "an" if agent.type[:1].lower() in "aeiou" else "a"
    return LLM_SYSTEM_PROMPT.format(
        name=agent.name,
        article=article,
        type=agent.type,
        capabilities=", ".join(agent.capabilities) or "general",
    )


class StepFailedError(Exception):
    """A step that cannot succeed on retry; the message names the cause.

    Attributes:
        retryable: True when a later attempt may succeed (a rate limit).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def new_task_id(swarm_id: str) -> str:
    """Return a new task id that names its swarm (`task_<swarm_id>_<random>`),
    so a task whose child workflow has not started yet can be found."""
    return f"task_{swarm_id}_{uuid.uuid4().hex[:8]}"


def swarm_of_task(task_id: str) -> str | None:
    """Return the swarm id in a task id from `new_task_id`, else None."""
    prefix, _, rest = task_id.partition("_")
    swarm_id, separator, suffix = rest.rpartition("_")
    if prefix != "task" or not separator or not swarm_id or not suffix:
        return None
    return swarm_id


# Largest input passed in the environment itself, in UTF-8 bytes. execve
# refuses a variable of 128 KiB or more, and all of them together share the
# argument space; larger inputs are only in their files.
INLINE_INPUT_BYTES = 65_536


def step_env(
    request: AgentStepRequest, dependency_outputs: Mapping[str, str]
) -> dict[str, str]:
    """Build the environment of a step's program: who runs it, on what part,
    and the inputs small enough to inline (see `step_input_files`)."""
    env = {
        "NEXUS_SWARM_ID": request.swarm_id,
        "NEXUS_TASK_ID": request.task_id,
        "NEXUS_AGENT_ID": request.agent.agent_id,
        "NEXUS_AGENT_NAME": request.agent.name,
        "NEXUS_AGENT_TYPE": request.agent.type,
        "NEXUS_PART_INDEX": str(request.part_index),
        "NEXUS_PART_COUNT": str(request.part_count),
        "NEXUS_PART": request.part,
    }
    previous = request.previous_output or ""
    if _inlinable(previous):
        env["NEXUS_PREVIOUS_OUTPUT"] = previous
    if request.dependencies:
        outputs = _dependencies_json(dependency_outputs)
        if _inlinable(outputs):
            env["NEXUS_DEPENDENCY_OUTPUTS"] = outputs
    return env


def _inlinable(value: str) -> bool:
    # No environment variable can hold a NUL byte; the file still can.
    return len(value.encode()) <= INLINE_INPUT_BYTES and "\0" not in value


def step_input_files(
    request: AgentStepRequest, dependency_outputs: Mapping[str, str]
) -> dict[str, str]:
    """Return the step's inputs that go to files, by the variable that names
    each file: every previous output and dependency output, whatever its size."""
    files: dict[str, str] = {}
    if request.previous_output is not None:
        files["NEXUS_PREVIOUS_OUTPUT_FILE"] = request.previous_output
    if request.dependencies:
        files["NEXUS_DEPENDENCY_OUTPUTS_FILE"] = _dependencies_json(dependency_outputs)
    size = sum(len(content.encode()) for content in files.values())
    if size > MAX_STEP_INPUT_BYTES:
        raise StepFailedError(
            f"the step's inputs (previous output and dependency outputs) are "
            f"{size} bytes, over the {MAX_STEP_INPUT_BYTES} bytes that a step can "
            "receive; have those tasks print less, or store large results "
            "(storage_upload) and print where they are"
        )
    return files


def _dependencies_json(outputs: Mapping[str, str]) -> str:
    return json.dumps(dict(outputs), ensure_ascii=False)


async def dependency_outputs(
    client: Client | None, request: AgentStepRequest
) -> dict[str, str]:
    """Read the outputs of the tasks that the step's task depends on, from
    their task workflows' results, in the order the task listed them.

    The swarm starts a task only once every dependency has completed, so
    each result is there.

    Raises:
        StepFailedError: a dependency's result cannot be read, or the
            dependency did not complete.
    """
    if not request.dependencies:
        return {}
    if client is None:
        raise StepFailedError("no Temporal client to read the dependencies' outputs")
    outputs: dict[str, str] = {}
    for task_id in request.dependencies:
        handle = client.get_workflow_handle(
            task_workflow_id(task_id), result_type=TaskProgress
        )
        try:
            progress = await handle.result()
        except RPCError as error:
            raise StepFailedError(
                f"could not read the output of dependency {task_id}: {error.message}",
                retryable=error.status != RPCStatusCode.NOT_FOUND,
            ) from error
        except WorkflowFailureError as error:
            raise StepFailedError(
                f"dependency {task_id} did not complete: {error.cause or error}"
            ) from error
        if progress.status != "completed":
            raise StepFailedError(
                f"dependency {task_id} is {progress.status}, not completed"
            )
        outputs[task_id] = progress.output or ""
    return outputs


def exit_error(exit_code: int, stderr: str) -> str:
    """Describe a program's non-zero exit by its code and last stderr line.
    A negative code is the signal that killed the program, as subprocess
    reports it, and the signal is named."""
    code = f"exit code {exit_code}"
    if exit_code < 0:
        try:
            code += f" (killed by {signal.Signals(-exit_code).name})"
        except ValueError:
            code += f" (killed by signal {-exit_code})"
    lines = stderr.strip().splitlines()
    if not lines:
        return f"{code} (stderr was empty)"
    return f"{code}: {lines[-1][:300]}"


def llm_prompt(
    request: AgentStepRequest, dependency_outputs: Mapping[str, str] | None = None
) -> str:
    lines = [f"Task: {request.work.task}"]
    for task_id, output in (dependency_outputs or {}).items():
        lines.append(f"Output of task {task_id}, which this task depends on:\n{output}")
    if request.part_count > 1:
        lines.append(
            f"Your part ({request.part_index + 1} of {request.part_count}): "
            f"{request.part}"
        )
    if request.previous_output:
        lines.append(f"Output of the previous agent:\n{request.previous_output}")
    return "\n\n".join(lines)


def _program_start(
    result: StepResult, started: datetime, output: ExecutionOutput
) -> datetime:
    """Move the step's start to its program's start, and record the time
    before it in `waited_ms`.

    Parts of one task that a parallel strategy gives to one agent wait for
    each other at its sandbox, because with local calls a session takes the
    next call only after the running one ends or its workflow task
    heartbeats.
    The program's start is estimated as now minus the run time that the
    sandbox measured, so it is late by the latency of the sandbox's reply.
    """
    program_started = datetime.now(UTC) - timedelta(milliseconds=output.duration_ms)
    if program_started <= started:
        return started
    result.waited_ms = round((program_started - started).total_seconds() * 1000, 3)
    result.started_at = program_started
    return program_started


async def _run_program(
    executor: AgentExecutor,
    sandbox_id: str,
    language: str,
    program: str,
    request: AgentStepRequest,
    attempt: int,
    dependency_outputs: Mapping[str, str],
) -> ExecutionOutput:
    """Run the step's program once per step, not once per activity attempt.

    Every attempt sends the sandbox call with the step's own id. When an
    earlier attempt's call got through (the worker died after it), the
    session returns that call's output and the program does not run twice.
    When that call failed, the same id returns the failure again, so this
    attempt then calls with an id of its own.
    """
    call_id = (
        f"agent-step-{request.task_id}-{request.agent.agent_id}-"
        f"{request.step}-{request.part_index}"
    )
    env = step_env(request, dependency_outputs)
    files = step_input_files(request, dependency_outputs)
    run = functools.partial(
        executor.run_code,
        sandbox_id,
        language,
        program,
        env=env,
        files=files,
        timeout=request.work.timeout_seconds,
    )
    try:
        return await _interruptible(executor, sandbox_id, call_id, run)
    except SandboxServiceError as error:
        # A call that timed out or lost its connection to Temporal may still
        # run its program, which a call with another id would start a second
        # time.
        if attempt == 1 or error.kind in (
            *_PERMANENT_SANDBOX_ERRORS,
            "timed_out",
            "connection_lost",
        ):
            raise
    return await _interruptible(
        executor, sandbox_id, f"{call_id}-attempt-{attempt}", run
    )


async def _interruptible(
    executor: AgentExecutor,
    sandbox_id: str,
    call_id: str,
    run: Callable[..., Awaitable[ExecutionOutput]],
) -> ExecutionOutput:
    """Run the call, and stop its program when the step is cancelled meanwhile.

    A cancelled task cancels its step. Without the interrupt, the program
    would run on in the agent's sandbox next to the agent's later tasks.
    A cancel by the worker's shutdown sends no interrupt. The step's next
    attempt sends the same call id and gets the outcome of the same call,
    which an interrupt would fail: the session stops the program, or keeps
    the interrupt for a call that it has not received yet."""
    try:
        return await run(call_id=call_id)
    except (asyncio.CancelledError, WorkflowUpdateRPCTimeoutOrCancelledError):
        if not current_task_cancelling():
            raise  # an update that timed out, not a cancelled step
        if cancelled_by_worker_shutdown():
            logger.info(
                "worker shutting down: the program of call %s in sandbox %s "
                "is left to the step's next attempt",
                call_id,
                sandbox_id,
            )
            raise asyncio.CancelledError() from None
        try:
            await asyncio.wait_for(
                executor.interrupt(sandbox_id, call_id), INTERRUPT_SECONDS
            )
        except Exception as error:
            logger.warning(
                "could not stop the program of call %s in sandbox %s: %s",
                call_id,
                sandbox_id,
                error,
            )
        # The client turns the cancel into its own error; the step stops
        # as cancelled all the same.
        raise asyncio.CancelledError() from None


async def run_step(
    settings: Settings,
    executor: AgentExecutor,
    client: Client | None,
    request: AgentStepRequest,
    *,
    attempt: int = 1,
    started_at: datetime | None = None,
) -> StepResult:
    """Execute one agent's step and return what really happened.

    `started_at` is when the step's first attempt started (default: now);
    the result's `started_at` and `duration_ms` count from it. A code or
    shell step on its first attempt counts from its program's start instead,
    and records the time before it in `waited_ms`.

    A program that exits non-zero is a failed step with its output, not an
    exception: it ran, and a retry would run it again.

    Raises:
        StepFailedError: the step could not run (missing key, unknown action,
            unknown language, an API error).
    """
    agent = request.agent
    work = request.work
    started = started_at or datetime.now(UTC)
    result = StepResult(
        step=request.step,
        agent_id=agent.agent_id,
        agent_name=agent.name,
        agent_type=agent.type,
        part_index=request.part_index,
        part=request.part,
        kind=work.kind,
        status="completed",
        attempt=attempt,
        started_at=started,
    )
    if work.kind in ("code", "shell"):
        language = work.language if work.kind == "code" else "bash"
        program = (work.code if work.kind == "code" else work.command) or ""
        try:
            inputs = await dependency_outputs(client, request)
            sandbox_id = await executor.ensure_sandbox(agent.agent_id)
            result.sandbox_id = sandbox_id
            output = await _run_program(
                executor, sandbox_id, language, program, request, attempt, inputs
            )
        except SandboxServiceError as error:
            raise StepFailedError(
                f"sandbox call failed: {error.message}",
                retryable=error.kind not in _PERMANENT_SANDBOX_ERRORS,
            ) from error
        except RuntimeError as error:
            raise StepFailedError(str(error)) from error
        if attempt == 1:
            started = _program_start(result, started, output)
        result.stdout = output.stdout
        result.stderr = output.stderr
        result.exit_code = output.exit_code
        result.program_runs = output.runs
        if output.timed_out:
            result.status = "failed"
            result.error = _timed_out_error(work.timeout_seconds, "the program")
        elif output.exit_code != 0:
            result.status = "failed"
            result.error = exit_error(output.exit_code, output.stderr)
    elif work.kind == "action":
        arguments = dict(work.action_args)
        try:
            async with asyncio.timeout(work.timeout_seconds):
                result.output = await run_action(
                    settings,
                    client,
                    work.action or "",
                    arguments,
                    caller=f"swarm:{request.swarm_id}:{agent.agent_id}",
                    task_id=request.task_id,
                    groups=work.groups,
                )
        except TimeoutError:
            result.status = "failed"
            result.error = _timed_out_error(work.timeout_seconds, "the action")
        except ActionNotAvailableError as error:
            raise StepFailedError(str(error)) from error
        except Exception as error:
            message = getattr(error, "message", None) or str(error)
            result.status = "failed"
            result.error = f"action {work.action!r} failed: {message}"
    else:
        system = llm_system_prompt(agent)
        inputs = await dependency_outputs(client, request)
        reply: llm.LLMReply | None = None
        try:
            async with asyncio.timeout(work.timeout_seconds):
                reply = await llm.ask(
                    settings,
                    system,
                    llm_prompt(request, inputs),
                    timeout=work.timeout_seconds,
                )
        except TimeoutError:
            result.status = "failed"
            result.error = _timed_out_error(work.timeout_seconds, "the model's reply")
        except llm.LLMUnavailableError as error:
            raise StepFailedError(str(error)) from error
        except llm.LLMRequestError as error:
            raise StepFailedError(str(error), retryable=error.retryable) from error
        if reply is not None:
            result.text = reply.text
            result.output = {
                "model": reply.model,
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
                "stop_reason": reply.stop_reason,
            }
    finished = datetime.now(UTC)
    result.finished_at = finished
    result.duration_ms = round((finished - started).total_seconds() * 1000, 3)
    return result


def _timed_out_error(timeout_seconds: float, slow_work: str) -> str:
    # A step that ran out of its task's timeout fails without a retry, which
    # would only run out of it again.
    return (
        f"timed out after {timeout_seconds:g} s; raise the task's timeout or "
        f"shorten {slow_work}"
    )


def write_mirror(url: str, mirror: SwarmMirror) -> int:
    """Upsert the swarm row and its agents, insert new events; return how many
    events were new. Writing the same mirror twice changes nothing."""
    # swarm_init and the workflow's first mirror write may insert the same
    # row at once; the loser retries and then takes the update path.
    for attempt in range(3):
        try:
            return _write_mirror_once(url, mirror)
        except IntegrityError:
            if attempt == 2:
                raise
            logger.debug("mirror of swarm %s raced a writer; retrying", mirror.swarm_id)
    raise AssertionError("unreachable")


def _write_mirror_once(url: str, mirror: SwarmMirror) -> int:
    with session_scope(url) as session:
        row = session.get(SwarmRow, mirror.swarm_id)
        if row is None:
            row = SwarmRow(
                swarm_id=mirror.swarm_id,
                workflow_id=mirror.workflow_id,
                topology=mirror.topology,
                strategy=mirror.strategy,
                max_agents=mirror.max_agents,
                status=mirror.status,
                created_at=mirror.created_at,
                updated_at=mirror.updated_at,
            )
        row.status = mirror.status
        row.max_agents = mirror.max_agents
        row.task_count = mirror.task_count
        row.updated_at = mirror.updated_at
        row.destroyed_at = mirror.destroyed_at
        row.agent_count = sum(1 for a in mirror.agents if a.status != "removed")
        session.add(row)
        # Read the agent rows and the events written before with one query
        # each, since every write carries every agent and a batch of events.
        agent_rows = {
            agent_row.agent_id: agent_row
            for agent_row in session.exec(
                select(AgentRow).where(AgentRow.swarm_id == mirror.swarm_id)
            )
        }
        written = _written_event_ids(session, mirror)
        for agent in mirror.agents:
            agent_row = agent_rows.get(agent.agent_id) or AgentRow(
                agent_id=agent.agent_id,
                swarm_id=mirror.swarm_id,
                type=agent.type,
                name=agent.name,
                joined_at=agent.joined_at,
                status=agent.status,
            )
            agent_row.capabilities = list(agent.capabilities)
            agent_row.status = agent.status
            agent_row.sandbox_id = agent.sandbox_id
            agent_row.tasks_completed = agent.tasks_completed
            agent_row.tasks_failed = agent.tasks_failed
            session.add(agent_row)
        new = 0
        for event in mirror.events:
            if event.event_id in written:
                continue
            session.add(
                SwarmEventRow(
                    event_id=event.event_id,
                    swarm_id=event.swarm_id,
                    seq=event.seq,
                    kind=event.kind,
                    agent_id=event.agent_id,
                    task_id=event.task_id,
                    detail=json.loads(json.dumps(event.detail, default=str)),
                    created_at=event.at,
                )
            )
            new += 1
    return new


def _written_event_ids(session: Session, mirror: SwarmMirror) -> set[str]:
    """Return the ids of `mirror.events` that the table contains already."""
    if not mirror.events:
        return set()
    seqs = [event.seq for event in mirror.events]
    return set(
        session.exec(
            select(SwarmEventRow.event_id)
            .where(SwarmEventRow.swarm_id == mirror.swarm_id)
            .where(col(SwarmEventRow.seq) >= min(seqs))
            .where(col(SwarmEventRow.seq) <= max(seqs))
        )
    )


def list_swarm_rows(url: str, status: str) -> list[SwarmRow]:
    """Swarms from the mirror, newest first; `status` is active, destroyed or all."""
    with session_scope(url) as session:
        query = select(SwarmRow).order_by(col(SwarmRow.created_at).desc())
        if status == "active":
            query = query.where(col(SwarmRow.status).in_(["active", "destroying"]))
        elif status == "destroyed":
            query = query.where(SwarmRow.status == "destroyed")
        return list(session.exec(query).all())


def newest_active_swarm_id(url: str) -> str | None:
    with session_scope(url) as session:
        row = session.exec(
            select(SwarmRow)
            .where(SwarmRow.status == "active")
            .order_by(col(SwarmRow.created_at).desc())
            .limit(1)
        ).first()
        return row.swarm_id if row else None


def list_events(url: str, swarm_id: str, after_seq: int = -1) -> list[SwarmEventRow]:
    with session_scope(url) as session:
        return list(
            session.exec(
                select(SwarmEventRow)
                .where(SwarmEventRow.swarm_id == swarm_id)
                .where(SwarmEventRow.seq > after_seq)
                .order_by(col(SwarmEventRow.seq))
            ).all()
        )


def count_agents(url: str, swarm_id: str) -> int:
    with session_scope(url) as session:
        return int(
            session.exec(
                select(func.count())
                .select_from(AgentRow)
                .where(AgentRow.swarm_id == swarm_id)
                .where(AgentRow.status != "removed")
            ).one()
        )
