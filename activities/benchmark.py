"""Activities of the extended-duration benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

from sqlmodel import select
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.heartbeat import heartbeat_every
from app.benchmark import recording
from app.benchmark.leftovers import end_phase_leftovers
from app.benchmark.models import ExtendedDurationTestEvent
from app.benchmark.phases import run_phase
from app.benchmark.report import (
    ReportsFolderError,
    build_metrics,
    check_reports_writable,
    run_summary,
    save_report,
)
from app.benchmark.runs import runs_in_the_way
from app.contracts.benchmark import (
    REPORTS_FOLDER_ERROR,
    RUN_OPEN_ERROR,
    CancelRunRequest,
    LoadOperationInput,
    PhaseInput,
    PhaseRecord,
    ReportRequest,
    ReportResult,
    SampleBatch,
    StartRunRequest,
)
from app.db import session_scope
from app.services.health import system_health
from app.settings import Settings

# The sampler takes one last sample after its stop signal. A probe may
# wait up to 10 s for a worker, and the record activity up to 30 s.
SAMPLER_STOP_SECONDS = 60.0
# The cancel activity's time for the second pass over what the orchestration
# phase left open; its own timeout is 2 minutes.
LEFTOVERS_SECONDS = 45.0
# The same pass after a failed orchestration phase, within the 60 s of the
# activity that records the phase.
FAILED_PHASE_LEFTOVERS_SECONDS = 20.0
# Ways a run's workflow can close without stopping its sampler.
_RUN_CLOSED_WITHOUT_SAMPLER_STOP = (
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TIMED_OUT,
)
# Claims of the benchmark slot that one start makes before it gives up. A try
# fails only when another run took over the same stale claim first, and the
# loop in `_claim_slot` stops after this many.
CLAIM_TRIES = 3


async def _workflow_status(run_id: str) -> WorkflowExecutionStatus | None:
    """Return the status of run `run_id`'s workflow, None when not found."""
    try:
        described = await activity.client().get_workflow_handle(run_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return described.status


def _is_last_attempt(error: Exception) -> bool:
    """Return whether Temporal does not retry this activity after `error`."""
    if isinstance(error, ApplicationError) and error.non_retryable:
        return True
    info = activity.info()
    policy = info.retry_policy
    if policy is None:
        return False
    # Temporal names an ApplicationError by its type, other errors by class.
    error_type = (
        error.type
        if isinstance(error, ApplicationError) and error.type
        else type(error).__name__
    )
    if error_type in (policy.non_retryable_error_types or ()):
        return True
    return bool(policy.maximum_attempts) and info.attempt >= policy.maximum_attempts


def _run_open_error(run_id: str, others: list[str]) -> ApplicationError:
    activity.logger.warning(
        "benchmark %s rejected at its start: benchmark %s is running",
        run_id,
        ", ".join(others),
    )
    return ApplicationError(
        f"benchmark run {', '.join(others)} is running on this Temporal server, "
        "and two runs at once would each measure the other's load. Wait for it "
        f"to end, or cancel it with `nexus benchmark cancel {others[0]}`",
        type=RUN_OPEN_ERROR,
        non_retryable=True,
    )


class BenchmarkActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    @activity.defn(name="start_benchmark_run")
    async def start_run(self, request: StartRunRequest) -> None:
        # This worker writes the report after the last cycle, so its own
        # reports folder is checked now, before the run is recorded.
        try:
            await asyncio.to_thread(check_reports_writable, self.settings, workers=True)
        except ReportsFolderError as error:
            raise ApplicationError(
                str(error), type=REPORTS_FOLDER_ERROR, non_retryable=True
            ) from None
        run_id = request.run_id
        holder = await asyncio.to_thread(recording.slot_holder, self.url)
        if request.config.schedule_id is not None and holder != run_id:
            # `nexus benchmark run` checks the server before it starts a run,
            # but a schedule starts its runs with no command in front. This
            # check also covers runs that record to another database. It runs
            # before the claim and is skipped by a run that has the claim
            # already. So a run that it rejects has no claim that could
            # reject another run in turn.
            others = await runs_in_the_way(activity.client(), self.url, run_id)
            if others:
                raise _run_open_error(run_id, others)
        await self._claim_slot(run_id)
        await asyncio.to_thread(recording.start_run, self.url, run_id, request.config)

    async def _claim_slot(self, run_id: str) -> None:
        """Claim the database's benchmark slot for run `run_id`.

        A holder whose workflow is still running keeps the slot, and this run
        fails with RUN_OPEN_ERROR. A holder whose workflow has closed or is
        unknown to this server left a stale claim: it was terminated, or it
        ran on another server that records to the same database. This run
        takes such a claim over.
        """
        for _ in range(CLAIM_TRIES):
            holder = await asyncio.to_thread(recording.claim_slot, self.url, run_id)
            if holder == run_id:
                return
            status = await _workflow_status(holder)
            if status == WorkflowExecutionStatus.RUNNING:
                raise _run_open_error(run_id, [holder])
            activity.logger.warning(
                "benchmark %s takes over the claim of benchmark %s, whose "
                "workflow is %s on this server",
                run_id,
                holder,
                "not found" if status is None else status.name.lower(),
            )
            if await asyncio.to_thread(
                recording.take_over_slot, self.url, run_id, holder
            ):
                return
        # Each try found a stale claim that another run took over first.
        raise ApplicationError(
            f"benchmark run {run_id} could not claim the benchmark slot in "
            f"{CLAIM_TRIES} tries, because other runs claimed it at the same time"
        )

    @activity.defn(name="run_benchmark_phase")
    async def run_phase(self, request: PhaseInput) -> PhaseRecord:
        activity.logger.info(
            "benchmark %s cycle %d: phase %s starts",
            request.run_id,
            request.cycle,
            request.phase,
        )
        # NOTE: a cancellation reaches this activity with its next heartbeat,
        # but tool calls that catch it as an error can keep the phase going
        # until it ends or its worker stops.
        heartbeat = asyncio.create_task(heartbeat_every(10.0))
        try:
            record = await run_phase(self.settings, activity.client(), request)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if activity.is_cancelled():
            # The phase records a cancellation that reached a tool call as a
            # failed operation and returns. Completing with that record would
            # end the phase normally, and the run would not see that it was
            # cancelled.
            raise asyncio.CancelledError()
        return record

    @activity.defn(name="cancel_benchmark_run")
    async def cancel_run(self, request: CancelRunRequest) -> None:
        """Record the run as cancelled once its stopped sampler has ended, so
        that nothing of the run is left running when the workflow ends. The
        record releases the run's claim.

        NOTE: the workflow does not wait for a cancelled `start_benchmark_run`
        attempt, which can claim the slot after this release. That claim is
        stale once the run has closed, and the next run takes it over.
        """
        await self._wait_for_sampler(request.run_id)
        await asyncio.to_thread(
            recording.cancel_run,
            self.url,
            request.run_id,
            request.config,
            request.ended_at,
        )
        activity.logger.info("benchmark %s recorded as cancelled", request.run_id)
        await self._end_leftovers(request.run_id)

    async def _end_leftovers(
        self, run_id: str, seconds: float = LEFTOVERS_SECONDS
    ) -> None:
        """Cancel the orchestration executions that the cancelled or failed
        phase left open and destroy their swarms.

        The phase cancels its executions as it is cancelled, from the
        server's list of workflows, which lags behind their starts. By now
        the phase has ended, so an execution started just before its
        cancellation is listed. This is a second pass, so its failure is
        logged and the cancellation stays recorded."""
        try:
            executions, swarms = await asyncio.wait_for(
                end_phase_leftovers(activity.client(), self.settings, run_id),
                seconds,
            )
        except Exception as error:  # a second pass; see the docstring
            activity.logger.warning(
                "benchmark %s: ending what its orchestration phase left open "
                "failed: %s",
                run_id,
                str(error) or type(error).__name__,
            )
            return
        if executions or swarms:
            activity.logger.warning(
                "benchmark %s: cancelled %d orchestration execution(s) and "
                "destroyed %d swarm(s) that its orchestration phase left open",
                run_id,
                len(executions),
                len(swarms),
            )

    @activity.defn(name="record_benchmark_phase")
    async def record_phase(self, record: PhaseRecord) -> None:
        await asyncio.to_thread(recording.record_phase, self.url, record)
        if record.result.phase == "multi_workflow_orchestration" and not (
            record.result.ok
        ):
            # A phase whose activity died with its worker left its executions
            # running, waiting on steps of the dead worker. They would load
            # the phases and runs after it.
            await self._end_leftovers(record.run_id, FAILED_PHASE_LEFTOVERS_SECONDS)

    @activity.defn(name="record_worker_samples")
    async def record_samples(self, batch: SampleBatch) -> int:
        written = await asyncio.to_thread(recording.record_samples, self.url, batch)
        await self._stop_orphaned_sampler(batch.run_id)
        return written

    async def _stop_orphaned_sampler(self, run_id: str) -> None:
        """Stop the sampler of a run whose workflow closed without stopping it.

        A run stops its sampler as it completes or is cancelled. A run that
        was terminated, failed or timed out cannot, and its sampler would
        sample for good, loading every later run. Such a run is recorded as
        `ended`, so that `nexus benchmark report` can write its report from
        the cycles it recorded."""
        try:
            described = await activity.client().get_workflow_handle(run_id).describe()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                activity.logger.warning(
                    "could not read benchmark run %s for its sampler: %s",
                    run_id,
                    error,
                )
            return
        if described.status not in _RUN_CLOSED_WITHOUT_SAMPLER_STOP:
            return
        assert described.status is not None
        how = described.status.name.lower().replace("_", " ")
        ended_at = described.close_time or datetime.now(UTC)
        await asyncio.to_thread(
            recording.end_orphaned_run, self.url, run_id, ended_at, how
        )
        activity.logger.warning(
            "benchmark %s is %s, so its sampler stops; write its report with "
            "`nexus benchmark report %s`",
            run_id,
            how,
            run_id,
        )
        await activity.client().get_workflow_handle(f"{run_id}-sampler").signal("stop")

    @activity.defn(name="finish_benchmark_run")
    async def finish_run(self, request: ReportRequest) -> ReportResult:
        """Write the run's report. The run's claim is released once the run
        is completed, or when this activity fails on its last attempt, since
        the run then ends with no report."""
        try:
            return await self._finish_run(request)
        except Exception as error:
            if _is_last_attempt(error):
                await asyncio.to_thread(
                    recording.release_slot, self.url, request.run_id
                )
            raise

    async def _finish_run(self, request: ReportRequest) -> ReportResult:
        ended = request.ended_at or datetime.now(UTC)
        await asyncio.to_thread(recording.end_run, self.url, request.run_id, ended)
        await self._wait_for_sampler(request.run_id)
        health = await system_health(self.settings, activity.client())
        health_json = health.model_dump(mode="json", by_alias=True)
        # One set of metrics feeds both the report and the summary that the
        # next run compares with, so the two show the same figures.
        metrics = await asyncio.to_thread(
            build_metrics, self.settings, request.run_id, health_json
        )
        report = await asyncio.to_thread(save_report, self.settings, metrics)
        await asyncio.to_thread(
            recording.complete_run, self.url, request.run_id, run_summary(metrics)
        )
        activity.logger.info(
            "benchmark %s report at %s", request.run_id, report.report_dir
        )
        return report

    async def _wait_for_sampler(self, run_id: str) -> None:
        """Wait for the stopped sampler to record its last sample, so that a
        report written later from the same rows shows the same figures."""
        handle = activity.client().get_workflow_handle(f"{run_id}-sampler")
        try:
            await asyncio.wait_for(handle.result(), SAMPLER_STOP_SECONDS)
        except (TimeoutError, WorkflowFailureError, RPCError) as error:
            activity.logger.warning(
                "benchmark %s: sampler %s did not finish, so the report may "
                "miss its last samples: %s",
                run_id,
                handle.id,
                str(error) or type(error).__name__,
            )

    @activity.defn(name="load_operation")
    async def load_operation(self, request: LoadOperationInput) -> int:
        """Write one row and read it back: the unit of the scalability load."""
        return await asyncio.to_thread(self._write_and_read, request)

    def _write_and_read(self, request: LoadOperationInput) -> int:
        with session_scope(self.url) as session:
            row = ExtendedDurationTestEvent(
                run_id=request.run_id,
                cycle=request.cycle,
                test_phase="load",
                sequence=request.index,
                sent_at=time.time(),
            )
            session.add(row)
            session.flush()
            row_id = row.id
        with session_scope(self.url) as session:
            found = session.exec(
                select(ExtendedDurationTestEvent).where(
                    ExtendedDurationTestEvent.id == row_id
                )
            ).one()
            assert found.id is not None
            return found.id
