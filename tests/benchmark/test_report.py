import json
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from app.benchmark import recording
from app.benchmark import report as report_module
from app.benchmark.models import BenchmarkRun
from app.benchmark.report import (
    build_metrics,
    render_markdown,
    run_folder_name,
    save_report,
    write_report,
)
from app.contracts.benchmark import (
    REPORTS_FOLDER_ERROR,
    RUN_OPEN_ERROR,
    BenchmarkConfig,
    BenchmarkState,
    OperationRecord,
    PhaseRecord,
    PhaseResult,
    SampleBatch,
    StartRunRequest,
    WorkerSample,
)
from app.db import session_scope
from app.db.migrate import upgrade
from app.settings import Settings

MB = 1_000_000


def _seed(settings: Settings, run_id: str, *, reported: bool = True) -> None:
    """Record a run of two phases; `reported=False` leaves it ended with no
    report written, as a failed report write does."""
    url = settings.effective_database_url
    recording.start_run(url, run_id, BenchmarkConfig(duration_seconds=60))
    start = datetime.now(UTC)
    for minute in range(11):
        recording.record_samples(
            url,
            SampleBatch(
                run_id=run_id,
                taken_at=start + timedelta(minutes=minute),
                samples=[
                    WorkerSample(
                        task_queue="nexus-orchestration",
                        pid=11,
                        identity="w",
                        rss=int((200 + 2 * minute) * MB),
                        heap_used=None,
                        python_heap_used=int((40 + 0.25 * minute) * MB),
                        python_arenas=45 + minute,
                    )
                ],
            ),
        )
    for phase, ok in (("performance_scalability", True), ("neural_training", False)):
        recording.record_phase(
            url,
            PhaseRecord(
                run_id=run_id,
                result=PhaseResult(
                    phase=phase,  # type: ignore[arg-type]
                    cycle=0,
                    ok=ok,
                    error=None if ok else "loss went up",
                    operations=2,
                    succeeded=2 if ok else 1,
                    started_at=start,
                    ended_at=start + timedelta(seconds=4),
                    metrics={"throughput_ratio": 7.25},
                ),
                operations=[
                    OperationRecord(name=f"{phase}_op", ok=True, latency_ms=12.5),
                    OperationRecord(
                        name=f"{phase}_op", ok=ok, latency_ms=30.0, error=None
                    ),
                ],
            ),
        )
    recording.end_run(url, run_id, start + timedelta(minutes=10))
    if reported:
        recording.complete_run(url, run_id, {})


def _cli_settings(tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    """Return migrated settings in `tmp_path` and the environment that gives a
    `nexus` subprocess the same settings, with no Temporal server."""
    settings = Settings(
        data_dir=tmp_path,
        reports_dir=tmp_path / "reports",
        database_url=f"sqlite:///{tmp_path / 'nexus.db'}",
    )
    upgrade(settings.effective_database_url)
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")
    }
    env.update(
        NEXUS_DATA_DIR=str(tmp_path),
        NEXUS_REPORTS_DIR=str(tmp_path / "reports"),
        NEXUS_DATABASE_URL=settings.effective_database_url,
        NEXUS_TEMPORAL_ADDRESS="127.0.0.1:1",
    )
    return settings, env


