"""Swarm activities: agent steps (sandbox queue), the database mirror and
sandbox stops."""

from __future__ import annotations

import asyncio
import contextlib

from temporalio import activity
from temporalio.exceptions import ApplicationError

from app.contracts.swarm import (
    AgentStepRequest,
    StepResult,
    StopSandboxesRequest,
    StopSandboxesResult,
    SwarmMirror,
)
from app.settings import Settings
from app.swarm.executor import AgentExecutor, build_executor
from app.swarm.service import StepFailedError, run_step, write_mirror

HEARTBEAT_SECONDS = 2.0


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
        heartbeat = asyncio.create_task(_heartbeat_until_done(request.step))
        try:
            return await run_step(
                self.settings,
                self._executor(),
                activity.client(),
                request,
                attempt=info.attempt,
            )
        except StepFailedError as error:
            raise ApplicationError(
                f"agent {request.agent.agent_id} could not run step "
                f"{request.step} of task {request.task_id}: {error}",
                type="StepFailed",
                non_retryable=not error.retryable,
            ) from error
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    @activity.defn(name="stop_agent_sandboxes")
    async def stop_agent_sandboxes(
        self, request: StopSandboxesRequest
    ) -> StopSandboxesResult:
        stopped: list[str] = []
        already: list[str] = []
        executor = self._executor()
        for sandbox_id in request.sandbox_ids:
            if await executor.stop(sandbox_id):
                stopped.append(sandbox_id)
            else:
                already.append(sandbox_id)
        return StopSandboxesResult(stopped=stopped, already_stopped=already)


class SwarmMirrorActivities:
    """The database mirror, on the orchestration queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="mirror_swarm")
    async def mirror_swarm(self, mirror: SwarmMirror) -> int:
        return await asyncio.to_thread(
            write_mirror, self.settings.effective_database_url, mirror
        )


async def _heartbeat_until_done(step: int) -> None:
    # The first heartbeat waits too: most steps end within HEARTBEAT_SECONDS,
    # and each heartbeat is a call to the server.
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        activity.heartbeat({"step": step})
