"""The extended-duration benchmark: cycles of six phases, a memory sampler and
a report, as an operator's validation run of a deployment."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    is_cancelled_exception,
)
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from app.contracts.benchmark import (
        BenchmarkProgress,
        BenchmarkResult,
        BenchmarkState,
        CancelRunRequest,
        CycleAggregate,
        LoadOperationInput,
        PhaseInput,
        PhaseName,
        PhaseRecord,
        PhaseResult,
        PhaseTimes,
        ReportRequest,
        ReportResult,
        SampleBatch,
        SamplerInput,
        StartRunRequest,
        WorkerSample,
    )
    from app.contracts.queues import ALL_QUEUES, ORCHESTRATION, STREAMING
    from app.contracts.system import WorkerProbe
    from app.temporal.search_attributes import BENCHMARK_RUN_ID, EXECUTION_KIND

_ONCE = RetryPolicy(maximum_attempts=1)
_FEW = RetryPolicy(maximum_attempts=3)

# Before this patch a cancelled phase was recorded as failed and the run went
# on with its next phase, so a cancelled run never ended.
CANCELLED_RUN_PATCH = "benchmark-cancelled-run-ends"
_PHASE_CLEANUP_PATCH = "benchmark-phase-waits-for-cleanup"
# Before this patch a phase whose activity failed returned 0 operations, so
# the run's counts in its state did not include the failure.
_FAILED_PHASE_OPERATION_PATCH = "benchmark-failed-phase-counts-operation"
# Before this patch the run slept the whole cycle interval and then started
# the next cycle, even when the duration had passed during the sleep.
_INTERVAL_ENDS_AT_DURATION_PATCH = "benchmark-interval-ends-at-duration"
# Before this patch a phase whose workflow failed (rather than its activity)
# was counted in the run's state but wrote no phase row, so the report left
# it out.
_FAILED_PHASE_WORKFLOW_RECORDED_PATCH = "benchmark-failed-phase-workflow-recorded"
# A cancellation that arrives while a phase workflow is being started waits
# for the start and then cancels the phase like a running one.
_PHASE_START_SHIELDED_PATCH = "benchmark-phase-start-shielded"
# Runs before this patch completed a phase whose activity failed after the
# phase was asked to cancel, with the failure as its result.
_FAILED_AFTER_CANCEL_PATCH = "benchmark-phase-failed-after-cancel-cancelled"


async def _run_phase_child(request: PhaseInput, child_id: str) -> PhaseResult:
    """Run a phase's workflow as a child and return its result.

    A child whose start the run cancels after the start was sent still
    starts, and is then terminated when the run closes, without the phase's
    cleanup (a sandbox session left running). So the start is shielded from
    the run's cancellation: the run waits for it, then cancels the started
    child and waits for its end, as for a child cancelled while it runs.
    """
    start = asyncio.ensure_future(
        workflow.start_child_workflow(
            BenchmarkPhaseWorkflow.run,
            request,
            id=child_id,
            task_queue=ORCHESTRATION,
        )
    )
    try:
        handle = await asyncio.shield(start)
    except asyncio.CancelledError:
        handle = await start
        handle.cancel()
        await handle  # raises ChildWorkflowError when the child was cancelled
        raise
    return await handle


def _raise_if_cancel_requested() -> None:
    """Raise CancelledError if this workflow was asked to cancel while it
    waited for an activity or child that still completed.

    With a cancellation type that waits, the awaited call can complete
    normally after the request, and the request would then be lost.
    """
    task = asyncio.current_task()
    if (
        task is not None
        and task.cancelling()
        and workflow.patched(_PHASE_CLEANUP_PATCH)
    ):
        raise asyncio.CancelledError()


@workflow.defn
class LoadOperationWorkflow:
    """One unit of scalability load: a workflow whose activity writes a row and
    reads it back."""

    @workflow.run
    async def run(self, request: LoadOperationInput) -> int:
        return await workflow.execute_activity(
            "load_operation",
            request,
            task_queue=STREAMING,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_FEW,
            result_type=int,
        )


async def _record_phase(record: PhaseRecord) -> None:
    """Write a phase's row and its operations to the benchmark tables."""
    await workflow.execute_activity(
        "record_benchmark_phase",
        record,
        task_queue=ORCHESTRATION,
        start_to_close_timeout=timedelta(seconds=60),
        retry_policy=_FEW,
    )