def _report_command(
    env: dict[str, str], run_id: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "benchmark", "report", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _scalars(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _scalars(item)]
    if isinstance(value, list):
        return [s for item in value for s in _scalars(item)]
    return [str(value)]


def _mark_numbers(value: object, markers: list[int]) -> object:
    """Return `value` with each number replaced by a distinct marker number."""
    if isinstance(value, dict):
        return {key: _mark_numbers(item, markers) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark_numbers(item, markers) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        markers.append(900_001 + len(markers))
        return markers[-1]
    return value


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_growth_from_known_samples(settings: Settings) -> None:
    _seed(settings, "run-growth")
    metrics = build_metrics(settings, "run-growth", None)
    worker = metrics["memory"]["workers"][0]
    assert worker["growth_mb_per_min"] == 2.0
    assert worker["ci95_mb_per_min"] == [2.0, 2.0]
    assert worker["samples"] == 11
    assert worker["sampled_minutes"] == 10.0
    assert metrics["memory"]["sampled_minutes"] == 10.0
    summary = render_markdown(metrics).split("## Timeline")[0]
    assert (
        "2.0 MB/min (nexus-orchestration, adjusted 95% interval 2.0 to 2.0), "
        "fitted over 10.0 minutes of its 11 samples"
    ) in summary
    assert "warm-up included" in summary
    assert metrics["totals"]["operations"] == 4
    assert metrics["totals"]["succeeded"] == 3
    assert metrics["totals"]["success_rate_percent"] == 75.0


def test_python_heap_in_metrics_and_markdown(settings: Settings) -> None:
    _seed(settings, "run-python-heap")
    metrics = build_metrics(settings, "run-python-heap", None)
    worker = metrics["memory"]["workers"][0]
    assert worker["python_heap"]["growth_mb_per_min"] == 0.25
    assert worker["python_heap"]["samples"] == 11
    assert worker["first_python_heap_mb"] == 40.0
    assert worker["last_python_heap_mb"] == 42.5
    assert worker["first_python_arenas"] == 45
    assert worker["last_python_arenas"] == 55
    # The seeded samples have no malloc heap.
    assert worker["heap"] is None
    assert worker["first_heap_mb"] is None
    markdown = render_markdown(metrics)
    heaps = markdown.split("### Heaps")[1].split("## Comparison")[0]
    assert (
        "| nexus-orchestration | 11 | n/a / n/a | n/a | 40.0 / 42.5 | 0.25 |" in heaps
    )
    assert "| 45 / 55 |" in heaps


def test_growth_after_warmup_is_fitted_separately(settings: Settings) -> None:
    url = settings.effective_database_url
    run_id = "run-warmup"
    recording.start_run(url, run_id, BenchmarkConfig(duration_seconds=60))
    start = datetime.now(UTC)
    for minute in range(20):
        # 10 MB/min for the first 5 minutes, then flat RSS; the heap keeps
        # growing at 0.5 MB/min throughout.
        rss = 300 + 10 * min(minute, 5)
        recording.record_samples(
            url,
            SampleBatch(
                run_id=run_id,
                taken_at=start + timedelta(minutes=minute),
                samples=[
                    WorkerSample(
                        task_queue="nexus-neural",
                        pid=12,
                        identity="w",
                        rss=int(rss * MB),
                        heap_used=int((50 + 0.5 * minute) * MB),
                        python_heap_used=int((30 + 0.125 * minute) * MB),
                        python_arenas=31,
                    )
                ],
            ),
        )

    metrics = build_metrics(settings, run_id, None, warmup_minutes=5)
    worker = metrics["memory"]["workers"][0]
    assert worker["growth_mb_per_min"] > 1
    assert worker["heap"]["growth_mb_per_min"] == 0.5

    late = worker["after_warmup"]
    assert late["warmup_minutes"] == 5
    assert late["rss"]["samples"] == 15
    assert late["rss"]["growth_mb_per_min"] == 0.0
    assert late["rss"]["adjusted_ci95_mb_per_min"] == [0.0, 0.0]
    assert late["heap"]["growth_mb_per_min"] == 0.5
    assert late["heap"]["samples"] == 15
    assert worker["python_heap"]["growth_mb_per_min"] == 0.125
    assert late["python_heap"]["growth_mb_per_min"] == 0.125
    assert late["python_heap"]["samples"] == 15


def test_failed_phase_counts_failed_operation(settings: Settings) -> None:
    url = settings.effective_database_url
    run_id = "run-failed-phases"
    recording.start_run(url, run_id, BenchmarkConfig(duration_seconds=60))
    start = datetime.now(UTC)
    end = start + timedelta(seconds=30)
    timeout = "the phase activity failed: activity StartToClose timeout"
    no_model = "no trained model: the neural training phase did not pass"
    records = [
        # What the phase workflow records when the phase's activity timed out.
        PhaseRecord(
            run_id=run_id,
            result=PhaseResult(
                phase="neural_training",
                cycle=0,
                ok=False,
                error=timeout,
                started_at=start,
                ended_at=end,
            ),
        ),
        # A phase that failed after every operation it counted succeeded.
        PhaseRecord(
            run_id=run_id,
            result=PhaseResult(
                phase="cross_system_integration",
                cycle=0,
                ok=False,
                error=no_model,
                operations=1,
                succeeded=1,
                started_at=start,
                ended_at=end,
            ),
            operations=[OperationRecord(name="storage_upload", ok=True, latency_ms=5)],
        ),
        PhaseRecord(
            run_id=run_id,
            result=PhaseResult(
                phase="performance_scalability",
                cycle=0,
                ok=True,
                operations=2,
                succeeded=2,
                started_at=start,
                ended_at=end,
            ),
            operations=[
                OperationRecord(name="load_baseline", ok=True, latency_ms=3),
                OperationRecord(name="load_baseline", ok=True, latency_ms=4),
            ],
        ),
    ]
    for record in records:
        recording.record_phase(url, record)
    recording.end_run(url, run_id, end)
    recording.complete_run(url, run_id, {})

    data = recording.load_run(url, run_id)
    failed = sorted((op.name, op.error) for op in data["operations"] if not op.ok)
    assert failed == [
        ("cross_system_integration", no_model),
        ("neural_training", timeout),
    ]
    rows = {row.phase: row for row in data["phases"]}
    assert rows["neural_training"].operations == 1
    assert rows["neural_training"].succeeded == 0
    assert rows["cross_system_integration"].operations == 2
    assert rows["cross_system_integration"].succeeded == 1

    metrics = build_metrics(settings, run_id, None)
    phases = {phase["phase"]: phase for phase in metrics["phases"]}
    assert phases["neural_training"]["success_rate_percent"] == 0.0
    assert phases["cross_system_integration"]["success_rate_percent"] == 50.0
    assert phases["performance_scalability"]["success_rate_percent"] == 100.0
    assert metrics["totals"]["operations"] == 5
    assert metrics["totals"]["succeeded"] == 3
    assert metrics["totals"]["success_rate_percent"] == 60.0
    markdown = render_markdown(metrics)
    assert "Operations: 3 of 5 succeeded (60.0%)" in markdown
    # The operation counted for the failed phase has no latency of its own.
    assert "| Neural training | ❌ | 1 | 1 | 1 | 0 | 0.0 | 0.0 |" in markdown
    assert "| Cross-system integration | ❌ | 1 | 2 | 1 | 1 | 50.0 |" in markdown


def test_checks_excluded_from_call_rate(settings: Settings) -> None:
    url = settings.effective_database_url
    recording.start_run(url, "run-checks", BenchmarkConfig(duration_seconds=60))
    start = datetime.now(UTC)

    recording.record_phase(
        url,
        PhaseRecord(
            run_id="run-checks",
            result=PhaseResult(
                phase="sandbox_integration",
                cycle=0,
                ok=True,
                operations=5,
                succeeded=5,
                started_at=start,
                ended_at=start + timedelta(seconds=2),
            ),
            operations=[
                OperationRecord(name="sandbox_create", ok=True, latency_ms=70.0),
                OperationRecord(name="sandbox_execute", ok=True, latency_ms=12.0),
                OperationRecord(name="env_vars_read", ok=True, latency_ms=0.0),
                OperationRecord(name="secret_hidden", ok=True, latency_ms=0.0),
                OperationRecord(name="recreated", ok=True, latency_ms=0.0),
            ],
        ),
    )
    recording.end_run(url, "run-checks", start + timedelta(seconds=2))
    recording.complete_run(url, "run-checks", {})

    metrics = build_metrics(settings, "run-checks", None)
    (phase,) = metrics["phases"]
    assert phase["operations"] == 5
    assert phase["checks"] == 3
    assert phase["calls_per_second"] == 1.0
    assert sorted(metrics["latency"]) == ["sandbox_create", "sandbox_execute"]

    markdown = render_markdown(metrics)
    assert "| Sandbox integration | ✅ | 1 | 5 | 3 | 5 | 100.0 | 1.0 |" in markdown


def test_every_markdown_number_is_in_metrics(settings: Settings) -> None:
    _seed(settings, "run-figures")
    metrics = build_metrics(
        settings, "run-figures", {"status": "healthy", "uptime": 3.5}
    )
    markdown = render_markdown(metrics)
    known = " ".join(_scalars(metrics))
    # Column labels such as "p95 (ms)" and "95% interval" are names, not figures.
    body = re.sub(r"\bp(50|95|99)\b|95% interval", "", markdown)
    body = body.replace("run-figures", "")
    for number in re.findall(r"\d+(?:\.\d+)?", body):
        assert number in known, f"{number} in the report is not in metrics.json"

    # A figure that the renderer computes from other figures, instead of
    # copying it from metrics.json, shows up as a number that is no marker.
    markers: list[int] = []
    marked = _mark_numbers(metrics, markers)
    assert isinstance(marked, dict)
    marked_body = re.sub(r"\bp(50|95|99)\b|95% interval", "", render_markdown(marked))
    for text in sorted(_strings(marked), key=len, reverse=True):
        marked_body = marked_body.replace(text, "")
    rendered = {int(n) for n in re.findall(r"\d+", marked_body)}
    assert rendered - set(markers) == set(), "figures not copied from metrics.json"
    assert "✅ Performance and scalability" in markdown
    assert "❌ Neural training" in markdown
    assert "loss went up" in markdown


def test_write_report_files_and_storage(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"reports_dir": tmp_path / "reports"})
    _seed(settings, "run-files")
    result = write_report(settings, "run-files", None)
    out = Path(result.report_dir)
    assert {p.name for p in out.iterdir()} == {
        "metrics.json",
        "report.md",
        "memory.png",
        "latency.png",
        "throughput.png",
    }
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    linked = re.findall(r"^!\[[^\]]+\]\(([^)]+)\)$", markdown, flags=re.MULTILINE)
    assert sorted(linked) == ["latency.png", "memory.png", "throughput.png"]
    for name in linked:
        assert (out / name).is_file(), name
    stored = settings.resolved_data_dir / "storage" / "benchmark-reports" / "run-files"
    assert json.loads((stored / "metrics.json").read_text())["run_id"] == "run-files"
    assert not result.all_phases_passed


def test_report_command_rewrites_report(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        reports_dir=tmp_path / "reports",
        database_url=f"sqlite:///{tmp_path / 'nexus.db'}",
    )
    upgrade(settings.effective_database_url)
    _seed(settings, "run-cli")
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")
    }
    env.update(
        NEXUS_DATA_DIR=str(tmp_path),
        NEXUS_REPORTS_DIR=str(tmp_path / "reports"),
        NEXUS_DATABASE_URL=settings.effective_database_url,
        NEXUS_TEMPORAL_ADDRESS="127.0.0.1:1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "app", "benchmark", "report", "run-cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run_id"] == "run-cli"
    metrics = json.loads(
        (tmp_path / "reports" / "run-cli" / "metrics.json").read_text()
    )
    assert metrics["health"]["temporal"]["status"] == "unhealthy"
    # No health was recorded at the end of this seeded run, so the report states
    # when its health was read.
    markdown = (tmp_path / "reports" / "run-cli" / "report.md").read_text()
    assert "## System health\n\nRead when this report was written again" in markdown
    assert "## Final system health" not in markdown

    ended = {"status": "healthy", "marker": 41}
    write_report(settings, "run-cli", ended)
    again = subprocess.run(
        [sys.executable, "-m", "app", "benchmark", "report", "run-cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    metrics = json.loads(
        (tmp_path / "reports" / "run-cli" / "metrics.json").read_text()
    )
    assert metrics["health"] == ended
    assert metrics["health_note"] is None
    markdown = (tmp_path / "reports" / "run-cli" / "report.md").read_text()
    assert "## Final system health" in markdown
    missing = subprocess.run(
        [sys.executable, "-m", "app", "benchmark", "report", "no-such-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "benchmark run 'no-such-run' not found" in missing.stderr


def test_report_command_completes_ended_run(tmp_path: Path) -> None:
    """A run whose own report write failed stays `ended`, so the next run
    does not compare with it, and writing its report again completes it."""
    settings, env = _cli_settings(tmp_path)
    url = settings.effective_database_url
    _seed(settings, "run-before")
    _seed(settings, "run-ended", reported=False)
    recording.start_run(url, "run-next", BenchmarkConfig(duration_seconds=60))
    assert recording.run_status(url, "run-ended") == "ended"
    previous = build_metrics(settings, "run-next", None)["previous"]
    assert previous["run_id"] == "run-before"

    done = _report_command(env, "run-ended")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "reports" / "run-ended" / "report.md").is_file()
    assert recording.run_status(url, "run-ended") == "completed"
    previous = build_metrics(settings, "run-next", None)["previous"]
    assert previous["run_id"] == "run-ended"
    assert previous["operations"] == 4


def test_report_of_terminated_run_stays_ended(tmp_path: Path) -> None:
    # A run whose workflow was terminated has partial figures, which no later
    # run may take as its previous run.
    settings, env = _cli_settings(tmp_path)
    url = settings.effective_database_url
    _seed(settings, "run-before")
    recording.start_run(url, "run-cut", BenchmarkConfig(duration_seconds=60))
    assert recording.end_orphaned_run(url, "run-cut", datetime.now(UTC), "terminated")
    done = _report_command(env, "run-cut")
    assert done.returncode == 0, done.stderr
    markdown = (tmp_path / "reports" / "run-cut" / "report.md").read_text()
    assert markdown.splitlines()[0] == (
        "# Extended-duration benchmark run-cut: terminated before its end, "
        "some phases failed"
    )
    assert recording.run_status(url, "run-cut") == "ended"
    recording.start_run(url, "run-next", BenchmarkConfig(duration_seconds=60))
    previous = build_metrics(settings, "run-next", None)["previous"]
    assert previous["run_id"] == "run-before"


def test_report_command_rejects_running_run(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        reports_dir=tmp_path / "reports",
        database_url=f"sqlite:///{tmp_path / 'nexus.db'}",
    )
    url = settings.effective_database_url
    upgrade(url)
    recording.start_run(url, "run-live", BenchmarkConfig(duration_seconds=60))
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")
    }
    env.update(
        NEXUS_DATA_DIR=str(tmp_path),
        NEXUS_REPORTS_DIR=str(tmp_path / "reports"),
        NEXUS_DATABASE_URL=url,
        NEXUS_TEMPORAL_ADDRESS="127.0.0.1:1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "app", "benchmark", "report", "run-live"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout
    assert "'run-live' has not finished" in done.stderr
    assert not (tmp_path / "reports" / "run-live").exists()
    # A run cancelled between two cycles has whole cycles, but no report.
    recording.cancel_run(
        url, "run-live", BenchmarkConfig(duration_seconds=60), datetime.now(UTC)
    )
    done = subprocess.run(
        [sys.executable, "-m", "app", "benchmark", "report", "run-live"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout
    assert "'run-live' was cancelled before its duration ended" in done.stderr


FOLDER_NAMES = [
    ("benchmark-20261204T100824-65a797", "benchmark-20261204T100824-65a797"),
    (
        "nexus-benchmark-run-2026-12-05T07:01:00Z",
        "nexus-benchmark-run-2026-12-05T07-01-00Z",
    ),
    ("a/b\\c d", "a-b-c-d"),
    ("..", "_."),
    (".hidden", "_hidden"),
    ("run_1.2", "run_1.2"),
]


@pytest.mark.parametrize(("run_id", "folder"), FOLDER_NAMES)
def test_run_folder_name_is_safe(run_id: str, folder: str) -> None:
    assert run_folder_name(run_id) == folder


def test_scheduled_run_report_folder(tmp_path: Path) -> None:
    settings, env = _cli_settings(tmp_path)
    run_id = "nexus-benchmark-run-2026-12-05T07:01:00Z"
    folder = "nexus-benchmark-run-2026-12-05T07-01-00Z"
    _seed(settings, run_id)
    ended = {"status": "healthy", "marker": 43}
    result = write_report(settings, run_id, ended)
    out = tmp_path / "reports" / folder
    assert Path(result.report_dir) == out
    assert result.storage_prefix == f"benchmark-reports/{folder}/"
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [folder]
    stored = settings.resolved_data_dir / "storage" / "benchmark-reports" / folder
    assert json.loads((stored / "metrics.json").read_text())["run_id"] == run_id

    # The command finds the folder, and the health recorded in it, from the
    # run id with its colons.
    done = _report_command(env, run_id)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["report_dir"] == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["health"] == ended
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [folder]


def test_unknown_run_lists_recent_runs(tmp_path: Path) -> None:
    settings, env = _cli_settings(tmp_path)
    start = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)
    statuses = ["completed", "cancelled", "running"]
    with session_scope(settings.effective_database_url) as session:
        for index in range(7):
            session.add(
                BenchmarkRun(
                    run_id=f"benchmark-listed-{index}",
                    status=statuses[index % 3],
                    started_at=start + timedelta(minutes=index),
                )
            )

    done = _report_command(env, "no-such-run")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: benchmark run 'no-such-run' not found in")
    assert str(tmp_path / "nexus.db") in lines[0]
    assert lines[0].endswith("Its 5 most recent runs, newest first:")
    assert [line.split() for line in lines[1:]] == [
        [f"benchmark-listed-{index}", statuses[index % 3], "started", started]
        for index, started in (
            (6, "2026-12-05T07:06:00+00:00"),
            (5, "2026-12-05T07:05:00+00:00"),
            (4, "2026-12-05T07:04:00+00:00"),
            (3, "2026-12-05T07:03:00+00:00"),
            (2, "2026-12-05T07:02:00+00:00"),
        )
    ]
    assert "temporal workflow list" not in done.stderr
    assert not (tmp_path / "reports").exists()


def test_unknown_run_without_runs(tmp_path: Path) -> None:
    _, env = _cli_settings(tmp_path)
    done = _report_command(env, "no-such-run")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "error: benchmark run 'no-such-run' not found: the database" in done.stderr
    assert "has no benchmark runs. Start one with `nexus benchmark run`" in (
        done.stderr
    )


def test_memory_in_decimal_megabytes(settings: Settings) -> None:
    url = settings.effective_database_url
    run_id = "run-decimal-mb"
    recording.start_run(url, run_id, BenchmarkConfig(duration_seconds=60))
    start = datetime.now(UTC)
    for second in (0, 60):
        recording.record_samples(
            url,
            SampleBatch(
                run_id=run_id,
                taken_at=start + timedelta(seconds=second),
                samples=[
                    WorkerSample(
                        task_queue="nexus-orchestration",
                        pid=13,
                        identity="w",
                        # 484.109 MiB, which the report showed as MB.
                        rss=507_641_856 + 1_000_000 * second // 60,
                        heap_used=2**20,
                        python_heap_used=3 * 2**20,
                        python_arenas=3,
                    )
                ],
            ),
        )

    metrics = build_metrics(settings, run_id, None)
    assert metrics["memory"]["mb_bytes"] == 1_000_000
    worker = metrics["memory"]["workers"][0]
    assert worker["first_rss_mb"] == 507.642
    assert worker["last_rss_mb"] == 508.642
    assert worker["growth_mb_per_min"] == 1.0
    assert worker["first_heap_mb"] == 1.049
    assert worker["first_python_heap_mb"] == 3.146
    assert "MB is a million bytes" in render_markdown(metrics)


def test_previous_growth_in_mib_labelled(settings: Settings) -> None:
    url = settings.effective_database_url
    start = datetime.now(UTC)
    older = {"max_growth_mb_per_min": 0.52, "duration_seconds": 60.0}
    for run_id, summary in (
        ("run-mib", older),
        ("run-mb", {**older, "mb_bytes": 1_000_000}),
    ):
        recording.start_run(url, run_id, BenchmarkConfig(duration_seconds=60))
        recording.end_run(url, run_id, start)
        recording.complete_run(url, run_id, summary)
        recording.start_run(url, f"{run_id}-next", BenchmarkConfig(duration_seconds=60))
        recording.end_run(url, f"{run_id}-next", start)
        recording.complete_run(url, f"{run_id}-next", {})
        metrics = build_metrics(settings, f"{run_id}-next", None)
        assert metrics["previous"]["run_id"] == run_id
        comparison = render_markdown(metrics).split("## Comparison")[1]
        if run_id == "run-mib":
            assert "| max growth (MB/min) | n/a | 0.52 MiB/min |" in comparison
        else:
            assert "| max growth (MB/min) | n/a | 0.52 |" in comparison


def _record_rss(
    settings: Settings,
    run_id: str,
    queue: str,
    pid: int,
    points: list[tuple[float, float]],
) -> None:
    """Record one worker's RSS samples: (seconds after the start, MB) pairs."""
    start = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)
    for seconds, rss_mb in points:
        recording.record_samples(
            settings.effective_database_url,
            SampleBatch(
                run_id=run_id,
                taken_at=start + timedelta(seconds=seconds),
                samples=[
                    WorkerSample(
                        task_queue=queue,
                        pid=pid,
                        identity="w",
                        rss=int(rss_mb * MB),
                        heap_used=int(rss_mb * MB / 2),
                        python_heap_used=None,
                        python_arenas=None,
                    )
                ],
            ),
        )


def test_growth_skips_worker_with_few_samples(settings: Settings) -> None:
    run_id = "run-restarted-worker"
    recording.start_run(
        settings.effective_database_url, run_id, BenchmarkConfig(duration_seconds=60)
    )
    # 21 samples over 10 minutes at 0.5 MB/min, and a worker restarted in the
    # last minute with 4 samples over 30 seconds that grow by 491 MB/min.
    steady = [(30 * i, 300 + 0.25 * i) for i in range(21)]
    restarted = [(570 + 10 * i, 200 + 81.84 * i) for i in range(4)]
    _record_rss(settings, run_id, "nexus-orchestration", 21, steady)
    _record_rss(settings, run_id, "nexus-neural", 22, restarted)

    memory = build_metrics(settings, run_id, None)["memory"]
    workers = {w["pid"]: w for w in memory["workers"]}
    assert workers[22]["samples"] == 4
    assert workers[22]["sampled_minutes"] == 0.5
    assert workers[22]["growth_mb_per_min"] == 491.04
    assert memory["sampled_minutes"] == 10.0
    assert memory["min_fit_samples"] == 10
    assert memory["max_growth_mb_per_min"] == 0.5
    assert memory["max_growth_task_queue"] == "nexus-orchestration"
    assert memory["max_growth_samples"] == 21
    assert memory["max_growth_sampled_minutes"] == 10.0

    markdown = render_markdown(build_metrics(settings, run_id, None))
    summary = markdown.split("## Timeline")[0]
    assert "0.5 MB/min (nexus-orchestration," in summary
    assert "fitted over 10.0 minutes of its 21 samples" in summary
    assert "491" not in summary
    table = markdown.split("## Memory growth")[1].split("### Heaps")[0]
    assert (
        "| nexus-neural | 22 | 4 | 0.5 | 200.0 | 445.52 | too few samples to fit "
        "| n/a | n/a |"
    ) in table
    assert "| nexus-orchestration | 21 | 21 | 10.0 | 300.0 | 305.0 | 0.5 |" in table
    heaps = markdown.split("### Heaps")[1].split("## Comparison")[0]
    assert "| nexus-neural | 22 | 100.0 / 222.76 | too few samples to fit |" in heaps


def test_growth_of_few_samples_not_shown(settings: Settings) -> None:
    run_id = "run-few-samples"
    recording.start_run(
        settings.effective_database_url, run_id, BenchmarkConfig(duration_seconds=60)
    )
    _record_rss(settings, run_id, "nexus-neural", 23, [(0, 200), (20, 300)])

    metrics = build_metrics(settings, run_id, None)
    memory = metrics["memory"]
    assert memory["max_growth_mb_per_min"] is None
    assert memory["max_worker_samples"] == 2
    summary = render_markdown(metrics).split("## Timeline")[0]
    assert (
        "- Largest worker memory growth: too few samples to fit. A fit needs 10 "
        "samples of one worker, and the most that any worker has is 2"
    ) in summary
    assert "MB/min" not in summary


def test_rewritten_report_is_identical(tmp_path: Path) -> None:
    settings, env = _cli_settings(tmp_path)
    _seed(settings, "run-same")
    health = {"status": "healthy", "uptime": 12.345, "memory": {"rss": 507641856}}
    # As the activity that ends the run writes it.
    first = save_report(settings, build_metrics(settings, "run-same", health))
    out = Path(first.report_dir)
    files = ("metrics.json", "report.md", "memory.png")
    written = {name: (out / name).read_bytes() for name in files}

    done = _report_command(env, "run-same")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["report_dir"] == str(out)
    for name in files:
        assert (out / name).read_bytes() == written[name], name


def test_report_command_unwritable_folder(tmp_path: Path) -> None:
    settings, env = _cli_settings(tmp_path)
    _seed(settings, "run-blocked")
    blocker = tmp_path / "file"
    blocker.write_text("")
    env["NEXUS_REPORTS_DIR"] = str(blocker / "reports")
    done = _report_command(env, "run-blocked")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        "error: the report of benchmark run 'run-blocked' could not be written: "
        in done.stderr
    )
    assert "Not a directory" in done.stderr
    assert "set NEXUS_REPORTS_DIR to a folder" in done.stderr


def test_failed_write_keeps_earlier_report(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"reports_dir": tmp_path / "reports"})
    _seed(settings, "run-full")
    out = Path(write_report(settings, "run-full", {"status": "healthy"}).report_dir)
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def full_disk(*args: object) -> list[Path]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "render_plots", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(settings, "run-full", {"status": "degraded"})
    after = {path.name: path.read_bytes() for path in out.iterdir()}
    assert after == before
    # No scratch folder is left beside the reports.
    assert [path.name for path in (tmp_path / "reports").iterdir()] == ["run-full"]


async def test_worker_checks_its_reports_folder_first(
    settings: Settings, tmp_path: Path
) -> None:
    # A run on `nexus up` is checked by the worker that writes its report,
    # whose settings can differ from those of the command that started it.
    from activities.benchmark import BenchmarkActivities

    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = settings.model_copy(update={"reports_dir": blocker / "reports"})
    activities = BenchmarkActivities(unwritable)
    request = StartRunRequest(
        run_id="refused", config=BenchmarkConfig(duration_seconds=60)
    )
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(activities.start_run, request)
    assert refused.value.non_retryable
    assert refused.value.type == REPORTS_FOLDER_ERROR
    assert refused.value.message.startswith(
        f"the workers' reports folder {blocker / 'reports'} is not writable ("
    )
    assert refused.value.message.endswith(
        "set NEXUS_REPORTS_DIR in the environment of `nexus up` (or of the "
        "worker processes) to a folder that they can write to, and restart them"
    )
    # Nothing is recorded for a run that did not start.
    with pytest.raises(LookupError):
        recording.load_run(settings.effective_database_url, "refused")
    await ActivityEnvironment().run(BenchmarkActivities(settings).start_run, request)
    assert recording.load_run(settings.effective_database_url, "refused")


async def _open_run(client: Client, run_id: str) -> WorkflowHandle[object, object]:
    """Start a benchmark workflow that stays open: no worker polls its queue."""
    return await client.start_workflow(
        "ExtendedDurationBenchmarkWorkflow",
        BenchmarkState(run_id=run_id, config=BenchmarkConfig()),
        id=run_id,
        task_queue=f"unpolled-{uuid.uuid4().hex[:6]}",
    )


async def test_scheduled_run_rejected_while_other_open(
    settings: Settings, client: Client
) -> None:
    # A schedule starts its runs without the command's check, so its run
    # checks in its first step that no other benchmark run is open.
    from activities.benchmark import BenchmarkActivities

    suffix = uuid.uuid4().hex[:6]
    running = await _open_run(client, f"benchmark-open-{suffix}")
    scheduled = f"nexus-benchmark-run-{suffix}"
    request = StartRunRequest(
        run_id=scheduled,
        config=BenchmarkConfig(duration_seconds=60, schedule_id="nexus-benchmark"),
    )
    environment = ActivityEnvironment(client=client)
    activities = BenchmarkActivities(settings)
    try:
        with pytest.raises(ApplicationError) as refused:
            await environment.run(activities.start_run, request)
    finally:
        await running.terminate("test cleanup")
    assert refused.value.non_retryable
    assert refused.value.type == RUN_OPEN_ERROR
    assert refused.value.message.startswith(f"benchmark run {running.id} is running")
    assert f"nexus benchmark cancel {running.id}" in refused.value.message
    # Nothing is recorded for a run that did not start.
    with pytest.raises(LookupError):
        recording.load_run(settings.effective_database_url, scheduled)


async def test_simultaneous_scheduled_runs_pick_one(
    settings: Settings, client: Client
) -> None:
    # Two schedules with the same interval start their runs together. Both
    # are in their first step, so the one that started first goes on.
    from app.benchmark.runs import runs_in_the_way

    url = settings.effective_database_url
    suffix = uuid.uuid4().hex[:6]
    first = await _open_run(client, f"first-run-{suffix}")
    second = await _open_run(client, f"second-run-{suffix}")
    try:
        before_first = await runs_in_the_way(client, url, first.id)
        before_second = await runs_in_the_way(client, url, second.id)
        # Past its first step, the second run is in the way of the first.
        recording.start_run(url, second.id, BenchmarkConfig(duration_seconds=60))
        recorded_second = await runs_in_the_way(client, url, first.id)
    finally:
        await first.terminate("test cleanup")
        await second.terminate("test cleanup")
    assert second.id not in before_first
    assert first.id in before_second
    assert second.id in recorded_second


def test_closed_run_never_all_passed(settings: Settings) -> None:
    """A run terminated before its end ran only some phases: the report
    does not call it all passed, as the command's result does not."""
    _seed(settings, "run-closed")
    metrics = build_metrics(settings, "run-closed", None)
    metrics["totals"]["phases_passed"] = metrics["totals"]["phases_run"] = 5
    metrics["workflow_closed"] = "terminated"
    markdown = render_markdown(metrics)
    title = markdown.splitlines()[0]
    assert title.endswith(": terminated before its end, every phase that ended passed")
    assert "Every phase passed" not in markdown
    assert "so not every phase ran; 5 of the 5 phases that ended passed" in markdown
