"""`FlowNexusWorkflow`: one execution of a user-defined Flow Nexus workflow.

The steps form a DAG through `depends_on`. Every step whose dependencies
are done runs at once, as an activity on its type's task queue (or as a
local activity for cheap types), with the step's `timeout` as the
start-to-close timeout and `retry_attempts` retries. A failed step skips its
dependents, but independent branches still run. The run then fails with the
first failed step's error, unless that step has `continue_on_failure`.
"""

from __future__ import annotations

import asyncio
import heapq
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import Priority, RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    RetryState,
    TimeoutError,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from app.contracts.workflows import (
        AgentAssignment,
        AuditEntry,
        ExecutionState,
        FlowInput,
        ProgressRecord,
        RegisteredExecution,
        RegisterExecution,
        StepOutcome,
        StepRequest,
        StepSpec,
        StepState,
    )
    from app.temporal.search_attributes import (
        DEFINITION_ID,
        DEFINITION_NAME,
        EXECUTION_KIND,
    )
    from app.workflows.steps import StepType, get_step_type, step_type_names
    from app.workflows.templates import TemplateError, render, whole_references
    from app.workflows.validation import (
        DefinitionError,
        ancestors,
        describe_input_errors,
        topological_order,
        validate_definition,
    )

EXECUTION_KIND_VALUE = "flow_nexus_workflow"
# Errors that no retry can fix; the activities raise them with these types.
NON_RETRYABLE_TYPES = ["InvalidStepParams", "StepTypeNotAvailable"]
_RECORD_TIMEOUT = timedelta(seconds=30)
# Bytes a run's result may take, with room below Temporal's 2 MB payload
# limit for the encoding and the history event around it.
RESULT_LIMIT = 1_500_000
# Executions started before this patch wrote progress before every wait.
_PATCH_BATCH_LOCAL_PROGRESS = "batch-local-step-progress"
# Executions started before this patch ran `sandbox_execution` steps with no
# heartbeat timeout, so a cancel did not wait for the step's activity.
_PATCH_SANDBOX_STEP_HEARTBEAT = "sandbox-step-heartbeat"
_RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_attempts=10
)


def priority_key(priority: int) -> int:
    """Map Flow Nexus priority 0-10 (10 most urgent) onto Temporal's priority
    keys 1-5 (1 most urgent, 3 the default): 0->5, 5->3, 10->1."""
    return 5 - round(priority * 4 / 10)