@workflow.defn
class BenchmarkPhaseWorkflow:
    """One phase of one cycle; a failure is returned as a result, not raised."""

    @workflow.run
    async def run(self, request: PhaseInput) -> PhaseResult:
        started = workflow.now()
        if request.phase in request.config.inject_workflow_failure:
            raise ApplicationError(
                "fault injected in the phase workflow", non_retryable=True
            )
        # A cancelled phase waits until its activity has deleted what it
        # created (a sandbox session would otherwise run on to its timeout).
        cancellation = (
            ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
            if workflow.patched(_PHASE_CLEANUP_PATCH)
            else ActivityCancellationType.TRY_CANCEL
        )
        try:
            record = await workflow.execute_activity(
                "run_benchmark_phase",
                request,
                task_queue=ORCHESTRATION,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=60),
                # A phase is not idempotent (it creates sandboxes, clusters,
                # definitions), so a lost attempt is a failed phase, not a retry.
                retry_policy=_ONCE,
                result_type=PhaseRecord,
                cancellation_type=cancellation,
            )
            _raise_if_cancel_requested()
        except ActivityError as error:
            if is_cancelled_exception(error) and workflow.patched(CANCELLED_RUN_PATCH):
                raise
            task = asyncio.current_task()
            if (
                task is not None
                and task.cancelling()
                and workflow.patched(_FAILED_AFTER_CANCEL_PATCH)
            ):
                # Asked to cancel while the activity failed on its own (its
                # worker died, so its heartbeat timed out): the phase ends
                # Canceled, as one that completed after the request does.
                raise asyncio.CancelledError() from error
            record = PhaseRecord(
                run_id=request.run_id,
                result=PhaseResult(
                    phase=request.phase,
                    cycle=request.cycle,
                    ok=False,
                    error=f"the phase activity failed: {error.cause or error}",
                    started_at=started,
                    ended_at=workflow.now(),
                ),
            )
            if workflow.patched(_FAILED_PHASE_OPERATION_PATCH):
                record = record.with_failure_counted()
        await _record_phase(record)
        return record.result


# A worker keeps a cached run's command state until the run ends, and the
# sampler runs on the orchestration worker that it measures. Continuing as
# new every 60 samples (5 minutes at 5 s) keeps that state small, where it
# would otherwise grow until the server suggests continuing as new.
SAMPLES_PER_SAMPLER_RUN = 60


@workflow.defn
class MetricsSamplerWorkflow:
    """Every few seconds, ask one worker on each queue for its memory and
    record the answers; stops on the `stop` signal."""

    def __init__(self) -> None:
        self.stopping = False

    @workflow.signal
    def stop(self) -> None:
        self.stopping = True

    @workflow.run
    async def run(self, request: SamplerInput) -> int:
        taken = request.samples_taken
        while True:
            await self._sample(request)
            taken += 1
            if self.stopping:
                return taken
            # A timeout means the interval passed without a stop request.
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self.stopping,
                    timeout=timedelta(seconds=request.interval_seconds),
                )
            if (
                workflow.info().is_continue_as_new_suggested()
                or taken % SAMPLES_PER_SAMPLER_RUN == 0
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    request.model_copy(update={"samples_taken": taken})
                )

    async def _sample(self, request: SamplerInput) -> None:
        answers = await asyncio.gather(
            *(
                workflow.execute_activity(
                    "probe_worker",
                    task_queue=queue,
                    schedule_to_close_timeout=timedelta(seconds=10),
                    retry_policy=_ONCE,
                    result_type=WorkerProbe,
                )
                for queue in request.queues
            ),
            return_exceptions=True,
        )
        samples: list[WorkerSample] = []
        missing: list[str] = []
        for queue, answer in zip(request.queues, answers, strict=True):
            if isinstance(answer, WorkerProbe):
                samples.append(
                    WorkerSample(
                        task_queue=answer.task_queue,
                        pid=answer.pid,
                        identity=answer.identity,
                        rss=answer.rss,
                        heap_used=answer.heap_used,
                        python_heap_used=answer.python_heap_used,
                        python_arenas=answer.python_arenas,
                    )
                )
            elif isinstance(answer, ActivityError):
                missing.append(queue)
            elif isinstance(answer, BaseException):
                raise answer
        await workflow.execute_activity(
            "record_worker_samples",
            SampleBatch(
                run_id=request.run_id,
                taken_at=workflow.now(),
                samples=samples,
                missing=missing,
            ),
            task_queue=ORCHESTRATION,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_FEW,
        )


