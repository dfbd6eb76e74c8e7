import uuid

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.system import SystemActivities
from app.contracts.queues import ALL_QUEUES, ORCHESTRATION
from app.contracts.system import ProbeRequest
from app.settings import Settings
from tests.support.replay import replay_run, replay_saved
from workers.registry import all_workflows
from workflows.system import SystemCheckResult, SystemCheckWorkflow


async def test_probe_reaches_every_queue(client: Client, workers: Settings) -> None:
    workflow_id = f"system-check-{uuid.uuid4().hex[:8]}"
    result = await client.execute_workflow(
        SystemCheckWorkflow.run,
        ProbeRequest(queues=list(ALL_QUEUES)),
        id=workflow_id,
        task_queue=ORCHESTRATION,
        result_type=SystemCheckResult,
    )
    assert sorted(p.task_queue for p in result.probes.probes) == sorted(ALL_QUEUES)
    assert result.probes.missing == {}
    assert result.health.database.status == "healthy"
    await replay_run(client, workflow_id, all_workflows())


async def test_recorded_history_replays(client: Client) -> None:
    await replay_saved(client, "system_check", all_workflows())


async def test_queue_without_worker_is_missing(
    time_skipping_env: WorkflowEnvironment, shared_settings: Settings
) -> None:
    """Only the orchestration queue has a worker; the probe of another queue
    times out and is reported, not faked."""
    env_client = time_skipping_env.client
    async with Worker(
        env_client,
        task_queue=ORCHESTRATION,
        workflows=[SystemCheckWorkflow],
        activities=[
            SystemActivities(shared_settings).check_health,
            _orchestration_probe(),
        ],
    ):
        result = await env_client.execute_workflow(
            SystemCheckWorkflow.run,
            ProbeRequest(queues=[ORCHESTRATION, "nexus-sandbox"], timeout_seconds=2),
            id=f"system-check-{uuid.uuid4().hex[:8]}",
            task_queue=ORCHESTRATION,
            result_type=SystemCheckResult,
        )
    assert [p.task_queue for p in result.probes.probes] == [ORCHESTRATION]
    assert "nexus-sandbox" in result.probes.missing
    assert "within 2 s (probe timed out)" in result.probes.missing["nexus-sandbox"]


def _orchestration_probe():  # type: ignore[no-untyped-def]
    from activities.system import ProbeActivities

    return ProbeActivities(ORCHESTRATION).probe_worker