# Unsandboxed: the sandbox re-imports this module for every execution and
# wraps every activation and payload, which cost this workflow about 40% of
# its throughput (bench/orchestration.py). The module imports only the pure
# contract, validation and template modules above, and the replay tests keep
# it deterministic.
@workflow.defn(sandboxed=False)
class FlowNexusWorkflow:
    """Run one execution; query `state` for every step's state."""

    def __init__(self) -> None:
        self._state: ExecutionState | None = None
        # Insertion-ordered set of the steps changed since the last write.
        self._changed: dict[str, None] = {}
        self._by_name: dict[str, StepState] = {}
        self._events: list[AuditEntry] = []
        self._running: dict[asyncio.Task[StepOutcome], str] = {}
        self._max_attempts: dict[str, int] = {}

    @workflow.query(name="state")
    def state(self) -> ExecutionState:
        if self._state is None:
            raise ApplicationError("the execution has not started yet; query again")
        return self._state

    @workflow.update(name="assign_agent")
    def assign_agent(self, assignment: AgentAssignment) -> StepState:
        step = self._step(assignment.step)
        step.agent = assignment.agent
        step.agent_type = assignment.agent_type
        step.agent_id = assignment.agent_id
        return step

    @assign_agent.validator
    def _validate_assignment(self, assignment: AgentAssignment) -> None:
        if self._state is None:
            raise ValueError("the execution has not started yet")
        names = [s.name for s in self._state.steps]
        if assignment.step not in names:
            raise ValueError(f"execution has no step {assignment.step!r}: {names}")
        status = self._step(assignment.step).status
        if status != "pending":
            raise ValueError(
                f"step {assignment.step!r} is {status}; only a pending step can "
                "get another agent"
            )

    # The input is typed Any so that the SDK hands over any JSON: a FlowInput
    # that fails its model would otherwise fail to decode, and the SDK retries
    # a workflow task that cannot decode its input for ever.
    @workflow.run
    async def run(self, raw: Any) -> ExecutionState:
        """Run one execution of a `FlowInput` (or its JSON); an input that
        does not fit the model fails the run, naming the field."""
        try:
            request = FlowInput.model_validate(raw)
            validate_definition(request.definition, step_type_names())
        except ValidationError as error:
            raise ApplicationError(
                str(DefinitionError(describe_input_errors(error))),
                type="InvalidDefinition",
                non_retryable=True,
            ) from None
        except DefinitionError as error:
            raise ApplicationError(
                str(error), type="InvalidDefinition", non_retryable=True
            ) from None
        definition = request.definition
        specs = {s.name: s for s in definition.steps}
        self._max_attempts = {s.name: s.retry_attempts + 1 for s in definition.steps}
        types = {s.name: self._step_type(s) for s in definition.steps}
        info = workflow.info()
        state = ExecutionState(
            execution_id=info.workflow_id,
            run_id=info.run_id,
            workflow_id=request.workflow_id,
            version=request.version,
            name=definition.name,
            priority=definition.priority,
            input_data=request.input_data,
            started_at=workflow.now(),
            steps=[
                StepState(
                    name=s.name,
                    type=s.type,
                    depends_on=list(s.depends_on),
                    # A local activity runs in this workflow's worker.
                    task_queue=(
                        info.task_queue
                        if types[s.name].local
                        else types[s.name].task_queue
                    ),
                    agent=s.agent,
                    agent_type=s.agent_type,
                )
                for s in definition.steps
            ],
        )
        self._state = state
        self._by_name = {step.name: step for step in state.steps}
        registered: RegisteredExecution = await workflow.execute_local_activity(
            "workflow_register_execution",
            RegisterExecution(state=state, input=request),
            start_to_close_timeout=_RECORD_TIMEOUT,
            retry_policy=_RECORD_RETRY,
            result_type=RegisteredExecution,
        )
        state.workflow_id = registered.workflow_id
        state.version = registered.version
        for name, agent_id in registered.agents.items():
            self._step(name).agent_id = agent_id
        self._publish_visibility(state)
        self._event(None, "execution.started", "running")
        workflow.logger.info(
            "execution %s of %s v%d started",
            state.execution_id,
            state.name,
            state.version,
        )
        try:
            await self._run_steps(request, specs, types)
        except asyncio.CancelledError:
            await self._finish_cancelled()
            raise
        return await self._finish(specs)

    def _step_type(self, spec: StepSpec) -> StepType:
        found = get_step_type(spec.type)
        assert found is not None  # validate_definition checked the type
        return found

    def _step(self, name: str) -> StepState:
        return self._by_name[name]

    def _publish_visibility(self, state: ExecutionState) -> None:
        assert state.workflow_id is not None
        workflow.upsert_search_attributes(
            [
                DEFINITION_ID.value_set(state.workflow_id),
                DEFINITION_NAME.value_set(state.name),
                EXECUTION_KIND.value_set(EXECUTION_KIND_VALUE),
            ]
        )
        workflow.upsert_memo(
            {
                "definition_name": state.name,
                "workflow_id": state.workflow_id,
                "version": state.version,
            }
        )

    def _event(
        self,
        step: str | None,
        event: str,
        status: str,
        attempt: int | None = None,
        **details: Any,
    ) -> None:
        assert self._state is not None
        if step is not None:
            self._changed[step] = None
        self._events.append(
            AuditEntry(
                execution_id=self._state.execution_id,
                workflow_id=self._state.workflow_id,
                step=step,
                event=event,
                status=status,
                at=workflow.now(),
                attempt=attempt,
                details=details,
            )
        )

    async def _flush(self) -> None:
        """Persist the changed steps and the new audit entries."""
        assert self._state is not None
        if not self._events and not self._changed:
            return
        record = ProgressRecord(
            state=self._state,
            changed_steps=list(self._changed),
            events=list(self._events),
        )
        await workflow.execute_local_activity(
            "workflow_record_progress",
            record,
            start_to_close_timeout=_RECORD_TIMEOUT,
            retry_policy=_RECORD_RETRY,
        )
        # Cleared only after the write, so a cancelled write is repeated.
        self._changed.clear()
        self._events.clear()

    async def _run_steps(
        self,
        request: FlowInput,
        specs: dict[str, StepSpec],
        types: dict[str, StepType],
    ) -> None:
        upstream = ancestors(specs.values())
        order = topological_order(specs.values())
        position = {name: index for index, name in enumerate(order)}
        # Each step counts its dependencies that have not reached a final
        # status; at zero it can be decided, so it goes on the heap.
        # Deciding in topological order, as one scan over the pending steps
        # did, keeps the order of the commands that recorded runs replay.
        dependents: dict[str, list[str]] = {name: [] for name in order}
        unsettled: dict[str, int] = {}
        for name in order:
            dependencies = set(specs[name].depends_on)
            unsettled[name] = len(dependencies)
            for dependency in dependencies:
                dependents[dependency].append(name)
        decidable = [position[name] for name in order if not unsettled[name]]
        heapq.heapify(decidable)
        undecided = len(order)

        def settle(name: str) -> None:
            for dependent in dependents[name]:
                unsettled[dependent] -= 1
                if not unsettled[dependent]:
                    heapq.heappush(decidable, position[dependent])

        outputs: dict[str, dict[str, Any]] = {}
        running = self._running
        while True:
            while decidable:
                name = order[heapq.heappop(decidable)]
                undecided -= 1
                decision = self._readiness(specs[name], specs)
                if decision != "ready":
                    self._skip(name, decision)
                    settle(name)
                    continue
                task = self._start(
                    request, specs[name], types[name], outputs, upstream[name]
                )
                if task is None:
                    settle(name)
                else:
                    running[task] = name
            if not running and not undecided:
                return
            if self._flush_now(running, types):
                await self._flush()
            if not running:
                # Only reachable when every remaining step waits on nothing
                # that runs, which validation rules out; guard against a loop.
                pending = [n for n in order if self._step(n).status == "pending"]
                raise ApplicationError(
                    f"steps {pending} can never start", non_retryable=True
                )
            done, _ = await workflow.wait(
                list(running), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                name = running.pop(task)
                self._complete(name, task, outputs)
                settle(name)

    def _flush_now(
        self, running: dict[asyncio.Task[StepOutcome], str], types: dict[str, StepType]
    ) -> bool:
        """Decide whether to write progress before waiting on the running steps.

        While only local (cheap) steps run, their transitions are written
        together with the next remote step's or at the end: the live query
        shows them meanwhile, and a database write per transition would cost
        more than the steps themselves.
        """
        if not workflow.patched(_PATCH_BATCH_LOCAL_PROGRESS):
            return True
        return any(not types[name].local for name in running.values())

    def _readiness(self, spec: StepSpec, specs: dict[str, StepSpec]) -> str:
        """Return "ready", "wait", or the reason to skip the step."""
        waiting = False
        for dependency in spec.depends_on:
            step = self._step(dependency)
            tolerated = (
                step.status == "failed" and specs[dependency].continue_on_failure
            )
            if step.status in ("skipped", "cancelled") or (
                step.status == "failed" and not tolerated
            ):
                return f"upstream step {dependency!r} {step.status}"
            if step.status in ("pending", "running"):
                waiting = True
        return "wait" if waiting else "ready"

    def _skip(self, name: str, reason: str) -> None:
        step = self._step(name)
        step.status = "skipped"
        step.error = f"skipped because {reason}"
        step.finished_at = workflow.now()
        self._event(name, "step.skipped", "skipped", reason=reason)

    def _start(
        self,
        request: FlowInput,
        spec: StepSpec,
        step_type: StepType,
        outputs: dict[str, dict[str, Any]],
        upstream: set[str],
    ) -> asyncio.Task[StepOutcome] | None:
        assert self._state is not None
        step = self._step(spec.name)
        step.status = "running"
        step.started_at = workflow.now()
        self._event(spec.name, "step.running", "running", type=spec.type)
        try:
            params = render(spec.params, request.input_data, outputs)
        except TemplateError as error:
            self._fail(spec.name, f"step {spec.name!r}: {error}", attempts=0)
            return None
        step_request = StepRequest(
            execution_id=self._state.execution_id,
            workflow_id=self._state.workflow_id,
            step=spec.name,
            type=spec.type,
            params=params,
            agent_id=step.agent_id,
            groups=request.groups,
            upstream=(
                {n: outputs[n] for n in sorted(upstream) if n in outputs}
                if step_type.wants_upstream
                else {}
            ),
            references=whole_references(spec.params),
        )
        return asyncio.create_task(self._execute(spec, step_type, step_request))

    async def _execute(
        self, spec: StepSpec, step_type: StepType, request: StepRequest
    ) -> StepOutcome:
        assert self._state is not None
        retry = RetryPolicy(
            initial_interval=timedelta(seconds=1),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=60),
            maximum_attempts=spec.retry_attempts + 1,
            non_retryable_error_types=NON_RETRYABLE_TYPES,
        )
        timeout = timedelta(seconds=spec.timeout)
        heartbeat = (
            timedelta(seconds=step_type.heartbeat_timeout)
            if step_type.heartbeat_timeout
            else None
        )
        if (
            heartbeat is not None
            and step_type.name == "sandbox_execution"
            and not workflow.patched(_PATCH_SANDBOX_STEP_HEARTBEAT)
        ):
            heartbeat = None
        if step_type.local:
            return await workflow.execute_local_activity(
                step_type.activity,
                request,
                start_to_close_timeout=timeout,
                retry_policy=retry,
                activity_id=spec.name,
                summary=f"{spec.name} ({spec.type})",
                result_type=StepOutcome,
            )
        return await workflow.execute_activity(
            step_type.activity,
            request,
            task_queue=step_type.task_queue,
            start_to_close_timeout=timeout,
            retry_policy=retry,
            activity_id=spec.name,
            summary=f"{spec.name} ({spec.type})",
            priority=Priority(priority_key=priority_key(self._state.priority)),
            heartbeat_timeout=heartbeat,
            cancellation_type=(
                ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
                if heartbeat
                else ActivityCancellationType.TRY_CANCEL
            ),
            result_type=StepOutcome,
        )

    def _complete(
        self,
        name: str,
        task: asyncio.Task[StepOutcome],
        outputs: dict[str, dict[str, Any]],
    ) -> None:
        error = task.exception()
        if error is None:
            outcome = task.result()
            step = self._step(name)
            step.status = "completed"
            step.finished_at = workflow.now()
            step.attempts = outcome.attempt
            step.output = outcome.output
            outputs[name] = outcome.output
            self._event(name, "step.completed", "completed", outcome.attempt)
            return
        if not isinstance(error, FailureError):
            raise error
        message, attempts = _describe_failure(error, self._max_attempts[name])
        self._fail(name, message, attempts)

    def _fail(self, name: str, message: str, attempts: int) -> None:
        step = self._step(name)
        step.status = "failed"
        step.finished_at = workflow.now()
        step.attempts = attempts
        step.error = message
        self._event(name, "step.failed", "failed", attempts, error=message)
        workflow.logger.warning("step %s failed: %s", name, message)

    async def _finish(self, specs: dict[str, StepSpec]) -> ExecutionState:
        assert self._state is not None
        state = self._state
        fatal = [
            s
            for s in state.steps
            if s.status == "failed" and not specs[s.name].continue_on_failure
        ]
        state.closed_at = workflow.now()
        if fatal:
            state.status = "failed"
            state.error = f"step {fatal[0].name!r} failed: {fatal[0].error}"
            self._event(None, "execution.failed", "failed", error=state.error)
        else:
            state.status = "completed"
            self._event(None, "execution.completed", "completed")
        await self._flush()
        workflow.logger.info("execution %s %s", state.execution_id, state.status)
        if fatal:
            raise ApplicationError(
                state.error or "a step failed", type="StepFailed", non_retryable=True
            )
        return _bounded_result(state)

    async def _finish_cancelled(self) -> None:
        assert self._state is not None
        running = self._running
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        now = workflow.now()
        for step in self._state.steps:
            if step.status == "running":
                step.status = "cancelled"
                step.error = "cancelled while running"
                step.finished_at = now
                # The workflow learns of an activity's attempts when it ends,
                # and a cancelled one reports none: count the one that ran.
                step.attempts = max(step.attempts, 1)
                self._event(step.name, "step.cancelled", "cancelled")
            elif step.status == "pending":
                step.status = "skipped"
                step.error = "skipped because the execution was cancelled"
                step.finished_at = now
                self._event(step.name, "step.skipped", "skipped")
        self._state.status = "cancelled"
        self._state.closed_at = now
        self._state.error = "execution cancelled"
        self._event(None, "execution.cancelled", "cancelled")
        await self._flush()
        workflow.logger.info("execution %s cancelled", self._state.execution_id)


