import asyncio
import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from app.benchmark import recording
from app.benchmark.cli import SCHEDULE_CATCHUP, create_schedule
from app.benchmark.integration import _checkpoint_round_trip
from app.benchmark.phases import PhaseRunner, run_phase
from app.benchmark.report import write_report
from app.contracts.benchmark import (
    ALL_PHASES,
    BenchmarkConfig,
    BenchmarkProgress,
    BenchmarkResult,
    BenchmarkState,
    PhaseInput,
    PhaseRecord,
)
from app.contracts.queues import ORCHESTRATION
from app.settings import Settings
from app.temporal.devserver import temporal_binary
from tests.support.replay import replay_run, replay_saved
from workers.registry import all_workflows
from workflows.benchmark import BenchmarkPhaseWorkflow


def small_config(**overrides: object) -> BenchmarkConfig:
    values: dict[str, object] = {
        "duration_seconds": 600,
        "max_cycles": 1,
        "baseline_operations": 2,
        "baseline_concurrency": 1,
        "load_multiplier": 2,
        "sample_interval_seconds": 0.5,
        "stream_events": 20,
        "epochs": 1,
        "concurrent_executions": 2,
    }
    values.update(overrides)
    return BenchmarkConfig.model_validate(values)


async def start_run(
    client: Client, config: BenchmarkConfig
) -> tuple[str, WorkflowHandle[Any, BenchmarkResult]]:
    """Start a benchmark run with a new id; return the id and its handle."""
    run_id = f"benchmark-test-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        "ExtendedDurationBenchmarkWorkflow",
        BenchmarkState(run_id=run_id, config=config),
        id=run_id,
        task_queue=ORCHESTRATION,
        result_type=BenchmarkResult,
    )
    return run_id, handle


async def run_benchmark(
    client: Client, settings: Settings, config: BenchmarkConfig
) -> tuple[str, BenchmarkResult]:
    run_id, handle = await start_run(client, config)
    return run_id, await handle.result()


async def test_failing_phase_is_reported_and_others_run(
    client: Client, workers: Settings
) -> None:
    config = small_config(inject_failure=["performance_scalability"])
    run_id, result = await run_benchmark(client, workers, config)
    metrics = json.loads((Path(result.report.report_dir) / "metrics.json").read_text())
    phases = {p["phase"]: p for p in metrics["phases"]}
    assert sorted(phases) == sorted(ALL_PHASES)
    failed = phases.pop("performance_scalability")
    assert not failed["passed"]
    assert "fault injected" in failed["errors"][0]
    assert failed["operations"] == 1
    assert failed["succeeded"] == 0
    assert metrics["totals"]["success_rate_percent"] < 100
    for name, phase in phases.items():
        assert phase["passed"], f"{name}: {phase['errors']}"
        assert phase["operations"] == phase["succeeded"] > 0
    sandbox = phases["sandbox_integration"]["metrics"]
    assert sandbox["template"] == "python"
    assert sandbox["recreated"] >= 1
    neural = phases["neural_training"]["metrics"]
    assert neural["rounds"] >= 1
    assert 0 <= neural["accuracy"] <= 1
    streaming = phases["realtime_streaming"]["metrics"]
    assert streaming["events_lost"] == 0
    assert streaming["events_delivered"] == streaming["events_expected"] > 0
    cross = phases["cross_system_integration"]["metrics"]
    assert len(cross["predictions"]) == 2
    assert cross["swarm_events_seen"] >= config.swarm_size
    markdown = Path(result.report.markdown_path).read_text()
    assert "❌ Performance and scalability" in markdown
    assert "✅ Sandbox integration" in markdown
    assert metrics["memory"]["samples"] >= 1
    assert not result.report.all_phases_passed
    await replay_run(client, run_id, all_workflows())
    await replay_run(client, f"{run_id}-c0-neural_training", all_workflows())