@workflow.defn
class ExtendedDurationBenchmarkWorkflow:
    """Run cycles of the six phases until the duration has passed, continuing
    as new between cycles with the aggregates, then write the report."""

    # The attributes below only feed the `progress` query. Setting them issues
    # no command, so they need no patch.
    def __init__(self) -> None:
        self.state: BenchmarkState | None = None
        self.phase: str | None = None
        self.phase_started_at: datetime | None = None
        self.cycle: int | None = None
        self.completed: dict[str, bool] = {}
        self.phase_times: dict[str, PhaseTimes] = {}
        self.finished = False

    @workflow.query
    def progress(self) -> BenchmarkProgress:
        state = self.state
        if state is None or state.started_at is None:
            return BenchmarkProgress(
                run_id="", cycle=0, phase=None, elapsed_seconds=0, duration_seconds=0
            )
        return BenchmarkProgress(
            run_id=state.run_id,
            # state.cycle moves to the next cycle as soon as this one ends.
            cycle=state.cycle if self.cycle is None else self.cycle,
            phase=self.phase,
            completed=dict(self.completed),
            elapsed_seconds=(workflow.now() - state.started_at).total_seconds(),
            duration_seconds=state.config.duration_seconds,
            finished=self.finished,
            phase_started_at=self.phase_started_at,
            phase_times=dict(self.phase_times),
            failed_cycles=self._failed_cycles(state),
        )

    def _failed_cycles(self, state: BenchmarkState) -> dict[str, int]:
        """Count, per phase, the failed cycles before this run's cycle (from
        the carried aggregates) and this cycle's failure."""
        failed: dict[str, int] = {}
        earlier = [
            a for a in state.cycles if self.cycle is None or a.cycle < self.cycle
        ]
        outcomes = [a.phases for a in earlier] + [self.completed]
        for phases in outcomes:
            for name, ok in phases.items():
                failed[name] = failed.get(name, 0) + (not ok)
        return failed

    @workflow.run
    async def run(self, state: BenchmarkState) -> BenchmarkResult:
        if not state.run_id:
            # Schedules start runs with ids of their own; the id is the run id.
            state = state.model_copy(update={"run_id": workflow.info().workflow_id})
        self.state = state
        workflow.upsert_search_attributes(
            [
                EXECUTION_KIND.value_set("benchmark"),
                BENCHMARK_RUN_ID.value_set(state.run_id),
            ]
        )
        try:
            await self._run_cycle(state)
            await self._stop_sampler(state.run_id)
        except (asyncio.CancelledError, ActivityError, ChildWorkflowError) as error:
            if not (
                is_cancelled_exception(error) and workflow.patched(CANCELLED_RUN_PATCH)
            ):
                raise
            await self._record_cancellation(state)
            raise
        report_activity = workflow.start_activity(
            "finish_benchmark_run",
            ReportRequest(run_id=state.run_id, ended_at=workflow.now()),
            task_queue=ORCHESTRATION,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=_FEW,
            result_type=ReportResult,
        )
        try:
            report = await asyncio.shield(report_activity)
        except asyncio.CancelledError:
            # Every cycle has ended, so a cancellation that arrives while the
            # report is written lets the report finish and the run complete.
            report = await report_activity
        self.finished = True
        return BenchmarkResult(run_id=state.run_id, cycles=state.cycle, report=report)

    async def _run_cycle(self, state: BenchmarkState) -> None:
        """Run one cycle, then continue as new unless it was the last one."""
        config = state.config
        if state.started_at is None:
            state.started_at = workflow.now()
            await workflow.execute_activity(
                "start_benchmark_run",
                StartRunRequest(run_id=state.run_id, config=config),
                task_queue=ORCHESTRATION,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_FEW,
            )
            await workflow.start_child_workflow(
                MetricsSamplerWorkflow.run,
                SamplerInput(
                    run_id=state.run_id,
                    queues=list(ALL_QUEUES),
                    interval_seconds=config.sample_interval_seconds,
                ),
                id=f"{state.run_id}-sampler",
                # The sampler outlives each continue-as-new of this workflow.
                parent_close_policy=ParentClosePolicy.ABANDON,
            )

        workflow.logger.info("benchmark %s cycle %d starts", state.run_id, state.cycle)
        self.cycle = state.cycle
        results: dict[str, bool] = {}
        for phase in config.phases:
            self.phase = phase
            self.phase_started_at = workflow.now()
            result = await self._run_phase(state, phase)
            results[phase] = result.ok
            self.completed[phase] = result.ok
            self.phase_times[phase] = PhaseTimes(
                started_at=result.started_at, ended_at=result.ended_at
            )
            state.carry.update(result.carry)
            state.operations += result.operations
            state.succeeded += result.succeeded
        self.phase = None
        self.phase_started_at = None
        state.cycles.append(
            CycleAggregate(cycle=state.cycle, ok=all(results.values()), phases=results)
        )
        state.cycle += 1

        duration = timedelta(seconds=config.duration_seconds)
        elapsed = workflow.now() - state.started_at
        cycles_left = config.max_cycles is None or state.cycle < config.max_cycles
        if cycles_left and elapsed < duration:
            if config.cycle_interval_seconds:
                interval = timedelta(seconds=config.cycle_interval_seconds)
                if workflow.patched(_INTERVAL_ENDS_AT_DURATION_PATCH):
                    # No cycle starts after the duration, so the sleep ends
                    # with the duration when that comes first, and the run
                    # then ends with its report.
                    await workflow.sleep(min(interval, duration - elapsed))
                    if workflow.now() - state.started_at >= duration:
                        return
                else:
                    await workflow.sleep(interval)
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(state)

    async def _stop_sampler(self, run_id: str) -> None:
        sampler = workflow.get_external_workflow_handle(f"{run_id}-sampler")
        try:
            await sampler.signal(MetricsSamplerWorkflow.stop)
        except ApplicationError as error:
            workflow.logger.warning("could not stop the sampler: %s", error)

    async def _record_cancellation(self, state: BenchmarkState) -> None:
        """Stop the sampler and record the run as cancelled. A cancelled run
        gets no report, since its last cycle did not finish."""
        self.phase = None
        self.phase_started_at = None
        await self._stop_sampler(state.run_id)
        await workflow.execute_activity(
            "cancel_benchmark_run",
            CancelRunRequest(
                run_id=state.run_id, config=state.config, ended_at=workflow.now()
            ),
            task_queue=ORCHESTRATION,
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=_FEW,
        )
        workflow.logger.info("benchmark %s cancelled", state.run_id)

    async def _run_phase(self, state: BenchmarkState, phase: PhaseName) -> PhaseResult:
        request = PhaseInput(
            run_id=state.run_id,
            phase=phase,
            cycle=state.cycle,
            config=state.config,
            carry=state.carry,
        )
        started = workflow.now()
        child_id = f"{state.run_id}-c{state.cycle}-{phase}"
        try:
            if workflow.patched(_PHASE_START_SHIELDED_PATCH):
                result = await _run_phase_child(request, child_id)
            else:
                result = await workflow.execute_child_workflow(
                    BenchmarkPhaseWorkflow.run,
                    request,
                    id=child_id,
                    task_queue=ORCHESTRATION,
                )
            _raise_if_cancel_requested()
            return result
        except ChildWorkflowError as error:
            if is_cancelled_exception(error) and workflow.patched(CANCELLED_RUN_PATCH):
                raise
            failed = PhaseResult(
                phase=request.phase,
                cycle=state.cycle,
                ok=False,
                error=f"the phase workflow failed: {error.cause or error}",
                started_at=started,
                ended_at=workflow.now(),
            )
            if not workflow.patched(_FAILED_PHASE_WORKFLOW_RECORDED_PATCH):
                return failed
            record = PhaseRecord(run_id=state.run_id, result=failed)
            record = record.with_failure_counted()
            try:
                await _record_phase(record)
            except ActivityError as recording:
                # The run goes on; its report then lacks this phase's row.
                workflow.logger.warning(
                    "could not record failed phase %s of %s: %s",
                    request.phase,
                    state.run_id,
                    recording.cause or recording,
                )
            return record.result
