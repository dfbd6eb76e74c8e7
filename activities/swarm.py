"""Swarm activities: agent steps and sandbox stops (sandbox queue), the
database mirror and the wait on a task workflow's close (orchestration
queue)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.heartbeat import heartbeat_every
from app.contracts.swarm import (
    AgentStepRequest,
    LastStepResult,
    StepResult,
    StopSandboxesRequest,
    StopSandboxesResult,
    SwarmMirror,
    TaskFinished,
    TaskWatchRequest,
    TaskWatchResult,
)
from app.settings import Settings
from app.swarm import planning
from app.swarm.executor import AgentExecutor, build_executor
from app.swarm.service import StepFailedError, run_step, write_mirror
from app.temporal.endings import workflow_ending

HEARTBEAT_SECONDS = 2.0

# Heartbeat interval of `watch_task_close`, a third of the heartbeat timeout
# that `SwarmWorkflow` gives it.
WATCH_HEARTBEAT_SECONDS = 10.0

# Error type of a step failure that a later attempt may not meet, such as a
# rate limit, a server error or a lost connection. STEP_RETRY retries it.
RETRYABLE_STEP_ERROR = "StepFailedRetryable"


class SwarmActivities:
    """Activities of swarms, built from the worker's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor: AgentExecutor | None = None

    def _executor(self) -> AgentExecutor:
        # One executor per worker, built on the worker's own client, so steps
        # of one agent that run at once share its sandbox creation lock.
        if self.executor is None:
            self.executor = build_executor(activity.client(), self.settings)
        return self.executor

    @activity.defn(name="run_agent_step")
    async def run_agent_step(self, request: AgentStepRequest) -> StepResult:
        info = activity.info()
        activity.logger.info(
            "agent %s runs step %d of task %s (attempt %d)",
            request.agent.agent_id,
            request.step,
            request.task_id,
            info.attempt,
        )
        started = first_start(info)
        heartbeat = asyncio.create_task(_heartbeat_until_done(request.step, started))
        try:
            return await run_step(
                self.settings,
                self._executor(),
                activity.client(),
                request,
                attempt=info.attempt,
                started_at=started,
            )
        except StepFailedError as error:
            message = (
                f"agent {request.agent.agent_id} could not run step "
                f"{request.step} of task {request.task_id} "
                f"(attempt {info.attempt}): {error}"
            )
            if error.retryable:
                # STEP_RETRY lists "StepFailed" as non-retryable, so a
                # retryable failure needs a type of its own to be retried.
                activity.logger.warning("retryable step failure: %s", message)
                raise ApplicationError(
                    message, {"attempt": info.attempt}, type=RETRYABLE_STEP_ERROR
                ) from error
            raise ApplicationError(
                message,
                {"attempt": info.attempt},
                type="StepFailed",
                non_retryable=True,
            ) from error
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    @activity.defn(name="run_last_agent_step")
    async def run_last_agent_step(self, request: AgentStepRequest) -> LastStepResult:
        """Run the only step of a task, then send the swarm `task_finished`.

        The task workflow then completes without its own signal: one workflow
        task and one signal less per task. The signal reaches the swarm
        before the task workflow completes, as the workflow's would.

        When the worker dies after the signal and before the activity
        completes, the retry sends the program's sandbox call with the same
        id, so it gets the first attempt's output and status back instead of
        running the program again (see `run_step`).
        NOTE: the id only deduplicates within one run of the sandbox session;
        had the session continued as new in between, the program runs again.
        """
        result = await self.run_agent_step(request)
        status, error = planning.task_outcome([result])
        finished = TaskFinished(
            task_id=request.task_id,
            status=status,
            error=error,
            sandboxes={result.agent_id: result.sandbox_id} if result.sandbox_id else {},
        )
        handle = activity.client().get_workflow_handle(f"swarm-{request.swarm_id}")
        try:
            await handle.signal("task_finished", finished)
        except RPCError as error:
            # The task workflow signals instead, and logs if that fails too.
            activity.logger.warning(
                "step of task %s could not report to swarm %s: %s",
                request.task_id,
                request.swarm_id,
                error,
            )
            return LastStepResult(result=result)
        return LastStepResult(result=result, reported=True)

    @activity.defn(name="stop_agent_sandboxes")
    async def stop_agent_sandboxes(
        self, request: StopSandboxesRequest
    ) -> StopSandboxesResult:
        executor = self._executor()
        # At once: the stop of a sandbox that runs a program completes only
        # after its session's workflow task ends, which takes seconds each.
        results = await asyncio.gather(
            *(executor.stop(sandbox_id) for sandbox_id in request.sandbox_ids)
        )
        stopped = [
            s for s, done in zip(request.sandbox_ids, results, strict=True) if done
        ]
        not_stopped = [
            s for s, done in zip(request.sandbox_ids, results, strict=True) if not done
        ]
        states = await asyncio.gather(*(executor.state(s) for s in not_stopped))
        absent = [
            s
            for s, state in zip(not_stopped, states, strict=True)
            if state == "not_created"
        ]
        already = [s for s in not_stopped if s not in absent]
        activity.logger.info(
            "stopped sandboxes %s (already stopped: %s, never created: %s)",
            stopped,
            already,
            absent,
        )
        return StopSandboxesResult(
            stopped=stopped, already_stopped=already, absent=absent
        )


class SwarmMirrorActivities:
    """The database mirror, on the orchestration queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="mirror_swarm")
    async def mirror_swarm(self, mirror: SwarmMirror) -> int:
        return await asyncio.to_thread(
            write_mirror, self.settings.effective_database_url, mirror
        )


@activity.defn(name="watch_task_close")
async def watch_task_close(request: TaskWatchRequest) -> TaskWatchResult:
    """Wait until a task workflow closes, and return how, for a swarm run
    that did not start it and so has no child handle to it.

    The wait is the client's long poll of the workflow's history for its
    close event: each call waits on the server until that event or the
    poll's timeout. The heartbeats let the server see a dead worker, and let
    the worker see that the swarm run that scheduled this activity has
    closed, which cancels it."""
    handle = activity.client().get_workflow_handle(request.workflow_id)
    heartbeat = asyncio.create_task(heartbeat_every(WATCH_HEARTBEAT_SECONDS))
    try:
        await handle.result(follow_runs=False)
    except WorkflowFailureError as failure:
        ending = workflow_ending(failure.cause)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        # Gone past its namespace's retention: it can report nothing more.
        ending = "not found"
    else:
        return TaskWatchResult()
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    activity.logger.info(
        "task workflow %s of task %s closed without a result: %s",
        request.workflow_id,
        request.task_id,
        ending,
    )
    return TaskWatchResult(ending=ending)


def first_start(info: activity.Info) -> datetime:
    """Return when the step's first attempt started.

    Each attempt's heartbeats carry that time, and the server hands the last
    ones to the next attempt. A first attempt that died before its first
    heartbeat left none. The time the step was first scheduled is then the
    closest known, at most a queue wait earlier.
    """
    if info.attempt == 1:
        return datetime.now(UTC)
    for details in info.heartbeat_details[-1:]:
        if isinstance(details, dict) and isinstance(details.get("started_at"), str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(details["started_at"])
    return info.scheduled_time


async def _heartbeat_until_done(step: int, started: datetime) -> None:
    # The first heartbeat waits too: most steps end within HEARTBEAT_SECONDS,
    # and each heartbeat is a call to the server.
    details = {"step": step, "started_at": started.isoformat()}
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        activity.heartbeat(details)