async def test_failed_phase_workflow_is_reported(
    client: Client, workers: Settings
) -> None:
    """A phase whose workflow fails, not its activity, still gets its row in
    the report, with the error and a failed operation."""
    config = small_config(
        phases=["realtime_streaming", "performance_scalability"],
        inject_workflow_failure=["realtime_streaming"],
    )
    run_id, result = await run_benchmark(client, workers, config)
    metrics = json.loads((Path(result.report.report_dir) / "metrics.json").read_text())
    phases = {p["phase"]: p for p in metrics["phases"]}
    failed = phases["realtime_streaming"]
    assert not failed["passed"]
    assert "the phase workflow failed" in failed["errors"][0]
    assert "fault injected in the phase workflow" in failed["errors"][0]
    assert failed["operations"] == 1
    assert failed["succeeded"] == 0
    assert phases["performance_scalability"]["passed"]
    assert "❌ Realtime streaming load" in Path(result.report.markdown_path).read_text()
    await replay_run(client, run_id, all_workflows())


async def test_failed_phase_records_failed_operation(
    client: Client, settings: Settings
) -> None:
    config = small_config(inject_failure=["neural_training"])
    request = PhaseInput(
        run_id="benchmark-test-phase", phase="neural_training", cycle=0, config=config
    )
    record = await run_phase(settings, client, request)
    assert not record.result.ok
    assert record.result.operations == 1
    assert record.result.succeeded == 0
    [operation] = record.operations
    assert operation.name == "neural_training"
    assert not operation.ok
    assert operation.error == record.result.error


async def test_performance_health_read_during_load(
    client: Client, workers: Settings
) -> None:
    config = small_config(
        baseline_operations=4,
        load_multiplier=2,
        health_sample_seconds=0.05,
    )
    request = PhaseInput(
        run_id=f"benchmark-test-{uuid.uuid4().hex[:8]}",
        phase="performance_scalability",
        cycle=0,
        config=config,
    )
    record = await run_phase(workers, client, request)
    assert record.result.ok, record.result.error
    metrics = record.result.metrics
    samples = metrics["health_samples_rss_mb"]
    assert metrics["health_sample_seconds"] == 0.05
    assert len(samples) >= 2
    assert all(rss > 0 for rss in samples)
    names = [operation.name for operation in record.operations]
    assert names.count("system_health") == len(samples)
    # A reading recorded between the first and the last load operation was
    # taken while the load ran.
    loads = [i for i, name in enumerate(names) if name.startswith("load_")]
    assert len(loads) == 4 + 8
    readings = [i for i, name in enumerate(names) if name == "system_health"]
    assert any(loads[0] < i < loads[-1] for i in readings), names


async def test_scheduled_run_checkpoint_path(
    client: Client, settings: Settings
) -> None:
    run_id = "nexus-benchmark-run-2026-12-05T07:01:00Z"
    request = PhaseInput(
        run_id=run_id,
        phase="cross_system_integration",
        cycle=3,
        config=small_config(),
    )
    runner = PhaseRunner(settings, client, request)
    await _checkpoint_round_trip(runner)
    assert [op.name for op in runner.operations] == [
        "storage_upload",
        "storage_download",
        "checkpoint_verified",
    ]
    assert all(op.ok for op in runner.operations)
    bucket = settings.resolved_data_dir / "storage" / "benchmark-checkpoints"
    stored = [p.relative_to(bucket) for p in bucket.rglob("*") if p.is_file()]
    assert stored == [
        Path("checkpoints/nexus-benchmark-run-2026-12-05T07-01-00Z/cycle-3.bin")
    ]