def _payload_size(value: object) -> int:
    return workflow.payload_converter().to_payloads([value])[0].ByteSize()


def _bounded_result(state: ExecutionState) -> ExecutionState:
    """Return the run's result within RESULT_LIMIT bytes.

    Temporal refuses a payload over 2 MB, and a workflow task whose result
    it refuses fails and is tried again without end: the run would stay
    running while its steps ran again. The largest step outputs, then the
    input, are left out and named in `omitted`; the database has them all.
    """
    if _payload_size(state) <= RESULT_LIMIT:
        return state
    result = state.model_copy(deep=True)
    sizes = sorted(
        (
            (_payload_size(step.output), index)
            for index, step in enumerate(result.steps)
        ),
        reverse=True,
    )
    for _, index in sizes:
        step = result.steps[index]
        if step.output is None:
            continue
        step.output = None
        result.omitted.append(f"steps.{step.name}.output")
        if _payload_size(result) <= RESULT_LIMIT:
            return result
    result.input_data = {}
    result.omitted.append("input_data")
    return result


def _describe_failure(error: FailureError, max_attempts: int) -> tuple[str, int]:
    """Return the step's error message and the attempts it took.

    An activity's failure arrives as an ActivityError around the cause; a
    local activity's failure arrives as the cause itself. The attempt comes
    from the last attempt's error details; a timed-out attempt has none, so
    when the retries ran out the count is the policy's maximum.
    """
    cause = error.cause if isinstance(error, ActivityError) else error
    message = (cause.message if isinstance(cause, FailureError) else str(cause)) or (
        error.message
    )
    attempts = 1
    if isinstance(error, ActivityError) and (
        error.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
    ):
        attempts = max_attempts
    if isinstance(cause, ApplicationError):
        for detail in reversed(cause.details):
            if isinstance(detail, dict) and isinstance(detail.get("attempt"), int):
                attempts = detail["attempt"]
                break
    elif isinstance(cause, TimeoutError) or (
        isinstance(error, ActivityError) and error.retry_state == RetryState.TIMEOUT
    ):
        message = f"timed out: {message}"
    return message, attempts
