"""The database claim that lets one benchmark run at a time pass its first step."""

import asyncio
import dataclasses
import threading
import uuid
from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import benchmark as benchmark_activities
from activities.benchmark import BenchmarkActivities
from app.benchmark import recording
from app.contracts.benchmark import (
    RUN_OPEN_ERROR,
    BenchmarkConfig,
    BenchmarkState,
    ReportRequest,
    StartRunRequest,
)
from app.settings import Settings


async def _open_run(client: Client, run_id: str) -> WorkflowHandle[object, object]:
    """Start a benchmark workflow that stays open: no worker polls its queue."""
    return await client.start_workflow(
        "ExtendedDurationBenchmarkWorkflow",
        BenchmarkState(run_id=run_id, config=BenchmarkConfig()),
        id=run_id,
        task_queue=f"unpolled-{uuid.uuid4().hex[:6]}",
    )


def _request(run_id: str, schedule_id: str | None = None) -> StartRunRequest:
    config = BenchmarkConfig(duration_seconds=60, schedule_id=schedule_id)
    return StartRunRequest(run_id=run_id, config=config)


async def _no_visible_runs(*args: object) -> list[str]:
    """Stand in for `runs_in_the_way` while the visibility store lags."""
    return []


def test_racing_claims_pick_one(database_url: str) -> None:
    runs = [f"run-{index}" for index in range(8)]
    barrier = threading.Barrier(len(runs))
    holders: dict[str, str] = {}

    def claim(run_id: str) -> None:
        barrier.wait()
        holders[run_id] = recording.claim_slot(database_url, run_id)

    threads = [threading.Thread(target=claim, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [run_id for run_id, holder in holders.items() if holder == run_id]
    assert len(winners) == 1, holders
    assert set(holders.values()) == set(winners)
    assert recording.slot_holder(database_url) == winners[0]


def test_claim_kept_and_moved_by_holder(database_url: str) -> None:
    assert recording.claim_slot(database_url, "first") == "first"
    # A retried first step keeps its claim.
    assert recording.claim_slot(database_url, "first") == "first"
    assert recording.claim_slot(database_url, "second") == "first"
    # The takeover moves the claim only from the holder that it names.
    assert not recording.take_over_slot(database_url, "second", "someone-else")
    assert recording.slot_holder(database_url) == "first"
    assert recording.take_over_slot(database_url, "second", "first")
    assert not recording.take_over_slot(database_url, "third", "first")
    assert recording.slot_holder(database_url) == "second"
    assert not recording.release_slot(database_url, "first")
    assert recording.release_slot(database_url, "second")
    assert recording.slot_holder(database_url) is None


def test_run_end_releases_claim(database_url: str) -> None:
    config = BenchmarkConfig(duration_seconds=60)
    ended = datetime.now(UTC)
    recording.start_run(database_url, "completed", config)
    recording.claim_slot(database_url, "completed")
    recording.end_run(database_url, "completed", ended)
    assert recording.slot_holder(database_url) == "completed"
    recording.complete_run(database_url, "completed", {})
    assert recording.slot_holder(database_url) is None

    recording.claim_slot(database_url, "cancelled")
    recording.cancel_run(database_url, "cancelled", config, ended)
    assert recording.slot_holder(database_url) is None

    # A run whose claim another run took over releases nothing of it, as
    # when `nexus benchmark report` completes an old run.
    recording.claim_slot(database_url, "holder")
    recording.complete_run(database_url, "completed", {})
    recording.cancel_run(database_url, "cancelled", config, ended)
    assert recording.slot_holder(database_url) == "holder"


async def test_failed_report_releases_on_last_attempt(settings: Settings) -> None:
    url = settings.effective_database_url
    activities = BenchmarkActivities(settings)
    # No row is recorded for this run, so its report fails at once.
    request = ReportRequest(run_id="no-row", ended_at=datetime.now(UTC))
    recording.claim_slot(url, "no-row")
    environment = ActivityEnvironment()
    policy = RetryPolicy(maximum_attempts=3)
    environment.info = dataclasses.replace(
        environment.info, attempt=1, retry_policy=policy
    )
    with pytest.raises(LookupError):
        await environment.run(activities.finish_run, request)
    assert recording.slot_holder(url) == "no-row", "released before the last try"
    environment.info = dataclasses.replace(environment.info, attempt=3)
    with pytest.raises(LookupError):
        await environment.run(activities.finish_run, request)
    assert recording.slot_holder(url) is None


async def test_running_holder_rejects_cli_run(
    settings: Settings, client: Client
) -> None:
    url = settings.effective_database_url
    suffix = uuid.uuid4().hex[:6]
    holder = await _open_run(client, f"benchmark-holder-{suffix}")
    own = await _open_run(client, f"benchmark-cli-{suffix}")
    environment = ActivityEnvironment(client=client)
    activities = BenchmarkActivities(settings)
    try:
        await environment.run(activities.start_run, _request(holder.id))
        with pytest.raises(ApplicationError) as rejected:
            await environment.run(activities.start_run, _request(own.id))
    finally:
        await holder.terminate("test cleanup")
        await own.terminate("test cleanup")
    assert rejected.value.non_retryable
    assert rejected.value.type == RUN_OPEN_ERROR
    message = rejected.value.message
    assert message.startswith(f"benchmark run {holder.id} is running")
    assert f"nexus benchmark cancel {holder.id}" in message
    assert recording.slot_holder(url) == holder.id
    with pytest.raises(LookupError):
        recording.run_status(url, own.id)


async def test_claim_rejects_scheduled_run_unseen_by_visibility(
    settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmark_activities, "runs_in_the_way", _no_visible_runs)
    suffix = uuid.uuid4().hex[:6]
    holder = await _open_run(client, f"benchmark-holder-{suffix}")
    scheduled = f"nexus-benchmark-run-{suffix}"
    environment = ActivityEnvironment(client=client)
    activities = BenchmarkActivities(settings)
    try:
        await environment.run(activities.start_run, _request(holder.id))
        with pytest.raises(ApplicationError) as rejected:
            await environment.run(
                activities.start_run, _request(scheduled, "nexus-benchmark")
            )
    finally:
        await holder.terminate("test cleanup")
    assert rejected.value.type == RUN_OPEN_ERROR
    assert rejected.value.message.startswith(f"benchmark run {holder.id} is running")


@pytest.mark.parametrize("scheduled_first", [True, False])
async def test_simultaneous_cli_and_scheduled_pick_one(
    settings: Settings,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    scheduled_first: bool,
) -> None:
    # Within the visibility lag neither run sees the other on the server.
    monkeypatch.setattr(benchmark_activities, "runs_in_the_way", _no_visible_runs)
    suffix = uuid.uuid4().hex[:6]
    cli_run = await _open_run(client, f"benchmark-cli-{suffix}")
    scheduled_run = await _open_run(client, f"nexus-benchmark-run-{suffix}")
    requests = [_request(cli_run.id), _request(scheduled_run.id, "nexus-benchmark")]
    if scheduled_first:
        requests.reverse()
    activities = BenchmarkActivities(settings)
    try:
        outcomes = await asyncio.gather(
            *(
                ActivityEnvironment(client=client).run(activities.start_run, request)
                for request in requests
            ),
            return_exceptions=True,
        )
    finally:
        await cli_run.terminate("test cleanup")
        await scheduled_run.terminate("test cleanup")
    started = [r.run_id for r, o in zip(requests, outcomes, strict=True) if o is None]
    rejected = [o for o in outcomes if o is not None]
    assert len(started) == 1, outcomes
    assert len(rejected) == 1, outcomes
    [error] = rejected
    assert isinstance(error, ApplicationError), error
    assert error.type == RUN_OPEN_ERROR
    assert error.message.startswith(f"benchmark run {started[0]} is running")
    url = settings.effective_database_url
    assert recording.slot_holder(url) == started[0]


async def test_stale_claim_taken_over(settings: Settings, client: Client) -> None:
    # The holders left claims behind: one was terminated, the other ran on
    # a server that this one does not know.
    url = settings.effective_database_url
    suffix = uuid.uuid4().hex[:6]
    terminated = await _open_run(client, f"benchmark-terminated-{suffix}")
    await terminated.terminate("test: ended without releasing its claim")
    environment = ActivityEnvironment(client=client)
    activities = BenchmarkActivities(settings)
    for stale, run_id in (
        (terminated.id, f"benchmark-after-terminated-{suffix}"),
        (f"benchmark-elsewhere-{suffix}", f"benchmark-after-unknown-{suffix}"),
    ):
        assert recording.claim_slot(url, stale) == stale
        await environment.run(activities.start_run, _request(run_id))
        assert recording.slot_holder(url) == run_id
        assert recording.run_status(url, run_id) == "running"
        recording.release_slot(url, run_id)