async def test_cycles_continue_as_new(client: Client, workers: Settings) -> None:
    config = small_config(max_cycles=2, phases=["performance_scalability"])
    run_id, result = await run_benchmark(client, workers, config)
    assert result.cycles == 2
    history = await client.get_workflow_handle(run_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    assert started.continued_execution_run_id, "the last cycle is not a new run"
    metrics = json.loads((Path(result.report.report_dir) / "metrics.json").read_text())
    assert metrics["timeline"]["cycles"] == 2
    assert metrics["phases"][0]["cycles"] == 2
    assert result.report.all_phases_passed
    scalability = metrics["phases"][0]
    operations = recording.load_run(workers.effective_database_url, run_id)
    names = [operation.name for operation in operations["operations"]]
    assert sum(name.startswith("load_") for name in names) == 2 * (2 + 4)
    # At least one health reading per cycle, taken while the load ran.
    readings = names.count("system_health")
    assert readings >= 2
    assert scalability["operations"] == 2 * (2 + 4) + readings
    assert scalability["metrics"]["scaled"]["concurrency"] == 2
    await replay_run(client, run_id, all_workflows())


async def test_interval_ends_at_duration(client: Client, workers: Settings) -> None:
    # The injected fault ends the cycle at once, well within the duration, and
    # the interval outlasts the duration.
    config = small_config(
        duration_seconds=15,
        cycle_interval_seconds=60,
        max_cycles=None,
        phases=["performance_scalability"],
        inject_failure=["performance_scalability"],
    )
    started = time.monotonic()
    run_id, result = await run_benchmark(client, workers, config)
    assert time.monotonic() - started < 60, "the run slept the whole interval"
    assert result.cycles == 1
    metrics = json.loads((Path(result.report.report_dir) / "metrics.json").read_text())
    assert metrics["timeline"]["cycles"] == 1
    # The run waits out the duration. The recorded start is the start
    # activity's time, a moment after the workflow's, so the figure is a
    # little under 15.
    assert metrics["timeline"]["duration_seconds"] > 10
    data = recording.load_run(workers.effective_database_url, run_id)
    run_started = recording.as_utc(data["run"].started_at)
    for phase in data["phases"]:
        seconds = (recording.as_utc(phase.started_at) - run_started).total_seconds()
        assert seconds < 15, f"cycle {phase.cycle} started after the duration"
    await replay_run(client, run_id, all_workflows())


async def test_report_has_every_sample(client: Client, workers: Settings) -> None:
    config = small_config(phases=["performance_scalability"])
    run_id, result = await run_benchmark(client, workers, config)
    # Once the sampler has ended, no sample can be recorded after the report.
    await client.get_workflow_handle(f"{run_id}-sampler").result()
    metrics = json.loads((Path(result.report.report_dir) / "metrics.json").read_text())
    data = recording.load_run(workers.effective_database_url, run_id)
    assert metrics["memory"]["samples"] == len(data["samples"])
    summary = data["run"].summary
    growth = metrics["memory"]["max_growth_mb_per_min"]
    assert summary["max_growth_mb_per_min"] == growth
    for sample in data["samples"]:
        assert sample.python_heap_used is not None
        assert sample.python_heap_used > 0
        assert sample.python_arenas is not None
        assert sample.python_arenas > 0
    worker = metrics["memory"]["workers"][0]
    assert worker["first_python_heap_mb"] is not None
    assert worker["first_python_arenas"] is not None


async def test_progress_has_phase_times(client: Client, workers: Settings) -> None:
    config = small_config(
        max_cycles=2,
        phases=["neural_training", "performance_scalability"],
        inject_failure=["performance_scalability"],
    )
    run_id, handle = await start_run(client, config)
    running: BenchmarkProgress | None = None
    deadline = time.monotonic() + 120
    while running is None and time.monotonic() < deadline:
        progress = await handle.query("progress", result_type=BenchmarkProgress)
        if progress.phase == "neural_training":
            running = progress
        await asyncio.sleep(0.05)
    assert running is not None, "neural training was never seen running"
    url = workers.effective_database_url
    assert recording.slot_holder(url) == run_id
    assert running.phase_started_at is not None
    assert running.phase_started_at <= datetime.now(UTC)
    assert "neural_training" not in running.phase_times

    result = await handle.result()
    assert recording.slot_holder(url) is None, "the completed run kept its claim"
    final = await handle.query("progress", result_type=BenchmarkProgress)
    assert final.finished
    assert final.cycle == result.cycles - 1
    assert final.phase is None
    assert final.phase_started_at is None
    assert final.completed == {
        "neural_training": True,
        "performance_scalability": False,
    }
    # Both cycles' failures count once each, the last one included.
    assert final.failed_cycles == {
        "neural_training": 0,
        "performance_scalability": 2,
    }
    # The times are those the phases recorded in the last cycle.
    data = recording.load_run(workers.effective_database_url, run_id)
    last_cycle = {p.phase: p for p in data["phases"] if p.cycle == result.cycles - 1}
    assert sorted(final.phase_times) == sorted(last_cycle)
    for name, times in final.phase_times.items():
        assert times.started_at == recording.as_utc(last_cycle[name].started_at)
        assert times.ended_at == recording.as_utc(last_cycle[name].ended_at)
        assert times.seconds >= 0
    neural = final.phase_times["neural_training"]
    assert final.phase_times["performance_scalability"].started_at >= neural.ended_at
    await replay_run(client, run_id, all_workflows())


async def test_terminated_run_stops_its_sampler(
    client: Client, workers: Settings
) -> None:
    # A terminated run cannot stop its sampler, which would sample for good.
    config = small_config(max_cycles=50, phases=["performance_scalability"])
    run_id, handle = await start_run(client, config)
    url = workers.effective_database_url
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the sampler recorded nothing"
        try:
            if recording.load_run(url, run_id)["samples"]:
                break
        except LookupError:
            pass  # the run's first step has not recorded it yet
        await asyncio.sleep(0.2)
    await handle.terminate(reason="operator")
    sampler = client.get_workflow_handle(f"{run_id}-sampler")
    taken = await asyncio.wait_for(sampler.result(), 60)
    assert taken > 0
    assert recording.run_status(url, run_id) == "ended"
    assert recording.slot_holder(url) is None
    # Its recorded cycles give a report, as the command's message promises,
    # and the report shows how the run ended.
    report = write_report(workers, run_id, None)
    assert not report.all_phases_passed
    markdown = Path(report.markdown_path).read_text()
    assert ": terminated before its end, " in markdown.splitlines()[0]
    assert "The run's workflow was terminated before its duration ended" in markdown
    metrics = json.loads(Path(report.report_dir, "metrics.json").read_text())
    assert metrics["workflow_closed"] == "terminated"


async def test_runs_before_progress_times_replay(client: Client) -> None:
    # Recorded before the progress query returned phase times and before
    # samples had the Python heap: the second cycle of a two-cycle run, and
    # its sampler.
    await replay_saved(client, "benchmark_before_phase_times", all_workflows())
    await replay_saved(client, "benchmark_sampler_before_python_heap", all_workflows())


async def test_schedule_is_listed(client: Client, temporal_address: str) -> None:
    schedule_id = f"bench-schedule-{uuid.uuid4().hex[:6]}"
    await create_schedule(client, schedule_id, 6 * 3600, small_config())
    try:
        listed = subprocess.run(
            [str(temporal_binary()), "schedule", "list", "--address", temporal_address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert schedule_id in listed.stdout, listed.stdout + listed.stderr
        described = await client.get_schedule_handle(schedule_id).describe()
        action = described.schedule.action
        assert action.workflow == "ExtendedDurationBenchmarkWorkflow"  # type: ignore[attr-defined]
        assert described.schedule.policy.catchup_window == SCHEDULE_CATCHUP
    finally:
        await client.get_schedule_handle(schedule_id).delete()


async def test_phase_failing_after_cancel_ends_cancelled(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """A phase asked to cancel whose activity then fails on its own (its
    worker died, so no heartbeat came) ends Canceled, not with a result."""
    started = asyncio.Event()
    recorded: list[object] = []

    @activity.defn(name="run_benchmark_phase")
    async def failing_phase(request: PhaseInput) -> PhaseRecord:
        started.set()
        try:
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            # Fails on its own once the cancel is asked for, as the attempt
            # of a worker that died then does with its heartbeat timeout.
            raise ApplicationError("worker died", non_retryable=True) from None

    @activity.defn(name="record_benchmark_phase")
    async def record(record: PhaseRecord) -> None:
        recorded.append(record)

    env_client = time_skipping_env.client
    async with Worker(
        env_client,
        task_queue=ORCHESTRATION,
        workflows=[BenchmarkPhaseWorkflow],
        activities=[failing_phase, record],
        max_heartbeat_throttle_interval=timedelta(milliseconds=100),
        default_heartbeat_throttle_interval=timedelta(milliseconds=100),
    ):
        handle = await env_client.start_workflow(
            BenchmarkPhaseWorkflow.run,
            PhaseInput(
                run_id="run-x", phase="neural_training", cycle=0, config=small_config()
            ),
            id=f"phase-{uuid.uuid4().hex[:8]}",
            task_queue=ORCHESTRATION,
        )
        await asyncio.wait_for(started.wait(), 30)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as ended:
            await handle.result()
    assert isinstance(ended.value.cause, CancelledError), ended.value.cause
    assert recorded == []
