"""Capability step types inside user-defined workflows, end to end."""

import asyncio
import dataclasses
import logging
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.integration import IntegrationActivities, step_user
from app.contracts.system import AuditRecord
from app.contracts.workflows import StepRequest
from app.services.audit import list_calls
from app.settings import Settings
from app.tools import ToolContext, ToolError, invoke_tool, load_tools

load_tools()


async def run_definition(
    ctx: ToolContext, name: str, steps: list[dict[str, object]]
) -> dict[str, object]:
    created = await invoke_tool(ctx, "workflow_create", {"name": name, "steps": steps})
    return await invoke_tool(
        ctx,
        "workflow_execute",
        {"workflow_id": created["workflow_id"], "async": False},
    )


def step_outputs(result: dict[str, object]) -> dict[str, dict[str, object]]:
    status = result.get("result", result)
    steps = status["steps"]  # type: ignore[index]
    return {s["name"]: s["output"] for s in steps}  # type: ignore[index]


async def test_capability_steps_run(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    result = await run_definition(
        ctx,
        "integration-steps",
        [
            {
                "name": "code",
                "type": "sandbox_execution",
                "params": {"code": "print(6 * 7)"},
            },
            {
                "name": "train",
                "type": "neural_computation",
                "params": {"dataset": "iris", "epochs": 2, "tier": "nano"},
            },
            {
                "name": "predict",
                "type": "neural_computation",
                "depends_on": ["train"],
                "params": {
                    "mode": "predict",
                    "model_id": "{{steps.train.output.model_id}}",
                    "input": [[5.1, 3.5, 1.4, 0.2]],
                },
            },
            {
                "name": "integrate",
                "type": "cross_system_integration",
                "depends_on": ["code", "predict"],
                "params": {"systems": ["sandbox", "neural", "workflows"]},
            },
            {
                "name": "optimize",
                "type": "performance_optimization",
                "depends_on": ["integrate"],
            },
            {
                "name": "scale",
                "type": "scalability_validation",
                "depends_on": ["optimize"],
                "params": {"operations": 2, "concurrency": 1, "multiplier": 2},
            },
        ],
    )
    outputs = step_outputs(result)
    assert outputs["code"]["stdout"].strip() == "42"  # type: ignore[union-attr]
    assert outputs["train"]["model_id"]
    assert len(outputs["predict"]["predictions"]) == 1  # type: ignore[arg-type]
    systems = outputs["integrate"]["systems"]
    assert all(check["ok"] for check in systems.values())  # type: ignore[union-attr]
    assert outputs["optimize"]["rss_before"] > 0  # type: ignore[operator]
    assert outputs["scale"]["scaled"]["operations"] == 4  # type: ignore[index]


async def test_failing_code_fails_step(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    with pytest.raises(ToolError) as caught:
        await run_definition(
            ctx,
            "integration-failing-code",
            [
                {
                    "name": "code",
                    "type": "sandbox_execution",
                    "params": {"code": "import sys; print('out'); sys.exit(3)"},
                }
            ],
        )
    # With nothing on stderr, the message ends with stdout.
    assert caught.value.message.endswith(
        "the code ended failed with exit code 3; stderr is empty, stdout ends: out; "
        "see the steps with workflow_status"
    )


async def test_step_timeout_logs_no_error(
    client: Client, workers: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ctx = ToolContext(workers, temporal_client=client)
    with pytest.raises(ToolError) as caught:
        await run_definition(
            ctx,
            "integration-step-timeout",
            [
                {
                    "name": "slow",
                    "type": "sandbox_execution",
                    "timeout": 3,
                    "retry_attempts": 0,
                    "params": {
                        "template": "base",
                        "language": "bash",
                        "code": "sleep 10",
                    },
                }
            ],
        )
    assert "timed out" in caught.value.message
    execution_id = re.search(r"execution (wfx_\w+)", caught.value.message)
    assert execution_id is not None
    user = step_user(execution_id.group(1), "slow")

    # The attempt learns of its timeout on its worker, after the run failed.
    audited: list[AuditRecord] = []
    for _ in range(100):
        audited = await asyncio.to_thread(
            list_calls,
            workers.effective_database_url,
            user_id=user,
            tool="sandbox_execute",
        )
        if audited:
            break
        await asyncio.sleep(0.1)
    (execute,) = audited
    assert execute.outcome == "error"
    assert execute.error == "sandbox_execute was cancelled before it finished"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    cancelled = [
        r
        for r in caplog.records
        if r.name == "app.sandbox.service" and "was cancelled" in r.getMessage()
    ]
    assert len(cancelled) == 1
    assert cancelled[0].levelno == logging.INFO
    assert cancelled[0].exc_info is None


async def test_swarm_step_runs_tasks(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    result = await run_definition(
        ctx,
        "integration-swarms",
        [
            {
                "name": "swarms",
                "type": "swarm_orchestration",
                "params": {
                    "swarms": 2,
                    "agents": 2,
                    "topology": "hierarchical",
                    "code": "print('part done')",
                },
            }
        ],
    )
    swarms = step_outputs(result)["swarms"]["swarms"]
    assert len(swarms) == 2  # type: ignore[arg-type]
    for swarm in swarms:  # type: ignore[union-attr]
        assert swarm["status"] == "completed"
        assert "part done" in swarm["output"]
    listed = await invoke_tool(ctx, "swarm_list", {"status": "active"})
    active = {s["swarm_id"] for s in listed["swarms"]}
    assert not active & {s["swarm_id"] for s in swarms}  # type: ignore[union-attr]


async def test_swarm_step_retry_destroys_earlier_swarms(
    client: Client, workers: Settings
) -> None:
    # An attempt whose worker died left two swarms, which the audit log names
    # under the step's user. The next attempt destroys them before it creates
    # its own, and leaves the swarms of the execution's other steps alone.
    execution_id = f"retry-{uuid.uuid4().hex[:8]}"
    step = ToolContext(
        workers, user_id=step_user(execution_id, "swarms"), temporal_client=client
    )
    left = [
        await invoke_tool(step, "swarm_init", {"topology": "mesh", "maxAgents": 2})
        for _ in range(2)
    ]
    sibling = ToolContext(
        workers, user_id=step_user(execution_id, "more"), temporal_client=client
    )
    kept = await invoke_tool(
        sibling, "swarm_init", {"topology": "mesh", "maxAgents": 1}
    )
    environment = ActivityEnvironment(client=client)
    environment.info = dataclasses.replace(environment.info, attempt=2)
    request = StepRequest(
        execution_id=execution_id,
        step="swarms",
        type="swarm_orchestration",
        params={"swarms": 1, "agents": 1, "topology": "mesh", "code": "print(7)"},
    )
    outcome = await environment.run(
        IntegrationActivities(workers).swarm_orchestration, request
    )
    (ran,) = outcome.output["swarms"]
    assert ran["status"] == "completed"
    listed = await invoke_tool(step, "swarm_list", {"status": "all"})
    status = {s["swarm_id"]: s["status"] for s in listed["swarms"]}
    for swarm in left:
        assert status[swarm["swarm_id"]] == "destroyed"
    assert status[ran["swarm_id"]] == "destroyed"
    assert status[kept["swarm_id"]] == "active"
    await invoke_tool(sibling, "swarm_destroy", {"swarm_id": kept["swarm_id"]})


async def test_sandbox_step_retry_deletes_earlier(
    client: Client, workers: Settings
) -> None:
    # An attempt whose worker died left a sandbox, which the audit log names
    # under the step's user. Only a retry deletes it, and the sandboxes of
    # the execution's other steps stay.
    execution_id = f"retry-{uuid.uuid4().hex[:8]}"
    step = ToolContext(
        workers, user_id=step_user(execution_id, "code"), temporal_client=client
    )
    left = await invoke_tool(step, "sandbox_create", {"template": "python"})
    sibling = ToolContext(
        workers, user_id=step_user(execution_id, "more"), temporal_client=client
    )
    kept = await invoke_tool(sibling, "sandbox_create", {"template": "python"})
    request = StepRequest(
        execution_id=execution_id,
        step="code",
        type="sandbox_execution",
        params={"code": "print(7)"},
    )
    activities = IntegrationActivities(workers)
    try:
        await ActivityEnvironment(client=client).run(
            activities._delete_earlier_sandboxes, request
        )
        listed = await invoke_tool(step, "sandbox_list", {"status": "all"})
        assert left["sandbox_id"] in {s["sandbox_id"] for s in listed["sandboxes"]}

        environment = ActivityEnvironment(client=client)
        environment.info = dataclasses.replace(
            environment.info,
            attempt=2,
            started_time=datetime.now(UTC),
            start_to_close_timeout=timedelta(seconds=60),
        )
        outcome = await environment.run(activities.sandbox_execution, request)
        assert outcome.output["stdout"] == "7\n"
        listed = await invoke_tool(step, "sandbox_list", {"status": "all"})
        present = {s["sandbox_id"] for s in listed["sandboxes"]}
        assert left["sandbox_id"] not in present
        assert outcome.output["sandbox_id"] not in present
        assert kept["sandbox_id"] in present
    finally:
        await invoke_tool(sibling, "sandbox_delete", {"sandbox_id": kept["sandbox_id"]})


async def test_sandbox_step_starts_nothing_past_its_deadline(
    client: Client, workers: Settings
) -> None:
    """An attempt with less than a second left of its start-to-close timeout
    (its cleanup took the rest) starts no sandbox and no program: the server
    has reported it timed out, and maybe the run failed, by then."""
    execution_id = f"late-{uuid.uuid4().hex[:8]}"
    step = ToolContext(
        workers, user_id=step_user(execution_id, "code"), temporal_client=client
    )
    request = StepRequest(
        execution_id=execution_id,
        step="code",
        type="sandbox_execution",
        params={"code": "print(7)", "timeout": 60},
    )
    environment = ActivityEnvironment(client=client)
    environment.info = dataclasses.replace(
        environment.info,
        started_time=datetime.now(UTC) - timedelta(seconds=2.5),
        start_to_close_timeout=timedelta(seconds=3),
    )
    with pytest.raises(ApplicationError) as late:
        await environment.run(IntegrationActivities(workers).sandbox_execution, request)
    assert late.value.message == (
        "step 'code': this attempt's timeout ran out before its sandbox was "
        "created; raise the step's timeout"
    )
    listed = await invoke_tool(step, "sandbox_list", {"status": "all"})
    assert listed["sandboxes"] == []


async def test_first_attempt_destroys_nothing(
    client: Client, workers: Settings
) -> None:
    # The step's user may have swarms of an earlier run of the same step, such
    # as one that a user's definition repeats. So only a retry destroys them.
    execution_id = f"first-{uuid.uuid4().hex[:8]}"
    step = ToolContext(
        workers, user_id=step_user(execution_id, "swarms"), temporal_client=client
    )
    own = await invoke_tool(step, "swarm_init", {"topology": "mesh", "maxAgents": 1})
    request = StepRequest(
        execution_id=execution_id, step="swarms", type="swarm_orchestration"
    )
    await ActivityEnvironment(client=client).run(
        IntegrationActivities(workers)._destroy_earlier_swarms, request
    )
    listed = await invoke_tool(step, "swarm_list", {"status": "all"})
    status = {s["swarm_id"]: s["status"] for s in listed["swarms"]}
    assert status[own["swarm_id"]] == "active"
    await invoke_tool(step, "swarm_destroy", {"swarm_id": own["swarm_id"]})


# The retry runs in a worker that a restart left without its tools loaded.
_FRESH_RETRY = """
import asyncio, dataclasses, sys
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment
from activities.integration import IntegrationActivities
from app.contracts.workflows import StepRequest
from app.contracts.system import AuditRecord
from app.services.audit import list_calls
from app.settings import Settings

async def main():
    settings = Settings()
    client = await Client.connect(settings.effective_temporal_address)
    environment = ActivityEnvironment(client=client)
    environment.info = dataclasses.replace(environment.info, attempt=2)
    request = StepRequest(
        execution_id=sys.argv[1], step="swarms", type="swarm_orchestration"
    )
    activities = IntegrationActivities(settings)
    await environment.run(activities._destroy_earlier_swarms, request)

asyncio.run(main())
"""


async def test_fresh_worker_retry_destroys_swarms(
    client: Client, workers: Settings
) -> None:
    execution_id = f"fresh-{uuid.uuid4().hex[:8]}"
    step = ToolContext(
        workers, user_id=step_user(execution_id, "swarms"), temporal_client=client
    )
    left = await invoke_tool(step, "swarm_init", {"topology": "mesh", "maxAgents": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(
        NEXUS_DATA_DIR=str(workers.resolved_data_dir),
        NEXUS_DATABASE_URL=workers.effective_database_url,
        NEXUS_TEMPORAL_ADDRESS=workers.effective_temporal_address,
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _FRESH_RETRY, execution_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    listed = await invoke_tool(step, "swarm_list", {"status": "all"})
    status = {s["swarm_id"]: s["status"] for s in listed["swarms"]}
    assert status[left["swarm_id"]] == "destroyed"


async def test_streaming_step_loses_nothing(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    result = await run_definition(
        ctx,
        "integration-streaming",
        [
            {
                "name": "stream",
                "type": "real_time_streaming",
                "params": {"streams": 5, "events": 40},
            },
            {
                "name": "watch",
                "type": "real_time_monitoring",
                "depends_on": ["stream"],
                "params": {"table": "workflow_steps", "wait_ms": 0},
            },
        ],
    )
    stream = step_outputs(result)["stream"]
    # Filters: in.(phase_1..4), eq.phase_1, neq.phase_1, sequence<20, >=20.
    assert stream["events_expected"] == 32 + 8 + 32 + 20 + 20
    assert stream["events_delivered"] == stream["events_expected"]
    assert stream["events_lost"] == 0
    assert stream["duplicates"] == 0
    assert step_outputs(result)["watch"]["subscription_id"]


async def test_create_rejects_bad_params(settings: Settings) -> None:
    ctx = ToolContext(settings)
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx,
            "workflow_create",
            {
                "name": "bad-params",
                "steps": [
                    {"name": "code", "type": "sandbox_execution", "params": {}},
                    {
                        "name": "scale",
                        "type": "scalability_validation",
                        "params": {"operations": 0},
                    },
                ],
            },
        )
    message = caught.value.message
    assert caught.value.kind == "invalid_argument"
    assert "step 'code': params.code: Field required" in message
    assert "step 'scale': params.operations" in message
    # Templated params are checked when the step runs, once they are filled in.
    created = await invoke_tool(
        ctx,
        "workflow_create",
        {
            "name": "templated-params",
            "steps": [
                {
                    "name": "code",
                    "type": "sandbox_execution",
                    "params": {"code": "{{input.code}}"},
                }
            ],
        },
    )
    assert created["workflow_id"]
