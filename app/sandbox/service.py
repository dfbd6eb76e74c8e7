"""The sandbox service API: start and drive `SandboxSessionWorkflow`s.

Tools, the CLI and other capabilities (swarm agents) use these functions;
they seal secret values before anything enters Temporal, so callers pass
plain env var values and get back env var names only.

Example:
    info = await create_sandbox(client, settings, CreateOptions(template="python"))
    result = await execute(
        client, settings, info.sandbox_id, ExecuteRequest(code="print(1)")
    )
    await stop_sandbox(client, info.sandbox_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.queues import ORCHESTRATION
from app.contracts.sandbox import (
    CONFIGURATION_ERROR,
    ENDED_ERROR,
    INTERRUPTED_ERROR,
    INVALID_ERROR,
    RETRY_LATER_ERROR,
    SETUP_ERROR,
    TIMED_OUT_ERROR,
    BackendState,
    ConfigureRequest,
    ConfigureResult,
    ExecuteRequest,
    ExecuteResult,
    SandboxSpec,
    SandboxStatus,
    SessionInfo,
    SessionInput,
    SessionState,
    Template,
    UploadRequest,
    UploadResult,
    env_value_problem,
)
from app.sandbox import store
from app.sandbox.backend import (
    SandboxBackendError,
    SandboxConfigurationError,
    SandboxRetryLaterError,
)
from app.sandbox.local import LocalBackend
from app.sandbox.models import SandboxRecord
from app.sandbox.runtime import get_backend
from app.sandbox.secrets import load_key, seal_env
from app.settings import Settings
from app.temporal.cancels import current_task_cancelling
from app.temporal.search_attributes import SANDBOX_ID

logger = logging.getLogger(__name__)

WORKFLOW_PREFIX = "sandbox-"
ANTHROPIC_ENV = "ANTHROPIC_API_KEY"


class SandboxServiceError(Exception):
    """A sandbox call that failed.

    Attributes:
        kind: `not_found`, `invalid_argument`, `configuration`,
            `interrupted` (the session's `interrupt` signal), `timed_out`
            (no reply from the session within the RPC deadline),
            `connection_lost` (the Temporal server went away during the
            call) or `failed`.
    """

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


@dataclass
class CreateOptions:
    """Options of `create_sandbox`; env values are plain text only here."""

    template: Template
    name: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    anthropic_key: str | None = None
    timeout: int = 3600
    metadata: Mapping[str, str] = field(default_factory=dict)
    install_packages: list[str] = field(default_factory=list)
    startup_script: str | None = None
    sandbox_id: str | None = None


def workflow_id(sandbox_id: str) -> str:
    return f"{WORKFLOW_PREFIX}{sandbox_id}"


def new_sandbox_id() -> str:
    return f"sbx_{uuid.uuid4().hex[:12]}"


def seal_for(
    settings: Settings, sandbox_id: str, env: Mapping[str, str]
) -> dict[str, str]:
    """Seal plain env var values for one sandbox.

    Raises:
        SandboxServiceError: a value contains a NUL byte, or an env var is
            longer than Linux allows (`invalid_argument`).
    """
    if not env:
        return {}
    for name, value in env.items():
        problem = env_value_problem(name, value)
        if problem is not None:
            raise SandboxServiceError(problem, "invalid_argument")
    return seal_env(load_key(settings), sandbox_id, dict(env))


def _handle(client: Client, sandbox_id: str) -> WorkflowHandle[object, object]:
    return client.get_workflow_handle(workflow_id(sandbox_id))


def _translate(error: Exception, sandbox_id: str) -> SandboxServiceError:
    if isinstance(error, WorkflowUpdateFailedError):
        cause = error.cause
        message = str(getattr(cause, "message", None) or cause or error)
        kind = "failed"
        # The session may pass on its activity's error as that error's cause.
        inner = getattr(cause, "cause", None)
        if isinstance(inner, ApplicationError) and inner.type == RETRY_LATER_ERROR:
            cause = inner
        if isinstance(cause, ApplicationError) and cause.type == RETRY_LATER_ERROR:
            # The backend (E2B) could not be reached or was busy: a later
            # call may work, unlike a configuration error.
            kind = "connection_lost"
        elif isinstance(cause, ApplicationError):
            if cause.type == CONFIGURATION_ERROR:
                kind = "configuration"
            elif cause.type in (INVALID_ERROR, SETUP_ERROR, "ValueError"):
                # A failed installer or setup command is an error in the
                # caller's packages or commands.
                kind = "invalid_argument"
            elif cause.type == INTERRUPTED_ERROR:
                kind = "interrupted"
            elif cause.type == TIMED_OUT_ERROR:
                kind = "timed_out"
            elif cause.type == ENDED_ERROR:
                # As for any call to a stopped or deleted sandbox.
                kind = "not_found"
        return SandboxServiceError(message, kind)
    if isinstance(error, RPCError) and error.status == RPCStatusCode.NOT_FOUND:
        return SandboxServiceError(
            f"sandbox {sandbox_id} has no running session: it was stopped, "
            "deleted or failed to start; read its state with sandbox_status, or "
            "create a new sandbox with sandbox_create",
            "not_found",
        )
    return SandboxServiceError(f"sandbox {sandbox_id}: {error}")


def _unknown_sandbox(sandbox_id: str) -> SandboxServiceError:
    return SandboxServiceError(
        f"sandbox {sandbox_id} not found; list sandboxes with sandbox_list, or "
        "create one with sandbox_create",
        "not_found",
    )


async def _no_session(
    client: Client, sandbox_id: str, error: RPCError
) -> SandboxServiceError:
    """Build the error for an update that found no running session, telling
    a session that ended from one that never existed."""
    try:
        await _handle(client, sandbox_id).describe()
    except RPCError as described:
        if described.status == RPCStatusCode.NOT_FOUND:
            return _unknown_sandbox(sandbox_id)
        logger.warning(
            "could not describe the session of sandbox %s: %s",
            sandbox_id,
            described.message,
        )
    return _translate(error, sandbox_id)


def _query_error(error: RPCError, sandbox_id: str) -> SandboxServiceError:
    # A closed workflow still handles queries, so NOT_FOUND here means the
    # session never existed (or Temporal's retention removed it).
    if error.status == RPCStatusCode.NOT_FOUND:
        return _unknown_sandbox(sandbox_id)
    return _translate(error, sandbox_id)


def _unanswered(sandbox_id: str, name: str) -> BaseException:
    """Return the error for an update whose reply did not come.

    The client turns a cancel of the waiting task into
    `WorkflowUpdateRPCTimeoutOrCancelledError`. A cancelled caller (a
    workflow step at its timeout, a worker that stops) gets a CancelledError
    back, so its cancellation goes on as asyncio expects, and the call is
    logged at INFO without a traceback. Otherwise the RPC deadline passed.
    """
    if current_task_cancelling():
        logger.info(
            "the %s call to sandbox %s was cancelled while it waited for the "
            "session's reply",
            name,
            sandbox_id,
        )
        return asyncio.CancelledError()
    logger.warning(
        "the %s call to sandbox %s timed out waiting for the session's reply",
        name,
        sandbox_id,
    )
    return SandboxServiceError(
        f"the {name} call to sandbox {sandbox_id} timed out before its session "
        "replied, and the call may still run; read its progress with "
        "sandbox_status and sandbox_logs before you call again",
        "timed_out",
    )


async def _update(
    client: Client,
    sandbox_id: str,
    name: str,
    arg: object,
    result_type: type,
    update_id: str | None = None,
) -> object:
    try:
        if arg is None:
            return await _handle(client, sandbox_id).execute_update(
                name, result_type=result_type, id=update_id
            )
        return await _handle(client, sandbox_id).execute_update(
            name, arg, result_type=result_type, id=update_id
        )
    except RPCError as error:
        if error.status == RPCStatusCode.UNAVAILABLE:
            raise _connection_lost(client, sandbox_id, name, update_id, error) from None
        if error.status == RPCStatusCode.NOT_FOUND:
            raise await _no_session(client, sandbox_id, error) from None
        raise _translate(error, sandbox_id) from None
    except WorkflowUpdateFailedError as error:
        raise _translate(error, sandbox_id) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise _unanswered(sandbox_id, name) from None


def _connection_lost(
    client: Client,
    sandbox_id: str,
    name: str,
    call_id: str | None,
    error: RPCError,
) -> SandboxServiceError:
    """Build the error for an update whose connection to Temporal broke.

    The Temporal client (temporalio 1.35) retries an UNAVAILABLE call for a
    few seconds, then raises RPCError with the transport's bare message, such
    as "tcp connect error". Whether the session recorded the update before
    the server went away is unknown here. A recorded update is durable and
    runs again, from the start, when the server and the workers are back.
    """
    address = client.service_client.config.target_host
    logger.warning(
        "the connection to Temporal at %s was lost during the %s call to "
        "sandbox %s (call id %s): %s",
        address,
        name,
        sandbox_id,
        call_id,
        error.message,
    )
    lost = (
        f"the connection to the platform (Temporal at {address}) was lost during "
        f"the {name} call to sandbox {sandbox_id} ({error.message})"
    )
    if name != "execute":
        return SandboxServiceError(
            f"{lost}. If the session recorded the call, it completes once the "
            "platform is back (`nexus up`); check with sandbox_status before you "
            "send it again",
            "connection_lost",
        )
    call = f" with call_id {call_id}" if call_id else ""
    return SandboxServiceError(
        f"{lost}. The execution is durable: if the session recorded it, it "
        "runs again, from the start, once the platform is back (`nexus up`), "
        "without a new call. Read its output with sandbox_logs, or with "
        f"execution_stream_subscribe on sandbox_id {sandbox_id}, where the "
        f"`exit` chunk{call} carries its status and exit code. Check there "
        "before you send the program again",
        "connection_lost",
    )


async def create_sandbox(
    client: Client, settings: Settings, options: CreateOptions
) -> SessionInfo:
    """Start a session workflow, wait until its sandbox exists, return its info.

    Raises:
        SandboxServiceError: creation failed (for example a package install);
            the message contains the installer's output. The failed session
            has ended by then.
    """
    sandbox_id = options.sandbox_id or new_sandbox_id()
    env = dict(options.env_vars)
    if options.anthropic_key:
        env[ANTHROPIC_ENV] = options.anthropic_key
    spec = SandboxSpec(
        sandbox_id=sandbox_id,
        name=options.name,
        template=options.template,
        timeout=options.timeout,
        sealed_env=seal_for(settings, sandbox_id, env),
        metadata={str(k): str(v) for k, v in options.metadata.items()},
        install_packages=list(options.install_packages),
        startup_script=options.startup_script,
        setup_commands=[options.startup_script] if options.startup_script else [],
    )
    state = SessionState(
        spec=spec,
        backend=settings.sandbox_backend,
        max_recreations=settings.sandbox_max_recreations,
        local_calls=settings.sandbox_backend == "local"
        and settings.sandbox_local_calls,
    )
    logger.info("starting sandbox session %s (template %s)", sandbox_id, spec.template)
    # Update-with-start: the start and the wait for the sandbox are one call
    # to the server, and the first workflow task already carries the update.
    start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
        "SandboxSessionWorkflow",
        SessionInput(state=state),
        id=workflow_id(sandbox_id),
        task_queue=ORCHESTRATION,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(SANDBOX_ID, sandbox_id)]
        ),
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )
    try:
        info = await client.execute_update_with_start_workflow(
            "ready", start_workflow_operation=start, result_type=SessionInfo
        )
    except RPCError as error:
        # The start operation's handle contains the same error. Reading it keeps
        # the event loop from logging it as never retrieved.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(start.workflow_handle(), 1)
        if error.status == RPCStatusCode.UNAVAILABLE:
            raise _connection_lost(client, sandbox_id, "create", None, error) from None
        raise
    except WorkflowUpdateFailedError as error:
        raise _translate(error, sandbox_id) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise _unanswered(sandbox_id, "create") from None
    return info


async def execute(
    client: Client,
    settings: Settings,
    sandbox_id: str,
    request: ExecuteRequest,
    env_vars: Mapping[str, str] | None = None,
    *,
    call_id: str | None = None,
) -> ExecuteResult:
    """Run code in the sandbox; `env_vars` (plain) apply to this call only.

    A `call_id` already used with this session returns that call's result
    without running the code again (Temporal deduplicates updates by id
    within a workflow run), so a retried caller does not run a program twice.
    With a `call_id`, the result's `runs` counts the program's starts.
    """
    if env_vars:
        request = request.model_copy(
            update={"sealed_env": seal_for(settings, sandbox_id, env_vars)}
        )
    if call_id is not None:
        request = request.model_copy(update={"call_id": call_id})
    result = await _update(
        client, sandbox_id, "execute", request, ExecuteResult, update_id=call_id
    )
    assert isinstance(result, ExecuteResult)
    return result


async def interrupt(client: Client, sandbox_id: str, call_id: str) -> bool:
    """Ask the session to stop the program of the execution with `call_id`,
    if it runs. Return False when the session has ended.

    The signal returns at once; the program is stopped when the session
    handles it (see `SandboxSessionWorkflow.interrupt`), and its execution
    fails."""
    try:
        await _handle(client, sandbox_id).signal("interrupt", call_id)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise _translate(error, sandbox_id) from None
    return True


async def upload(
    client: Client, sandbox_id: str, path: str, content: str
) -> UploadResult:
    """Write a text file into the sandbox folder."""
    request = UploadRequest(file_path=path, content=content)
    result = await _update(client, sandbox_id, "upload", request, UploadResult)
    assert isinstance(result, UploadResult)
    return result


async def configure(
    client: Client,
    settings: Settings,
    sandbox_id: str,
    *,
    env_vars: Mapping[str, str] | None = None,
    anthropic_key: str | None = None,
    install_packages: list[str] | None = None,
    run_commands: list[str] | None = None,
) -> ConfigureResult:
    """Change the sandbox so that later executions (and recreations) see it."""
    env = dict(env_vars or {})
    if anthropic_key:
        env[ANTHROPIC_ENV] = anthropic_key
    request = ConfigureRequest(
        sealed_env=seal_for(settings, sandbox_id, env),
        install_packages=list(install_packages or []),
        run_commands=list(run_commands or []),
    )
    result = await _update(client, sandbox_id, "configure", request, ConfigureResult)
    assert isinstance(result, ConfigureResult)
    return result


async def info(
    client: Client, sandbox_id: str, timeout: float | None = None
) -> SessionInfo:
    """Return the session's recorded state (a query; no backend call).

    Raises:
        SandboxBusyError: the query timed out after `timeout` seconds.
    """
    try:
        return await _handle(client, sandbox_id).query(
            "info",
            result_type=SessionInfo,
            rpc_timeout=None if timeout is None else timedelta(seconds=timeout),
        )
    except RPCError as error:
        if timeout is not None and error.status in _TIMED_OUT:
            raise SandboxBusyError(sandbox_id) from None
        raise _query_error(error, sandbox_id) from None


class SandboxBusyError(Exception):
    """Error raised when a session's query timed out, because the session is
    running a call."""


_TIMED_OUT = (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)

# Seconds a status read waits for the session's query result. A session
# handles queries between workflow tasks, and a program that runs as a local
# activity keeps its task open until the worker's task heartbeat, about 8 s
# later.
STATUS_QUERY_SECONDS = 2.0


async def status(client: Client, settings: Settings, sandbox_id: str) -> SandboxStatus:
    """Return the session and the sandbox's live state read from the backend.

    A stopped or failed sandbox that was deleted afterwards reports `deleted`,
    and a sandbox whose creation failed reports `failed` with its error.
    For a session busy with a call, the session fields come from its mirror
    row (`busy`), and the live state is read from the backend in this
    process where it can be, so a status read does not wait for the call's
    task heartbeat. Where it cannot, `live` is None.
    """
    database_url = settings.effective_database_url
    busy = False
    try:
        session = await info(client, sandbox_id, STATUS_QUERY_SECONDS)
    except SandboxBusyError:
        row = await asyncio.to_thread(store.get_record, database_url, sandbox_id)
        if row is None:
            session = await info(client, sandbox_id)  # no other record of it
        else:
            session, busy = _mirrored_info(row), True
    live: BackendState | None = None
    if session.status == "running" and session.backend_id is not None:
        if _backend_here(settings, session.backend, session.backend_id):
            # Read here even after the session's query returned, because a
            # call that starts after the query would hold a `describe`
            # update until the call's task heartbeat.
            live = await _describe_here(settings, sandbox_id, session.backend_id)
        elif not busy:
            try:
                result = await asyncio.wait_for(
                    _update(client, sandbox_id, "describe", None, BackendState),
                    STATUS_QUERY_SECONDS,
                )
            except TimeoutError:
                # A call started after the session's query returned.
                busy = True
            except SandboxServiceError as error:
                if error.kind == "failed":
                    # The backend could not be reached or failed, so the
                    # status is the recorded state without a live part.
                    logger.warning(
                        "could not describe sandbox %s: %s", sandbox_id, error
                    )
                elif error.kind == "timed_out":
                    busy = True
                else:
                    raise
            else:
                live = result if isinstance(result, BackendState) else None
    elif (
        session.status in ("stopped", "failed")
        and session.backend_id is not None
        and not await asyncio.to_thread(store.has_record, database_url, sandbox_id)
    ):
        # An ended session takes no update, so deleting a stopped or failed
        # sandbox cannot change the status it recorded. Every stopped or
        # failed session that had a sandbox keeps its mirror row until the
        # delete removes it. A failed creation leaves no row, and stays
        # `failed`.
        session = session.model_copy(update={"status": "deleted"})
    return SandboxStatus(session=session, live=live, busy=busy)


def _backend_here(settings: Settings, backend: str, backend_id: str) -> bool:
    """Return whether this process can read the session's backend itself:
    E2B with its key, or a local sandbox whose state file is in this
    process's data folder. A process with another data folder than the
    workers' would otherwise report a live sandbox as lost."""
    if backend != settings.sandbox_backend:
        return False
    if backend == "e2b":
        key = settings.e2b_api_key
        return key is not None and bool(key.get_secret_value())
    local = get_backend(settings)
    return isinstance(local, LocalBackend) and local.has_state(backend_id)


async def _describe_here(
    settings: Settings, sandbox_id: str, backend_id: str
) -> BackendState | None:
    """Read the live state from the backend in this process; return None
    when the backend cannot be reached or fails for now.

    Raises:
        SandboxServiceError: the backend call failed, with the backend's
            message, as the `describe` update reports it.
    """
    try:
        return await get_backend(settings).describe(backend_id)
    except SandboxRetryLaterError as failure:
        logger.warning("could not describe sandbox %s: %s", sandbox_id, failure)
        return None
    except SandboxBackendError as failure:
        logger.warning("could not describe sandbox %s: %s", sandbox_id, failure)
        kind = (
            "configuration"
            if isinstance(failure, SandboxConfigurationError)
            else "failed"
        )
        raise SandboxServiceError(str(failure), kind) from None


def _mirrored_info(row: SandboxRecord) -> SessionInfo:
    return SessionInfo(
        sandbox_id=row.id,
        name=row.name,
        template=row.template,
        status=row.status,
        backend=row.backend,
        backend_id=row.backend_id,
        env_vars_configured=list(row.env_var_names),
        timeout=row.timeout,
        metadata={k: str(v) for k, v in row.sandbox_metadata.items()},
        install_packages=[],
        recreated=row.recreated,
        created_at=row.created_at,
        error=None,
        events=[],
    )


async def logs(client: Client, sandbox_id: str, lines: int = 100) -> list[str]:
    try:
        return await _handle(client, sandbox_id).query(
            "logs", lines, result_type=list[str]
        )
    except RPCError as error:
        raise _query_error(error, sandbox_id) from None


async def stop_sandbox(client: Client, sandbox_id: str) -> SessionInfo:
    """Kill the sandbox on the backend and end its session.

    A stop that arrives while another stop or delete is ending the session
    waits for that end and returns the session's state after it.

    Raises:
        SandboxServiceError: the session has already ended (`not_found`), or
            the other end is still running after 30 s.
    """
    result = await _update(client, sandbox_id, "stop", None, SessionInfo)
    assert isinstance(result, SessionInfo)
    if result.status == "running":
        # The session returns its state at once when an end is already in
        # progress, and that state is still `running` until the end finishes.
        try:
            await wait_ended(client, sandbox_id)
        except TimeoutError:
            raise SandboxServiceError(
                f"sandbox {sandbox_id} is still ending after another stop or "
                "delete; read its state with sandbox_status in a minute"
            ) from None
        return await info(client, sandbox_id)
    return result


async def delete_sandbox(
    client: Client, settings: Settings, sandbox_id: str
) -> SessionInfo:
    """Kill the sandbox, remove its files and mirror row, and end its session.

    A session that already ended (stopped, or failed to create) no longer
    takes updates; its files are then removed from here, through the backend
    this process is configured with.
    """
    try:
        result = await _update(client, sandbox_id, "delete", None, SessionInfo)
    except SandboxServiceError as error:
        if error.kind != "not_found":
            raise
        return await _delete_ended(client, settings, sandbox_id)
    assert isinstance(result, SessionInfo)
    if result.status != "deleted":
        # The session was ending after a stop, and the update returned that
        # stop. The delete goes on once the session has ended.
        try:
            await wait_ended(client, sandbox_id)
        except TimeoutError:
            raise SandboxServiceError(
                f"sandbox {sandbox_id} is still ending after its stop; run "
                "the delete again in a minute"
            ) from None
        return await _delete_ended(client, settings, sandbox_id)
    return result


async def _delete_ended(
    client: Client, settings: Settings, sandbox_id: str
) -> SessionInfo:
    """Remove the files and the mirror row of a session that has ended."""
    session = await info(client, sandbox_id)  # queries work on closed runs
    if session.backend_id is not None:
        try:
            await get_backend(settings).delete(session.backend_id)
        except SandboxBackendError as failure:
            # The mirror row stays, so the sandbox is still listed and
            # another delete can finish the removal.
            raise SandboxServiceError(str(failure)) from None
    await asyncio.to_thread(
        store.delete_record, settings.effective_database_url, sandbox_id
    )
    logger.info("deleted ended sandbox session %s", sandbox_id)
    return session.model_copy(update={"status": "deleted"})


async def list_sandboxes(
    settings: Settings, status_filter: str = "all"
) -> list[SandboxRecord]:
    """Return the mirror rows (running|stopped|all)."""
    return await asyncio.to_thread(
        store.list_records, settings.effective_database_url, status_filter
    )


async def wait_ended(client: Client, sandbox_id: str, timeout: float = 30.0) -> None:
    """Wait until the session workflow has completed (after stop/delete)."""
    await asyncio.wait_for(_handle(client, sandbox_id).result(), timeout)


async def discard_backend_sandbox(
    client: Client, settings: Settings, sandbox_id: str
) -> str:
    """Kill the sandbox on its backend without telling its session.

    This is how a sandbox gets lost from outside (E2B ending it, a crash);
    benchmarks and tests use it to prove that the next call recreates it.
    Returns the backend id that was killed.

    Raises:
        SandboxServiceError: the session has no sandbox yet.
    """
    session = await info(client, sandbox_id)
    if session.backend_id is None:
        raise SandboxServiceError(f"sandbox {sandbox_id} has no backend sandbox yet")
    await get_backend(settings).delete(session.backend_id)
    logger.info("discarded backend sandbox %s of %s", session.backend_id, sandbox_id)
    return session.backend_id
