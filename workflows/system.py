"""`SystemCheckWorkflow`: health of the platform as seen from inside Temporal."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from app.contracts.queues import ORCHESTRATION
    from app.contracts.system import (
        HealthReport,
        ProbeReport,
        ProbeRequest,
        WorkerProbe,
    )


class SystemCheckResult(BaseModel):
    health: HealthReport
    probes: ProbeReport = Field(description="One answer per queue that was probed.")


@workflow.defn
class SystemCheckWorkflow:
    """Read health, then ask one worker on each queue to answer a probe.

    A queue whose probe is not picked up within the timeout is reported as
    missing, which proves a worker really runs there rather than that it once
    polled.
    """

    @workflow.run
    async def run(self, request: ProbeRequest) -> SystemCheckResult:
        health = await workflow.execute_activity(
            "check_health",
            task_queue=ORCHESTRATION,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=HealthReport,
        )
        answers = await asyncio.gather(
            *(self._probe(queue, request.timeout_seconds) for queue in request.queues),
            return_exceptions=True,
        )
        probes: list[WorkerProbe] = []
        missing: dict[str, str] = {}
        for queue, answer in zip(request.queues, answers, strict=True):
            if isinstance(answer, WorkerProbe):
                probes.append(answer)
            elif isinstance(answer, ActivityError):
                if isinstance(answer.cause, TimeoutError):
                    missing[queue] = (
                        f"no worker answered on {queue} within "
                        f"{request.timeout_seconds:g} s (probe timed out)"
                    )
                else:
                    missing[queue] = str(answer.cause or answer)
            elif isinstance(answer, BaseException):
                raise answer
        return SystemCheckResult(
            health=health, probes=ProbeReport(probes=probes, missing=missing)
        )

    async def _probe(self, queue: str, timeout: float) -> WorkerProbe:
        return await workflow.execute_activity(
            "probe_worker",
            task_queue=queue,
            schedule_to_close_timeout=timedelta(seconds=timeout),
            retry_policy=RetryPolicy(maximum_attempts=1),
            result_type=WorkerProbe,
        )
