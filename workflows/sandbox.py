"""`SandboxSessionWorkflow`: one durable session per sandbox.

The session records the sandbox's configuration (template, env var names
with sealed values, packages, startup script, later setup commands) in its
history. When the backend reports the sandbox lost, the session recreates it
from that record and retries the call.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from app.contracts.queues import ORCHESTRATION, SANDBOX
    from app.contracts.sandbox import (
        CONFIGURATION_ERROR,
        ENDED_ERROR,
        INTERRUPTED_ERROR,
        INVALID_ERROR,
        LOG_BYTES_KEPT,
        LOST_ERROR,
        SPEC_LIMIT,
        STATE_LIMIT,
        TIMED_OUT_ERROR,
        BackendRef,
        BackendState,
        ConfigureInput,
        ConfigureRequest,
        ConfigureResult,
        CreateInput,
        CreateResult,
        ExecuteInput,
        ExecuteRequest,
        ExecuteResult,
        RecordInput,
        SessionEvent,
        SessionInfo,
        SessionInput,
        SessionResult,
        UploadInput,
        UploadRequest,
        UploadResult,
        encoded_size,
    )

T = TypeVar("T")

LOG_LINES_KEPT = 1000
_LOG_LINE_CHARS = 2000
_EVENTS_KEPT = 100
# Interrupts that arrived before their execution, kept in case it comes.
_EARLY_INTERRUPTS_KEPT = 100
# The first write of each mirror change; a call waits for these attempts.
_RECORD_RETRY = RetryPolicy(maximum_attempts=5)
# The write of a mirror change that failed its first attempts: until the
# database takes it, at least once every 30 s.
_PENDING_RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=0,
)
_CALL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)


def check_relative_path(path: str, what: str) -> None:
    """Reject empty paths and relative paths that climb out with `..`."""
    if not path or not path.strip() or "\0" in path:
        raise ValueError(f"{what} {path!r} is empty or contains a NUL byte")
    if not path.startswith("/") and posixpath.normpath(path).split("/")[0] == "..":
        raise ValueError(
            f"{what} {path!r} leaves the sandbox folder; use a path inside it"
        )


# Runs begun before this patch write the mirror row through an activity and
# always write the "creating" row. Newer runs use a local activity and write
# "creating" only for sessions with a setup.
_LOCAL_RECORDS = "sandbox-local-records"

# Runs begun before this patch leave a lost sandbox's remains (its folder on
# the local backend) on the backend after recreating it.
_CLEAN_LOST = "sandbox-delete-lost-backend"


# Runs begun before this patch fail as a whole, without a mirror row, when a
# creation without a setup (a local activity) fails.
_LOCAL_CREATE_FAILURE = "sandbox-local-create-failure"

# Runs begun before this patch leave a stopped sandbox's remains on the
# backend (on the local backend, its state file) until `sandbox_delete`.
_DELETE_STOPPED = "sandbox-delete-stopped-backend"

# Runs begun before this patch stop and delete their sandbox through the
# sandbox queue, even where the session makes its other calls itself.
_LOCAL_END = "sandbox-local-end"

# Runs begun before this patch keep the status `running` after a stop or
# delete whose backend call failed.
_END_FAILURE = "sandbox-end-failure-recorded"

# Runs begun before this patch keep a `failed` mirror row after their
# creation failed, until `sandbox_delete`.
_FAILED_CREATE_UNLISTED = "sandbox-failed-create-unlisted"

# Runs begun before this patch fail the call whose mirror write failed five
# times, and leave the mirror row as it was, such as a deleted sandbox that
# `sandbox_list` still shows as running. Newer runs keep that change pending
# and retry it until the database takes it, before the run ends.
_MIRROR_RETRIED = "sandbox-mirror-retried"

# Runs begun before this patch let a call that finds its sandbox lost after a
# stop or delete recreate it, and fail a call that the end cut short with the
# backend's own error.
_NO_RECREATE_AFTER_END = "sandbox-no-recreate-after-end"

# Runs begun before this patch keep their log lines by count and characters
# only, so CJK or control characters could grow the state that continues as
# new past Temporal's payload limit.
_BOUNDED_STATE = "sandbox-bounded-state"

# Runs begun before this patch fail a call whose activity timed out with the
# error type SandboxInvalidArgument, which reads as the caller's mistake.
_TIMED_OUT_CALLS = "sandbox-timed-out-calls"


# Unsandboxed: the workflow sandbox re-imports modules and wraps every
# activation, which costs each execute and create call milliseconds per
# workflow task. This module imports only the pure contracts, and the replay
# tests keep it deterministic.
@workflow.defn(sandboxed=False)
class SandboxSessionWorkflow:
    """Own one sandbox: create it, serve calls as updates, recreate it when lost.

    Updates: `ready`, `execute`, `upload`, `configure`, `describe`, `stop`,
    `delete`. Signal: `interrupt`. Queries: `info`, `logs`.
    """

    @workflow.init
    def __init__(self, request: SessionInput) -> None:
        self._state = request.state
        self._recreate_lock = asyncio.Lock()
        # The handler of each execution that runs its program now, by call id.
        self._executing: dict[str, asyncio.Task[object]] = {}
        self._interrupted: set[str] = set()
        self._early_interrupts: list[str] = []
        # Calls whose results this run recorded, each with the history length
        # of the workflow task that recorded it. Their start counts in the
        # sandbox go with the next execution whose task comes later, when
        # the recording is sure to be committed (see `runtime.execute`).
        self._settled: list[tuple[str, int]] = []
        # The error type of a failed creation, which `ready` passes on, so a
        # failed setup reads as the caller's error. A failed session never
        # continues as new, so this needs no place in the state.
        self._create_failure_type = CONFIGURATION_ERROR
        # The newest mirror change not yet written, and the lock that keeps
        # the writes in order. The run retries a pending change until it is
        # written, so this never needs to outlive the run.
        self._mirror_pending: RecordInput | None = None
        self._mirror_lock = asyncio.Lock()
        self._mirror_retrying = False

    @workflow.run
    async def run(self, request: SessionInput) -> SessionResult:
        state = self._state
        if state.backend_id is None and state.status == "creating":
            await self._create_first()
        if state.status == "running":
            while True:
                await workflow.wait_condition(
                    lambda: (
                        state.end_request is not None
                        or workflow.info().is_continue_as_new_suggested()
                        or self._mirror_failed()
                    )
                )
                if not self._mirror_failed():
                    break
                await self._write_pending_record()
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._write_pending_record()
        if state.status == "running" and state.end_request is None:
            if workflow.patched(_BOUNDED_STATE):
                # Also shrinks the state of a run begun before the patch,
                # which could not continue as new otherwise.
                self._fit_state()
            workflow.logger.info(
                "sandbox session %s continues as new", state.spec.sandbox_id
            )
            workflow.continue_as_new(SessionInput(state=state))
        if (
            state.end_request is not None
            and state.status != "deleted"
            and state.backend_id is not None
            and workflow.patched(_DELETE_STOPPED)
        ):
            # A stopped session takes no more calls and never recreates its
            # sandbox. Its status, events and logs live in this workflow and
            # the mirror row, so nothing needs what the stop left on the
            # backend. The delete waits for the calls in flight, because an
            # execution that the stop ended reads the local backend's stopped
            # mark to say so. After a stop or delete whose activity failed,
            # this delete is the next try.
            await self._delete_backend(state.backend_id, "ended")
            await workflow.wait_condition(workflow.all_handlers_finished)
            await self._write_pending_record()
        return SessionResult(
            sandbox_id=state.spec.sandbox_id,
            status=state.status,
            recreated=state.recreated,
            error=state.error,
        )

    # Lifecycle.

    def _next_backend_id(self) -> str:
        self._state.generation += 1
        return f"{self._state.spec.sandbox_id}-g{self._state.generation}"

    async def _create_first(self) -> None:
        state = self._state
        spec = state.spec
        listed = not workflow.patched(_LOCAL_RECORDS) or bool(
            spec.install_packages or spec.setup_commands
        )
        if listed:
            # Only a setup can make creation slow enough for a list to see it.
            await self._record("creating")
        try:
            created = await self._create_backend("create")
        except (ActivityError, ApplicationError) as error:
            # A local activity's non-retryable failure arrives as the
            # ApplicationError itself, not wrapped in an ActivityError.
            if isinstance(error, ApplicationError) and not workflow.patched(
                _LOCAL_CREATE_FAILURE
            ):
                raise
            state.error = _cause_message(error)
            cause = _application_failure(error)
            if cause is not None and cause.type:
                self._create_failure_type = cause.type
            self._event("failed", detail=state.error)
            workflow.logger.warning(
                "sandbox %s could not be created: %s",
                state.spec.sandbox_id,
                state.error,
            )
            # The mirror row changes before `ready` learns of the failure.
            if not workflow.patched(_FAILED_CREATE_UNLISTED):
                await self._record("failed")
            elif listed:
                # The backend sandbox is gone already, so a failed creation
                # leaves no row either. This history keeps the error.
                await self._record("failed", delete=True)
            state.status = "failed"
            return
        state.status = "running"
        state.backend = created.backend
        state.backend_id = created.backend_id
        state.created_at = workflow.now()
        self._event("created", backend_id=created.backend_id)
        self._log_output("setup", created.setup_output)
        await self._record("running")

    async def _create_backend(self, reason: str) -> CreateResult:
        spec = self._state.spec
        request = CreateInput(
            spec=spec, backend_id=self._next_backend_id(), reason=reason
        )
        if self._state.local_calls and not (
            spec.install_packages or spec.setup_commands
        ):
            # Without a setup, a local creation takes a spare runner and is
            # as short as an execution.
            return await self._call(
                "sandbox_create", request, CreateResult, timedelta(minutes=2)
            )
        return await workflow.execute_activity(
            "sandbox_create",
            request,
            task_queue=SANDBOX,
            start_to_close_timeout=timedelta(minutes=20),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=_CALL_RETRY,
            result_type=CreateResult,
        )

    async def _recreate(self, lost_backend_id: str, reason: str) -> None:
        # A stop or delete that kills the sandbox while a call is on its way
        # to it makes that call see a lost sandbox. An ended session never
        # recreates it, so the call fails with ENDED_ERROR instead.
        async with self._recreate_lock:
            state = self._state
            if self._ended():
                raise self._ended_error()
            if state.backend_id != lost_backend_id:
                return  # a concurrent call already recreated it
            workflow.logger.info(
                "sandbox %s lost (%s); recreating it", state.spec.sandbox_id, reason
            )
            created = await self._create_backend("recreate")
            if self._ended():
                # The stop or delete came during the creation and ended the
                # old sandbox. The new one gets no mirror row and is removed
                # here, and the session's end removes the old one.
                await self._delete_backend(created.backend_id, "ended")
                raise self._ended_error()
            state.backend_id = created.backend_id
            state.recreated += 1
            self._event(
                "recreated",
                backend_id=created.backend_id,
                detail=reason,
                count=state.recreated,
            )
            self._log_output("setup", created.setup_output)
            await self._record("running")
            if workflow.patched(_CLEAN_LOST):
                await self._delete_backend(lost_backend_id, "lost")

    async def _delete_backend(self, backend_id: str, kind: str) -> None:
        """Remove what is left of a lost or ended sandbox on the backend.

        A failure is logged and costs only disk. The local backend then keeps
        the sandbox's state file, and for a stopped sandbox `sandbox_delete`
        tries again.
        """
        try:
            await workflow.execute_activity(
                "sandbox_delete",
                BackendRef(
                    sandbox_id=self._state.spec.sandbox_id, backend_id=backend_id
                ),
                task_queue=SANDBOX,
                start_to_close_timeout=timedelta(seconds=120),
                retry_policy=RetryPolicy(maximum_attempts=2),
            )
        except ActivityError as error:
            workflow.logger.warning(
                "could not delete %s sandbox %s of %s: %s",
                kind,
                backend_id,
                self._state.spec.sandbox_id,
                _cause_message(error),
            )

    async def _with_sandbox(self, call: Callable[[str], Awaitable[T]]) -> tuple[T, int]:
        """Run `call(backend_id)`, recreating a lost sandbox a bounded number of
        times; return its result and how many recreations it needed."""
        recreated = 0
        while True:
            backend_id = self._state.backend_id
            assert backend_id is not None
            try:
                return await call(backend_id), recreated
            except (ActivityError, ApplicationError) as error:
                interrupted = (
                    isinstance(error, ApplicationError)
                    and error.type == INTERRUPTED_ERROR
                )
                if not interrupted and self._ended():
                    # The stop or delete killed the sandbox under this call.
                    workflow.logger.info(
                        "a call to sandbox %s ended with its %s: %s",
                        self._state.spec.sandbox_id,
                        self._state.end_request,
                        _cause_message(error),
                    )
                    raise self._ended_error(cut_short=True) from None
                cause = _application_failure(error)
                lost = cause is not None and cause.type == LOST_ERROR
                if lost and recreated < self._state.max_recreations:
                    try:
                        await self._recreate(backend_id, _cause_message(error))
                    except ActivityError as failure:
                        raise self._call_error(failure) from None
                    recreated += 1
                    continue
                raise self._call_error(error) from None

    def _call_error(self, error: ActivityError | ApplicationError) -> ApplicationError:
        """Build the error that an update returns for a failed backend call."""
        if (
            isinstance(error, ActivityError)
            and isinstance(error.cause, TimeoutError)
            and workflow.patched(_TIMED_OUT_CALLS)
        ):
            return ApplicationError(
                f"a call to sandbox {self._state.spec.sandbox_id} timed out: the "
                f"sandbox did not answer ({error.cause.message}). A program "
                "that it ran may have run in part. Retry the call; a sandbox "
                "whose runner stopped answering is recreated",
                type=TIMED_OUT_ERROR,
                non_retryable=True,
            )
        return _update_error(error)

    async def _call(
        self,
        name: str,
        arg: object,
        result_type: type[T],
        timeout: timedelta,
        heartbeat: bool = True,
    ) -> T:
        """Run one backend call: a local activity where the session allows it,
        else an activity on the sandbox queue. `timeout` bounds each attempt
        and all attempts together, so a backend that stops answering fails
        the call within it rather than after every retry's full time."""
        if self._state.local_calls:
            # The local backend's runner listens on a socket under the data
            # folder, so this worker can make the call itself and skip the
            # round trip through the server and the nexus-sandbox worker.
            return await workflow.execute_local_activity(
                name,
                arg,
                start_to_close_timeout=timeout,
                schedule_to_close_timeout=timeout,
                retry_policy=_CALL_RETRY,
                result_type=result_type,
            )
        return await workflow.execute_activity(
            name,
            arg,
            task_queue=SANDBOX,
            start_to_close_timeout=timeout,
            schedule_to_close_timeout=timeout,
            heartbeat_timeout=timedelta(seconds=60) if heartbeat else None,
            retry_policy=_CALL_RETRY,
            result_type=result_type,
        )

    async def _record(self, status: str, *, delete: bool = False) -> None:
        """Write a change of the mirror row.

        A write that fails its first attempts stays pending, and the run
        retries it until the database takes it, so the call that made the
        change does not fail for it.
        """
        state = self._state
        change = RecordInput(
            spec=state.spec,
            status=status,
            backend=state.backend,
            backend_id=state.backend_id,
            recreated=state.recreated,
            delete=delete,
        )
        if workflow.patched(_MIRROR_RETRIED):
            self._mirror_pending = change
            if self._mirror_retrying:
                # The run's retry loop writes the newest change next. Waiting
                # for it would hold the call for as long as the database is
                # down.
                return
            async with self._mirror_lock:
                if self._mirror_pending is not change:
                    return  # a newer change, written after this one's turn
                try:
                    await self._write_record(change, _RECORD_RETRY)
                except (ActivityError, ApplicationError) as error:
                    workflow.logger.warning(
                        "sandbox %s: the mirror row update to %r failed (%s); "
                        "retrying it until the database takes it",
                        state.spec.sandbox_id,
                        "deleted" if delete else status,
                        _cause_message(error),
                    )
                    return
                if self._mirror_pending is change:
                    self._mirror_pending = None
            return
        if workflow.patched(_LOCAL_RECORDS):
            # One database write, registered on this workflow's own worker:
            # a local activity saves the round trip through the server.
            await workflow.execute_local_activity(
                "sandbox_record",
                change,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=5),
            )
            return
        await workflow.execute_activity(
            "sandbox_record",
            change,
            task_queue=ORCHESTRATION,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=5),
        )

    def _mirror_failed(self) -> bool:
        """Return whether a mirror change failed its first write and no
        write of it is under way."""
        return self._mirror_pending is not None and not self._mirror_lock.locked()

    async def _write_pending_record(self) -> None:
        """Write the pending mirror change, retrying until the database
        takes it; the newest change wins when calls make more meanwhile."""
        async with self._mirror_lock:
            self._mirror_retrying = True
            try:
                while (change := self._mirror_pending) is not None:
                    await self._write_record(change, _PENDING_RECORD_RETRY)
                    if self._mirror_pending is change:
                        self._mirror_pending = None
                    workflow.logger.info(
                        "sandbox %s: the mirror row update to %r was written",
                        self._state.spec.sandbox_id,
                        "deleted" if change.delete else change.status,
                    )
            finally:
                self._mirror_retrying = False

    async def _write_record(self, change: RecordInput, retry: RetryPolicy) -> None:
        # One database write, registered on this workflow's own worker: a
        # local activity saves the round trip through the server.
        await workflow.execute_local_activity(
            "sandbox_record",
            change,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=retry,
        )

    def _event(
        self,
        kind: str,
        *,
        backend_id: str | None = None,
        detail: str | None = None,
        count: int | None = None,
    ) -> None:
        events = self._state.events
        events.append(
            SessionEvent(
                kind=kind,
                at=workflow.now(),
                backend_id=backend_id,
                detail=detail,
                count=count,
            )
        )
        del events[:-_EVENTS_KEPT]

    def _log_output(self, stream: str, text: str) -> None:
        if not text:
            return
        lines = self._state.log_lines
        lines += [f"[{stream}] {line[:_LOG_LINE_CHARS]}" for line in text.splitlines()]
        del lines[:-LOG_LINES_KEPT]
        if workflow.patched(_BOUNDED_STATE):
            _drop_old_lines(lines, LOG_BYTES_KEPT)

    def _fit_state(self) -> None:
        """Drop the oldest log lines, then the oldest events, until the state
        that continues as new takes at most STATE_LIMIT bytes encoded."""
        state = self._state
        _drop_old_lines(state.log_lines, LOG_BYTES_KEPT)
        excess = encoded_size(SessionInput(state=state)) - STATE_LIMIT
        while excess > 0 and state.log_lines:
            excess -= encoded_size(state.log_lines.pop(0)) + 1
        while excess > 0 and state.events:
            excess -= encoded_size(state.events.pop(0)) + 1
        if excess > 0:
            # Only the spec is left, which the calls' size checks keep small.
            workflow.logger.warning(
                "sandbox session %s state is %d bytes over %d after dropping "
                "its logs and events",
                state.spec.sandbox_id,
                excess,
                STATE_LIMIT,
            )

    async def _wait_running(self) -> None:
        await workflow.wait_condition(lambda: self._state.status != "creating")
        if self._state.status != "running":
            raise ApplicationError(
                f"sandbox {self._state.spec.sandbox_id} is {self._state.status}"
                + (f": {self._state.error}" if self._state.error else ""),
                type=self._create_failure_type,
                non_retryable=True,
            )

    def _check_accepting(self) -> None:
        state = self._state
        if state.end_request is not None:
            raise self._ended_error()
        if state.status in ("failed", "stopped", "deleted"):
            raise ValueError(
                f"sandbox {state.spec.sandbox_id} is {state.status}; create a new one"
            )

    def _ended(self) -> bool:
        """Return whether a stop or delete was accepted, so no call may
        recreate the sandbox. Runs from before the patch return False."""
        return self._state.end_request is not None and workflow.patched(
            _NO_RECREATE_AFTER_END
        )

    def _ended_error(self, *, cut_short: bool = False) -> ApplicationError:
        """Build the error for a call that a stop or delete turned away or,
        with `cut_short`, ended before it finished."""
        state = self._state
        ended_as = "stopped" if state.end_request == "stop" else "deleted"
        if state.status in ("creating", "running"):
            where = f"sandbox {state.spec.sandbox_id} is being {ended_as}"
        else:
            where = f"sandbox {state.spec.sandbox_id} is {state.status}"
        if cut_short:
            # The backend's own error (a lost sandbox, a setup command killed
            # without an exit code) would blame the caller's request.
            message = (
                f"{where}, which ended this call before it finished. A {ended_as} "
                "sandbox is not recreated"
            )
        else:
            message = f"{where}, so it takes no more calls"
        return ApplicationError(
            f"{message}; create a new sandbox with sandbox_create",
            type=ENDED_ERROR,
            non_retryable=True,
        )

    # Updates.

    @workflow.update
    async def ready(self) -> SessionInfo:
        """Wait until the first creation finished; fail if it failed."""
        await self._wait_running()
        return self.info()

    @workflow.signal
    def interrupt(self, call_id: str) -> None:
        """Stop the program of the execution with `call_id`: its call is
        cancelled, which kills the program, and the execution fails.

        A caller that stops waiting for an execution (a cancelled swarm task)
        sends this, since the program would otherwise run to its timeout.
        The server takes the signal at once. While a program runs as a local
        activity, the session handles it at the workflow task's next
        heartbeat, about 8 s later."""
        handler = self._executing.get(call_id)
        if handler is None:
            # Its execution may be delivered after this signal.
            self._early_interrupts.append(call_id)
            del self._early_interrupts[:-_EARLY_INTERRUPTS_KEPT]
            return
        if call_id not in self._interrupted:
            self._interrupted.add(call_id)
            handler.cancel()

    @workflow.update
    async def execute(self, request: ExecuteRequest) -> ExecuteResult:
        await self._wait_running()
        spec = self._state.spec
        call_id = request.call_id

        async def call(backend_id: str) -> ExecuteResult:
            execute = ExecuteInput(
                spec=spec,
                backend_id=backend_id,
                request=request,
                settled_call_ids=self._take_settled(),
            )
            if call_id is None:
                return await self._execute_call(execute)
            if call_id in self._early_interrupts:
                raise self._interrupted_error(call_id, started=False)
            # Registered only around the backend call, so an interrupt never
            # cuts short a recreation.
            handler = asyncio.current_task()
            assert handler is not None
            self._executing[call_id] = handler
            try:
                return await self._execute_call(execute)
            except ActivityError as error:
                # The cancelled call resolves as a cancelled activity.
                if not self._take_interrupt(call_id):
                    raise
                raise self._interrupted_error(call_id) from error
            finally:
                self._executing.pop(call_id, None)

        try:
            result, recreated = await self._with_sandbox(call)
        except asyncio.CancelledError:
            if call_id is None or not self._take_interrupt(call_id):
                raise
            raise self._interrupted_error(call_id) from None
        result.recreated = recreated
        if call_id is not None:
            length = workflow.info().get_current_history_length()
            self._settled.append((call_id, length))
        self._log_output("stdout", result.stdout)
        self._log_output("stderr", result.stderr)
        return result

    def _take_settled(self) -> list[str]:
        """Remove and return the settled calls recorded in earlier workflow
        tasks than this one."""
        length = workflow.info().get_current_history_length()
        taken = [call for call, at in self._settled if at < length]
        self._settled = [(call, at) for call, at in self._settled if at >= length]
        return taken

    async def _execute_call(self, execute: ExecuteInput) -> ExecuteResult:
        return await self._call(
            "sandbox_execute",
            execute,
            ExecuteResult,
            timedelta(seconds=execute.request.timeout + 120),
        )

    def _take_interrupt(self, call_id: str) -> bool:
        """Return whether an interrupt for `call_id` cancelled its execution,
        and consume that interrupt."""
        if call_id not in self._interrupted:
            return False
        self._interrupted.discard(call_id)
        return True

    def _interrupted_error(
        self, call_id: str, *, started: bool = True
    ) -> ApplicationError:
        self._event("interrupted", detail=f"execution {call_id}")
        outcome = "its program was stopped" if started else "it did not run"
        return ApplicationError(
            f"execution {call_id} in sandbox {self._state.spec.sandbox_id} was "
            f"interrupted, and {outcome}",
            type=INTERRUPTED_ERROR,
            non_retryable=True,
        )

    @execute.validator
    def _validate_execute(self, request: ExecuteRequest) -> None:
        self._check_accepting()
        if not request.code.strip():
            raise ValueError("code is empty; pass the program to run")
        if request.timeout <= 0:
            raise ValueError(f"timeout {request.timeout} must be positive")
        if request.working_dir is not None:
            check_relative_path(request.working_dir, "working_dir")
        known = {*self._state.spec.sealed_env, *request.sealed_env}
        unknown = sorted(set(request.mask_env) - known)
        if unknown:
            raise ValueError(
                f"mask_env_vars {unknown} are not env vars of this execution "
                f"or of sandbox {self._state.spec.sandbox_id} (it has "
                f"{sorted(known)}); name only env vars that are set"
            )

    @workflow.update
    async def upload(self, request: UploadRequest) -> UploadResult:
        await self._wait_running()
        spec = self._state.spec

        async def call(backend_id: str) -> UploadResult:
            return await self._call(
                "sandbox_upload",
                UploadInput(spec=spec, backend_id=backend_id, request=request),
                UploadResult,
                timedelta(seconds=120),
                heartbeat=False,
            )

        result, recreated = await self._with_sandbox(call)
        result.recreated = recreated
        return result

    @upload.validator
    def _validate_upload(self, request: UploadRequest) -> None:
        self._check_accepting()
        check_relative_path(request.file_path, "file_path")

    @workflow.update
    async def configure(self, request: ConfigureRequest) -> ConfigureResult:
        await self._wait_running()
        spec = self._state.spec

        async def call(backend_id: str) -> ConfigureResult:
            return await workflow.execute_activity(
                "sandbox_configure",
                ConfigureInput(spec=spec, backend_id=backend_id, request=request),
                task_queue=SANDBOX,
                start_to_close_timeout=timedelta(minutes=20),
                heartbeat_timeout=timedelta(seconds=60),
                retry_policy=_CALL_RETRY,
                result_type=ConfigureResult,
            )

        result, recreated = await self._with_sandbox(call)
        # Record the change only once it worked, so recreation repeats it.
        spec.sealed_env.update(request.sealed_env)
        spec.install_packages += request.install_packages
        spec.setup_commands += request.run_commands
        self._event(
            "configured",
            detail=(
                f"env {sorted(request.sealed_env)}, "
                f"{len(request.install_packages)} packages, "
                f"{len(request.run_commands)} commands"
            ),
        )
        self._log_output("setup", result.output)
        await self._record("running")
        result.recreated = recreated
        result.env_vars_configured = spec.env_names
        return result

    @configure.validator
    def _validate_configure(self, request: ConfigureRequest) -> None:
        self._check_accepting()
        if not (request.sealed_env or request.install_packages or request.run_commands):
            raise ValueError(
                "nothing to configure; pass env_vars, anthropic_key, "
                "install_packages or run_commands"
            )
        spec = self._state.spec
        changed = spec.model_copy(
            update={
                "sealed_env": {**spec.sealed_env, **request.sealed_env},
                "install_packages": spec.install_packages + request.install_packages,
                "setup_commands": spec.setup_commands + request.run_commands,
            }
        )
        size = encoded_size(changed)
        if size > SPEC_LIMIT:
            # The spec goes into every later call's input and the state that
            # continues as new, each within Temporal's payload limit.
            raise ValueError(
                f"this configure would make the configuration of sandbox "
                f"{spec.sandbox_id} (env_vars, install_packages, run_commands "
                f"and what earlier calls set) take {size} bytes, over the limit "
                f"of {SPEC_LIMIT} bytes; set fewer or smaller env vars, or "
                "upload large values as files with sandbox_upload"
            )

    @workflow.update
    async def describe(self) -> BackendState | None:
        """Read the sandbox's live state from the backend (None before creation)."""
        state = self._state
        if state.backend_id is None:
            return None
        return await self._call(
            "sandbox_describe",
            BackendRef(sandbox_id=state.spec.sandbox_id, backend_id=state.backend_id),
            BackendState,
            timedelta(seconds=60),
            heartbeat=False,
        )

    @workflow.update
    async def stop(self) -> SessionInfo:
        """Kill the sandbox on the backend and end the session."""
        return await self._end("stop")

    @workflow.update
    async def delete(self) -> SessionInfo:
        """Kill the sandbox, remove its files and its mirror row, end the session."""
        return await self._end("delete")

    async def _end(self, how: str) -> SessionInfo:
        state = self._state
        await workflow.wait_condition(lambda: state.status != "creating")
        if state.end_request is not None:
            return self.info()
        state.end_request = how  # type: ignore[assignment]
        if state.backend_id is not None:
            name = "sandbox_stop" if how == "stop" else "sandbox_delete"
            ref = BackendRef(
                sandbox_id=state.spec.sandbox_id, backend_id=state.backend_id
            )
            try:
                if state.local_calls and workflow.patched(_LOCAL_END):
                    # A local activity starts in the workflow task that
                    # accepted this update, so it kills a program that another
                    # local activity runs. An activity on the sandbox queue
                    # could only be scheduled when that task ends, at its next
                    # heartbeat.
                    await self._call(
                        name, ref, type(None), timedelta(seconds=120), heartbeat=False
                    )
                else:
                    await workflow.execute_activity(
                        name,
                        ref,
                        task_queue=SANDBOX,
                        start_to_close_timeout=timedelta(seconds=120),
                        retry_policy=_CALL_RETRY,
                    )
            except (ActivityError, ApplicationError) as error:
                if not workflow.patched(_END_FAILURE):
                    raise
                # The session ends anyway, and its end tries the delete once
                # more. Until now its status and mirror row stayed `running`.
                state.status = "failed"
                state.error = f"the {how} failed: {_cause_message(error)}"
                self._event("failed", detail=state.error)
                await self._record("failed")
                # The bare activity failure reads "Activity task failed"; the
                # caller needs the cause and what to do.
                cause = _application_failure(error)
                raise ApplicationError(
                    f"{state.error}. Call sandbox_{how} again to retry it.",
                    type=cause.type if cause is not None and cause.type else None,
                    non_retryable=True,
                ) from None
        state.status = "stopped" if how == "stop" else "deleted"
        self._event(state.status, backend_id=state.backend_id)
        await self._record(state.status, delete=how == "delete")
        return self.info()

    # Queries.

    @workflow.query
    def info(self) -> SessionInfo:
        state = self._state
        spec = state.spec
        return SessionInfo(
            sandbox_id=spec.sandbox_id,
            name=spec.name,
            template=spec.template,
            status=state.status,
            backend=state.backend,
            backend_id=state.backend_id,
            env_vars_configured=spec.env_names,
            timeout=spec.timeout,
            metadata=spec.metadata,
            install_packages=spec.install_packages,
            recreated=state.recreated,
            created_at=state.created_at,
            error=state.error,
            events=state.events,
        )

    @workflow.query
    def logs(self, lines: int) -> list[str]:
        return self._state.log_lines[-lines:] if lines > 0 else []


def _drop_old_lines(lines: list[str], limit: int) -> None:
    """Drop the oldest of `lines` until their JSON encoding takes at most
    `limit` bytes."""
    total = 2 + sum(encoded_size(line) + 1 for line in lines)
    dropped = 0
    while total > limit and dropped < len(lines):
        total -= encoded_size(lines[dropped]) + 1
        dropped += 1
    del lines[:dropped]


def _application_failure(
    error: ActivityError | ApplicationError,
) -> ApplicationError | None:
    """The activity's own error: an activity's failure arrives wrapped in
    ActivityError, a local activity's non-retryable one arrives as itself."""
    if isinstance(error, ApplicationError):
        return error
    return error.cause if isinstance(error.cause, ApplicationError) else None


def _cause_message(error: ActivityError | ApplicationError) -> str:
    cause = _application_failure(error)
    if cause is not None:
        return str(cause.message)
    return str(error.cause or error) if isinstance(error, ActivityError) else str(error)


def _update_error(error: ActivityError | ApplicationError) -> ApplicationError:
    cause = _application_failure(error)
    kind = cause.type if cause is not None and cause.type else INVALID_ERROR
    return ApplicationError(_cause_message(error), type=kind, non_retryable=True)
