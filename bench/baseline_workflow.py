"""The hand-written baseline of bench/orchestration.py: four sequential
activities in one workflow, the way a Temporal user writes it directly."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="baseline_noop")
async def baseline_noop(value: dict) -> dict:
    return value


@workflow.defn
class BaselineFourStepWorkflow:
    @workflow.run
    async def run(self, value: dict) -> dict:
        for step in range(4):
            value = await workflow.execute_activity(
                baseline_noop,
                {**value, "step": step},
                start_to_close_timeout=timedelta(seconds=30),
            )
        return value
