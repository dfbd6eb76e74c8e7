"""Workers for workflow tests, plus test-only step types that force faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from app.contracts.queues import ALL_QUEUES
from app.contracts.workflows import StepOutcome, StepRequest
from app.settings import Settings
from app.tools import ToolContext, invoke_tool, load_tools
from app.workflows.steps import (
    UNAVAILABLE_ACTIVITY,
    StepType,
    get_step_type,
    register_step_type,
)
from tests.conftest import running_workers, wait_for_pollers

TEST_QUEUE = "nexus-test-steps"

load_tools()


@activity.defn(name="test_flaky")
async def flaky(request: StepRequest) -> StepOutcome:
    """Fail until attempt `params.succeed_on`, then return the attempt."""
    attempt = activity.info().attempt
    if attempt < int(request.params.get("succeed_on", 3)):
        raise ApplicationError(
            f"flaky failure on attempt {attempt}", {"attempt": attempt}
        )
    return StepOutcome(output={"succeeded_on": attempt}, attempt=attempt)


@activity.defn(name="test_broken")
async def broken(request: StepRequest) -> StepOutcome:
    attempt = activity.info().attempt
    raise ApplicationError(
        f"broken on purpose (attempt {attempt})", {"attempt": attempt}, type="Broken"
    )


CANCELLED: list[str] = []


@activity.defn(name="test_sleep")
async def sleep(request: StepRequest) -> StepOutcome:
    """Sleep `params.seconds` while heartbeating, so a cancel reaches it."""
    seconds = float(request.params.get("seconds", 1.0))
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        while asyncio.get_running_loop().time() < deadline:
            activity.heartbeat()
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        CANCELLED.append(f"{request.execution_id}/{request.step}")
        raise
    return StepOutcome(output={"slept": seconds}, attempt=activity.info().attempt)


for _name in ("test_flaky", "test_broken", "test_sleep"):
    if get_step_type(_name) is None:
        register_step_type(StepType(_name, _name, TEST_QUEUE, heartbeat_timeout=2))

# Every capability of this build is installed, so the test declares a type
# whose capability is missing, the way a build without one declares its types.
if get_step_type("test_missing") is None:
    register_step_type(
        StepType(
            "test_missing",
            UNAVAILABLE_ACTIVITY,
            local=True,
            missing="the test capability is not installed in this build",
        )
    )


@pytest.fixture
async def flow_workers(client: Client, settings: Settings) -> AsyncIterator[Settings]:
    """The project's workers on every queue plus the test step types' queue."""
    async with (
        running_workers(client, settings, ALL_QUEUES),
        Worker(
            client,
            task_queue=TEST_QUEUE,
            activities=[flaky, broken, sleep],
            max_concurrent_activities=20,
        ),
    ):
        await wait_for_pollers(client, settings.namespace, [TEST_QUEUE])
        yield settings


@pytest.fixture
def tools(client: Client, settings: Settings) -> ToolContext:
    return ToolContext(settings, user_id="tester", temporal_client=client)


async def call(ctx: ToolContext, tool_name: str, /, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ctx, tool_name, arguments)
