"""`nexus benchmark ...`: option checks and command errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.console import Console
from rich.progress import Progress
from temporalio.client import (
    Client,
    ScheduleAlreadyRunningError,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.service import RPCError, RPCStatusCode
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from app.benchmark import cli as benchmark_cli
from app.benchmark import recording
from app.benchmark.cli import format_seconds, parse_duration
from app.benchmark.leftovers import phase_executions_query
from app.cli import cli
from app.contracts.benchmark import (
    REPORTS_FOLDER_ERROR,
    RUN_OPEN_ERROR,
    BenchmarkConfig,
    BenchmarkProgress,
    BenchmarkResult,
    BenchmarkState,
    PhaseRecord,
    PhaseResult,
    PhaseTimes,
    ReportResult,
)
from app.db.migrate import upgrade
from app.settings import Settings, get_settings
from app.temporal.devserver import EmbeddedTemporal, port_is_open, temporal_binary
from app.workflows.engine import search_attributes
from tests.conftest import running_workers

# Each row: the command line, then the option and the value the message names.
REJECTED = [
    (["run", "--duration", "3x"], "'--duration'", "'3x'"),
    (["run", "--duration", "0s"], "'--duration'", "'0s'"),
    (["run", "--duration", "-1m"], "'--duration'", "'-1m'"),
    (["run", "--duration", "99999d"], "'--duration'", "'99999d'"),
    (["run", "--interval", "-5s"], "'--interval'", "'-5s'"),
    (["run", "--interval", "8d"], "'--interval'", "'8d'"),
    (["run", "--interval", "9999999999d"], "'--interval'", "'9999999999d'"),
    (["run", "--load-multiplier", "0"], "'--load-multiplier'", "0"),
    (["run", "--load-multiplier", "1000"], "'--load-multiplier'", "1000"),
    (["run", "--streams", "0"], "'--streams'", "0"),
    (["run", "--epochs", "-3"], "'--epochs'", "-3"),
    (["run", "--streams", "2.5"], "'--streams'", "'2.5'"),
    (["run", "--load-multiplier", "ten"], "'--load-multiplier'", "'ten'"),
    (["run", "--epochs", ""], "'--epochs'", "''"),
    (["schedule", "--every", "0s"], "'--every'", "'0s'"),
    (["schedule", "--duration", "8d"], "'--duration'", "'8d'"),
    (["schedule", "--every", "30s"], "'--every'", "'30s'"),
    (["schedule", "--every", "999999d"], "'--every'", "'999999d'"),
    (["schedule", "--id", ""], "'--id'", "''"),
    (["schedule", "--id", "a b/c"], "'--id'", "'a b/c'"),
    (["schedule", "--every", "1h", "--duration", "2h"], "'--duration'", "'2h'"),
    (["schedule", "--every", "1h", "--duration", "1h"], "'--duration'", "'1h'"),
    (["cancel", ""], "'RUN_ID'", "''"),
    (["cancel", " "], "'RUN_ID'", "' '"),
    (["report", ""], "'RUN_ID'", "''"),
    (["report", " "], "'RUN_ID'", "' '"),
]


@pytest.mark.parametrize("command", ["cancel", "report"])
def test_usage_names_run_id(command: str) -> None:
    result = CliRunner().invoke(cli, ["benchmark", command, "--help"])
    assert result.exit_code == 0, result.output
    usage = result.output.split("Usage:", 1)[1].splitlines()[0]
    # Typer puts a required argument in braces.
    assert usage.split()[-1] == "{RUN_ID}"
    assert "run_id" not in result.output


@pytest.mark.parametrize(("arguments", "option", "value"), REJECTED)
def test_bad_option_rejected(arguments: list[str], option: str, value: str) -> None:
    # A closed address, so that an option accepted by mistake fails at once
    # instead of starting a run on the default ports.
    closed = {key: None for key in os.environ if key.startswith("NEXUS_")}
    closed["NEXUS_TEMPORAL_ADDRESS"] = "127.0.0.1:1"
    result = CliRunner().invoke(cli, ["benchmark", *arguments], env=closed)
    output = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, output
    assert f"Invalid value for {option}: {value} " in output
    assert "use a" in output or "pass a value" in output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_infinite_interval_rejected() -> None:
    # 400 digits parse to an infinite float, which the workflow cannot decode.
    text = "9" * 400
    with pytest.raises(typer.BadParameter, match="out of range"):
        benchmark_cli.build_config(
            {"cycle_interval_seconds": text},
            cycle_interval_seconds=parse_duration(text, "--interval"),
        )


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("0s", 0.0), ("0m", 0.0)])
def test_zero_interval_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text, "--interval", allow_zero=True) == seconds


def test_durations_parsed() -> None:
    assert parse_duration("90") == 90.0
    assert parse_duration("1.5m") == 90.0
    assert parse_duration("2h") == 7200.0
    assert parse_duration("1d") == 86400.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0.0 s"),
        (4.25, "4.2 s"),
        (59.94, "59.9 s"),
        (65, "1 min 05 s"),
        (7620, "2 h 07 min"),
    ],
)
def test_phase_times_formatted(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


_START = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
_BASE = {"run_id": "run", "elapsed_seconds": 30.0, "duration_seconds": 60.0}


def _times(start: float, end: float) -> PhaseTimes:
    return PhaseTimes(
        started_at=_START + timedelta(seconds=start),
        ended_at=_START + timedelta(seconds=end),
    )


def _result(cycles: int) -> BenchmarkResult:
    report = ReportResult(
        run_id="run",
        report_dir="/reports/run",
        markdown_path="/reports/run/report.md",
        storage_prefix="benchmark-reports/run/",
        success_rate=90.0,
        all_phases_passed=False,
    )
    return BenchmarkResult(run_id="run", cycles=cycles, report=report)


class _ScriptedRun:
    """A workflow handle whose `progress` results come from a list. Its result
    is ready once the list is used up. Later queries return `final`, or raise
    when `final` is None, as for a run that no worker can query."""

    def __init__(
        self,
        answers: list[BenchmarkProgress],
        final: BenchmarkProgress | None,
        result: BenchmarkResult | BaseException,
    ) -> None:
        self.id = "run"
        self.answers = answers
        self.final = final
        self.outcome = result
        self.ended = asyncio.Event()

    async def query(self, name: str, result_type: type) -> BenchmarkProgress:
        assert name == "progress"
        if self.answers:
            return self.answers.pop(0)
        self.ended.set()
        if self.final is None:
            raise RPCError("no worker polls the queue", RPCStatusCode.UNAVAILABLE, b"")
        return self.final

    async def result(self) -> BenchmarkResult:
        await self.ended.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


async def _follow_output(
    monkeypatch: pytest.MonkeyPatch, run: _ScriptedRun
) -> dict[str, str]:
    """Follow `run` and return the last line that names each bar, keyed by
    the bar's title, as a terminal shows them once the command ends."""
    out = io.StringIO()
    monkeypatch.setattr(benchmark_cli, "console", Console(file=out, width=140))
    await benchmark_cli.follow(run, poll_seconds=0.01)  # type: ignore[arg-type]
    return _bar_lines(out.getvalue())


def _bar_lines(out: str) -> dict[str, str]:
    lines: dict[str, str] = {}
    for line in out.splitlines():
        for title in ("Run", *benchmark_cli.PHASE_TITLES.values()):
            if line.startswith(f"{title} "):
                # rich draws a bar with full cells and, at a part-filled
                # end, a half cell.
                drawn = line.translate(str.maketrans("━╸╺", "   "))
                lines[title] = " ".join(drawn.split())
    return lines


async def test_bars_end_with_final_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last poll finds performance and scalability running, and the run
    # ends before the next poll, so only the final query has its outcome.
    answers = [
        BenchmarkProgress(
            cycle=0,
            phase="sandbox_integration",
            phase_started_at=datetime.now(UTC) - timedelta(seconds=5),
            **_BASE,
        ),
        BenchmarkProgress(
            cycle=0,
            phase="performance_scalability",
            phase_started_at=_START + timedelta(seconds=18),
            completed={"sandbox_integration": True, "neural_training": False},
            phase_times={
                "sandbox_integration": _times(0, 4.2),
                "neural_training": _times(5, 17),
            },
            failed_cycles={"sandbox_integration": 0, "neural_training": 1},
            **_BASE,
        ),
    ]
    final = BenchmarkProgress(
        cycle=1,
        phase=None,
        finished=True,
        completed={
            "sandbox_integration": True,
            "neural_training": False,
            "performance_scalability": True,
        },
        phase_times={
            "sandbox_integration": _times(0, 4.2),
            "neural_training": _times(5, 17),
            "performance_scalability": _times(18, 30.5),
        },
        failed_cycles={
            "sandbox_integration": 0,
            "neural_training": 1,
            "performance_scalability": 0,
        },
        **_BASE,
    )
    lines = await _follow_output(
        monkeypatch, _ScriptedRun(answers, final, _result(cycles=1))
    )
    assert lines["Sandbox integration"] == "Sandbox integration ✅ 4.2 s"
    assert lines["Neural training"] == "Neural training ❌ 12.0 s"
    assert lines["Performance and scalability"] == (
        "Performance and scalability ✅ 12.5 s"
    )
    assert lines["Realtime streaming load"] == "Realtime streaming load not run"
    assert lines["Run"].startswith("Run 1 cycle, report written ")


async def test_bars_show_cancelled_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # `nexus benchmark cancel` from another shell, while neural training runs.
    running = BenchmarkProgress(
        cycle=0,
        phase="neural_training",
        phase_started_at=datetime.now(UTC) - timedelta(seconds=3),
        completed={"sandbox_integration": True},
        phase_times={"sandbox_integration": _times(0, 4.2)},
        **_BASE,
    )
    cancelled = WorkflowFailureError(cause=CancelledError("cancelled"))
    with pytest.raises(WorkflowFailureError):
        await _follow_output(monkeypatch, _ScriptedRun([running], None, cancelled))
    out = benchmark_cli.console.file.getvalue()  # type: ignore[attr-defined]
    lines = _bar_lines(out)
    assert lines["Sandbox integration"] == "Sandbox integration ✅ 4.2 s"
    assert lines["Neural training"] == "Neural training cancelled"
    assert lines["Realtime streaming load"] == "Realtime streaming load not run"
    assert lines["Run"].startswith("Run cancelled ")


async def test_bars_show_phase_cancelled_between_polls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While the run records its cancellation, the query still returns a
    # result, with no running phase and no outcome for the cancelled one.
    running = BenchmarkProgress(
        cycle=0,
        phase="neural_training",
        phase_started_at=datetime.now(UTC) - timedelta(seconds=3),
        completed={"sandbox_integration": True},
        phase_times={"sandbox_integration": _times(0, 4.2)},
        failed_cycles={"sandbox_integration": 0},
        **_BASE,
    )
    cancelling = running.model_copy(update={"phase": None, "phase_started_at": None})
    cancelled = WorkflowFailureError(cause=CancelledError("cancelled"))
    with pytest.raises(WorkflowFailureError):
        await _follow_output(
            monkeypatch, _ScriptedRun([running, cancelling], None, cancelled)
        )
    out = benchmark_cli.console.file.getvalue()  # type: ignore[attr-defined]
    lines = _bar_lines(out)
    assert lines["Sandbox integration"] == "Sandbox integration ✅ 4.2 s"
    assert lines["Neural training"] == "Neural training cancelled"
    assert lines["Realtime streaming load"] == "Realtime streaming load not run"


@pytest.mark.parametrize(
    ("interrupt_cancels", "running", "later", "run"),
    [
        # Ctrl-C on this command's own server, which cancels the run next.
        (True, "interrupted", "not run", "interrupted"),
        # Ctrl-C on a server that this command did not start: the run goes
        # on, so its phases have neither ended nor been skipped.
        (False, "still running", "waiting", "still running on the server"),
    ],
)
async def test_bars_after_interrupt(
    monkeypatch: pytest.MonkeyPatch,
    interrupt_cancels: bool,
    running: str,
    later: str,
    run: str,
) -> None:
    state = BenchmarkProgress(
        cycle=0,
        phase="neural_training",
        phase_started_at=datetime.now(UTC),
        completed={"sandbox_integration": True},
        phase_times={"sandbox_integration": _times(0, 4.2)},
        **_BASE,
    )
    scripted = _ScriptedRun([state] * 1000, state, _result(cycles=1))
    out = io.StringIO()
    monkeypatch.setattr(benchmark_cli, "console", Console(file=out, width=140))
    follow = asyncio.create_task(
        benchmark_cli.follow(
            scripted,  # type: ignore[arg-type]
            poll_seconds=0.01,
            interrupt_cancels=interrupt_cancels,
        )
    )
    while len(scripted.answers) > 990:
        await asyncio.sleep(0.01)
    follow.cancel()  # as asyncio.run does on Ctrl-C
    with pytest.raises(asyncio.CancelledError):
        await follow
    lines = _bar_lines(out.getvalue())
    assert lines["Sandbox integration"] == "Sandbox integration ✅ 4.2 s"
    assert lines["Neural training"] == f"Neural training {running}"
    assert lines["Realtime streaming load"] == f"Realtime streaming load {later}"
    assert lines["Run"].startswith(f"Run {run} ")


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ("tcp connect error", RPCStatusCode.UNAVAILABLE),
        # A connection that breaks during the call.
        ("transport error", RPCStatusCode.UNKNOWN),
    ],
)
async def test_bars_when_server_unreachable(
    monkeypatch: pytest.MonkeyPatch, message: str, status: RPCStatusCode
) -> None:
    # The run's result cannot be read while `nexus up` is down, but the run
    # resumes when the server is back, so nothing has failed.
    state = BenchmarkProgress(
        cycle=0,
        phase="neural_training",
        phase_started_at=datetime.now(UTC),
        completed={"sandbox_integration": True},
        phase_times={"sandbox_integration": _times(0, 4.2)},
        **_BASE,
    )
    unreachable = RPCError(message, status, b"")
    with pytest.raises(RPCError):
        await _follow_output(monkeypatch, _ScriptedRun([state], None, unreachable))
    out = benchmark_cli.console.file.getvalue()  # type: ignore[attr-defined]
    lines = _bar_lines(out)
    assert lines["Sandbox integration"] == "Sandbox integration ✅ 4.2 s"
    assert lines["Neural training"] == "Neural training still running"
    assert lines["Realtime streaming load"] == "Realtime streaming load waiting"
    assert lines["Run"].startswith("Run still running on the server ")
    assert "failed" not in out


def test_new_cycle_clears_last_outcomes() -> None:
    progress = Progress(console=Console(file=io.StringIO()))
    bars = benchmark_cli.PhaseBars(progress)
    done = {name: True for name in benchmark_cli.PHASE_TITLES}
    times = {name: _times(0, 1) for name in benchmark_cli.PHASE_TITLES}
    now = datetime.now(UTC)
    bars.update(
        BenchmarkProgress(
            cycle=0, phase=None, completed=done, phase_times=times, **_BASE
        ),
        now,
    )
    assert {task.fields["status"] for task in progress.tasks[1:]} == {"✅"}
    bars.update(
        BenchmarkProgress(
            cycle=1, phase="sandbox_integration", phase_started_at=now, **_BASE
        ),
        now,
    )
    statuses = {task.description: task.fields["status"] for task in progress.tasks}
    assert statuses.pop("Sandbox integration") == "running"
    assert statuses.pop("Run") == "cycle 2"
    assert set(statuses.values()) == {"waiting"}
    # A waiting bar is empty, like one that has not run in the first cycle.
    assert {task.completed for task in progress.tasks[2:]} == {0}


async def test_piped_output_prints_each_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output that is not a terminal gets a line per phase as it ends, since
    rich draws the bars there only once the run has ended."""
    answers = [
        BenchmarkProgress(
            cycle=0,
            phase="realtime_streaming",
            completed={"sandbox_integration": True, "neural_training": False},
            phase_times={
                "sandbox_integration": _times(0, 4.2),
                "neural_training": _times(5, 17),
            },
            **_BASE,
        )
    ]
    out = io.StringIO()
    monkeypatch.setattr(benchmark_cli, "console", Console(file=out, width=80))
    run = _ScriptedRun(answers, answers[-1], _result(cycles=1))
    await benchmark_cli.follow(run, poll_seconds=0.01)  # type: ignore[arg-type]
    printed = out.getvalue().splitlines()
    assert printed.count("Cycle 1: Sandbox integration ✅ 4.2 s") == 1
    assert printed.count("Cycle 1: Neural training ❌ 12.0 s") == 1


async def test_piped_lines_after_cycle_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The last phases of cycle 1 end, the second of them failing, and the
    # run continues as new into cycle 2 between two polls.
    everything_but_last = {name: True for name in list(benchmark_cli.PHASE_TITLES)[:-2]}
    answers = [
        BenchmarkProgress(
            cycle=0,
            phase="cross_system_integration",
            phase_started_at=datetime.now(UTC),
            completed=everything_but_last,
            **_BASE,
        ),
        BenchmarkProgress(
            cycle=1,
            phase="sandbox_integration",
            phase_started_at=datetime.now(UTC),
            failed_cycles={"performance_scalability": 1},
            **_BASE,
        ),
    ]

    out = io.StringIO()
    monkeypatch.setattr(benchmark_cli, "console", Console(file=out, width=80))
    run = _ScriptedRun(answers, answers[-1], _result(cycles=2))
    await benchmark_cli.follow(run, poll_seconds=0.01)  # type: ignore[arg-type]

    printed = out.getvalue().splitlines()
    titles = benchmark_cli.PHASE_TITLES
    for name in everything_but_last:
        assert sum(f"Cycle 1: {titles[name]} ✅" in line for line in printed) == 1
    assert printed.count(f"Cycle 1: {titles['cross_system_integration']} ✅") == 1
    assert printed.count(f"Cycle 1: {titles['performance_scalability']} ❌") == 1
    assert not any(line.startswith("Cycle 2:") for line in printed)


async def test_bar_of_phase_ended_between_polls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Performance and scalability fails and the run continues as new into
    # cycle 1 between two polls, so only the failed cycles record it.
    answers = [
        BenchmarkProgress(
            cycle=0,
            phase="performance_scalability",
            phase_started_at=datetime.now(UTC),
            completed={"sandbox_integration": True},
            phase_times={"sandbox_integration": _times(0, 3)},
            failed_cycles={"sandbox_integration": 0},
            **_BASE,
        ),
        BenchmarkProgress(
            cycle=1,
            phase="sandbox_integration",
            phase_started_at=datetime.now(UTC) - timedelta(seconds=65),
            failed_cycles={"sandbox_integration": 0, "performance_scalability": 1},
            **_BASE,
        ),
    ]
    run = _ScriptedRun(answers, None, _result(cycles=2))
    lines = await _follow_output(monkeypatch, run)
    # Like the other bars of the new cycle, it waits for its next run.
    assert lines["Performance and scalability"] == (
        "Performance and scalability waiting"
    )
    out = benchmark_cli.console.file.getvalue()  # type: ignore[attr-defined]
    # Without the run's database the error is not known here.
    assert (
        "Cycle 1: Performance and scalability failed: its error is in the report" in out
    )
    # Without the final progress, the last poll's state is what is known.
    assert lines["Sandbox integration"].startswith("Sandbox integration running 1 min")
    assert lines["Run"].startswith("Run 2 cycles, report written ")


def _record_phase(
    url: str, cycle: int, phase: str, seconds: float, error: str | None
) -> None:
    start = 100.0 * cycle
    recording.record_phase(
        url,
        PhaseRecord(
            run_id="run",
            result=PhaseResult(
                phase=phase,  # type: ignore[arg-type]
                cycle=cycle,
                ok=error is None,
                error=error,
                started_at=_START + timedelta(seconds=start),
                ended_at=_START + timedelta(seconds=start + seconds),
            ),
        ),
    )


def _cycle_change_answers() -> list[BenchmarkProgress]:
    # Neural training fails in cycle 1, and performance and scalability
    # fails and the run continues as new into cycle 2 between two polls.
    return [
        BenchmarkProgress(
            cycle=0,
            phase="performance_scalability",
            phase_started_at=datetime.now(UTC),
            completed={"sandbox_integration": True, "neural_training": False},
            phase_times={
                "sandbox_integration": _times(0, 3),
                "neural_training": _times(3, 5),
            },
            failed_cycles={"neural_training": 1},
            **_BASE,
        ),
        BenchmarkProgress(
            cycle=1,
            phase="sandbox_integration",
            phase_started_at=datetime.now(UTC),
            failed_cycles={"neural_training": 1, "performance_scalability": 1},
            **_BASE,
        ),
    ]


@pytest.mark.parametrize("terminal", [True, False])
async def test_failed_phase_errors_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, terminal: bool
) -> None:
    url = f"sqlite:///{tmp_path / 'nexus.db'}"
    upgrade(url)
    recording.start_run(url, "run", BenchmarkConfig(duration_seconds=60))
    _record_phase(url, 0, "sandbox_integration", 3, None)
    _record_phase(url, 0, "neural_training", 2, "training diverged\nat round 3")
    _record_phase(url, 0, "performance_scalability", 12.5, "no poller on nexus-x")
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=terminal)
    monkeypatch.setattr(benchmark_cli, "console", console)
    run = _ScriptedRun(_cycle_change_answers(), None, _result(cycles=2))
    await benchmark_cli.follow(
        run,  # type: ignore[arg-type]
        poll_seconds=0.01,
        database_url=url,
    )
    text = out.getvalue()
    neural = "Cycle 1: Neural training failed: training diverged"
    performance = "Cycle 1: Performance and scalability failed: no poller on nexus-x"
    if terminal:
        # The live display draws its notes under the bars.
        last = text.rsplit("Cross-system integration", 1)[1]
        assert neural in last
        assert performance in last
        return
    printed = text.splitlines()
    assert printed[:3] == [
        "Cycle 1: Sandbox integration ✅ 3.0 s",
        "Cycle 1: Neural training ❌ 2.0 s",
        f"  {neural}",
    ]
    # The last phase of the cycle gets its time from the database.
    ended = printed.index("Cycle 1: Performance and scalability ❌ 12.5 s")
    assert printed[ended + 1] == f"  {performance}"
    assert not any(line.startswith("Cycle 2:") for line in printed)


async def test_final_progress_failure_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(benchmark_cli, "console", Console(file=out, width=140))
    run = _ScriptedRun([], None, _result(cycles=1))
    result = await benchmark_cli.follow(run, poll_seconds=0.01)  # type: ignore[arg-type]
    assert result.cycles == 1
    assert "Could not read the phases' final outcomes" in out.getvalue()
    assert "no worker polls the queue" in out.getvalue()


def _finished_run(history: Path | None) -> benchmark_cli.FinishedRun:
    return benchmark_cli.FinishedRun("benchmark-x", _result(cycles=1), history)


def _invoke_run(
    monkeypatch: pytest.MonkeyPatch, finished: benchmark_cli.FinishedRun, **env: str
) -> str:
    """Run `nexus benchmark run` with a run that has already ended, and return
    the command's output."""

    async def ended_run(*args: object, **kwargs: object) -> benchmark_cli.FinishedRun:
        return finished

    monkeypatch.setattr(benchmark_cli, "run_benchmark", ended_run)
    environment: dict[str, str | None] = {
        key: None for key in os.environ if key.startswith("NEXUS_")
    }
    environment.update(env)
    # The command checks that it can write there before it starts.
    data_dir = Path(env.get("NEXUS_DATA_DIR", "."))
    environment["NEXUS_REPORTS_DIR"] = str(data_dir / "reports")
    # The process's settings are read once and cached; this run has its own.
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(cli, ["benchmark", "run"], env=environment)
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 1, done.output  # the run's report has a failed phase
    return done.output


def test_link_after_own_server_names_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    history = tmp_path / "temporal.db"
    history.write_bytes(b"")
    output = _invoke_run(
        monkeypatch,
        _finished_run(history),
        NEXUS_DATA_DIR=str(tmp_path),
        NEXUS_TEMPORAL_UI_PORT="18233",
    )
    link = "http://127.0.0.1:18233/namespaces/default/workflows/benchmark-x"
    command = f"NEXUS_DATA_DIR={tmp_path} NEXUS_TEMPORAL_UI_PORT=18233 nexus up"
    assert f"Web UI:  {link} (works while `{command}` runs)" in output
    assert "The Temporal server that this command started has stopped." in output
    assert f"It kept the run's history in {history}." in output


def test_link_after_own_server_without_history(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    history = tmp_path / "temporal.db"
    output = _invoke_run(
        monkeypatch, _finished_run(history), NEXUS_DATA_DIR=str(tmp_path)
    )
    link = "http://127.0.0.1:8233/namespaces/default/workflows/benchmark-x"
    assert f"Web UI:  {link} (not served: the run's history is gone)" in output
    assert f"its history file {history} no longer exists" in output
    assert "works while" not in output


def test_link_on_external_server_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The web UI of a server set by address is not on this machine's UI port.
    output = _invoke_run(
        monkeypatch,
        _finished_run(None),
        NEXUS_DATA_DIR=str(tmp_path),
        NEXUS_TEMPORAL_ADDRESS="127.0.0.1:44233",
    )
    assert (
        "Web UI:  workflow benchmark-x in namespace default, in the web UI of the "
        "Temporal server at 127.0.0.1:44233\n"
    ) in output
    assert "8233" not in output


def test_link_on_server_that_outlives_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    output = _invoke_run(monkeypatch, _finished_run(None), NEXUS_DATA_DIR=str(tmp_path))
    link = "http://127.0.0.1:8233/namespaces/default/workflows/benchmark-x"
    assert f"Web UI:  {link}\n" in output
    assert "has stopped" not in output
    assert "Report:  /reports/run/report.md" in output


def test_serve_again_command_spells_changed_settings(tmp_path: Path) -> None:
    assert benchmark_cli.serve_again_command(Settings()) == "nexus up"
    folder = tmp_path / "data dir"
    settings = Settings(
        data_dir=folder, temporal_port=17233, http_port=13000, namespace="bench"
    )
    assert benchmark_cli.serve_again_command(settings) == (
        f"NEXUS_DATA_DIR='{folder}' NEXUS_TEMPORAL_PORT=17233 "
        "NEXUS_HTTP_PORT=13000 NEXUS_NAMESPACE=bench nexus up"
    )


def test_schedule_without_server_names_it() -> None:
    address = f"127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(
        cli, ["benchmark", "schedule"], env={"NEXUS_TEMPORAL_ADDRESS": address}
    )
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: "), result.output
    assert address in result.output
    assert "Traceback" not in result.output


def test_duplicate_schedule_id_rejected(temporal_address: str) -> None:
    schedule_id = f"bench-duplicate-{uuid.uuid4().hex[:6]}"
    command = ["benchmark", "schedule", "--every", "6h", "--id", schedule_id]
    env = {"NEXUS_TEMPORAL_ADDRESS": temporal_address}
    try:
        first = CliRunner().invoke(cli, command, env=env)
        assert first.exit_code == 0, first.output
        second = CliRunner().invoke(cli, command, env=env)
        assert second.exit_code == 1
        assert f"schedule with id {schedule_id!r} already exists" in second.output
        # The hint deletes the schedule on this server, not on localhost:7233.
        hint = (
            f"`temporal schedule delete --schedule-id {schedule_id} --address "
            f"{temporal_address} --namespace default`"
        )
        assert hint in " ".join(second.output.split())
        assert not isinstance(second.exception, ScheduleAlreadyRunningError)
    finally:
        delete = ["schedule", "delete", "--schedule-id", schedule_id]
        done = subprocess.run(
            [str(temporal_binary()), *delete, "--address", temporal_address],
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr


async def test_cancel_not_ended_exits_1(
    monkeypatch: pytest.MonkeyPatch, client: Client, temporal_address: str
) -> None:
    # No worker polls this queue, so the run cannot take the cancellation.
    run_id = f"benchmark-unpolled-{uuid.uuid4().hex[:6]}"
    handle = await client.start_workflow(
        "ExtendedDurationBenchmarkWorkflow",
        BenchmarkState(run_id=run_id, config=BenchmarkConfig()),
        id=run_id,
        task_queue=f"unpolled-{uuid.uuid4().hex[:6]}",
    )
    real_cancel_run = benchmark_cli.cancel_run

    async def cancel_run_briefly(*args: Any, **kwargs: Any) -> bool:
        return await real_cancel_run(*args, **{**kwargs, "timeout": 1.0})

    monkeypatch.setattr(benchmark_cli, "cancel_run", cancel_run_briefly)
    env = {"NEXUS_TEMPORAL_ADDRESS": temporal_address}
    try:
        done = await asyncio.to_thread(
            CliRunner().invoke, cli, ["benchmark", "cancel", run_id], env=env
        )
    finally:
        await handle.terminate("test cleanup")
    output = " ".join(done.output.split())
    assert done.exit_code == 1, output
    assert f"Benchmark {run_id} was asked to cancel but had not ended" in output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")
    }
    env.update(
        NEXUS_DATA_DIR=str(data_dir),
        NEXUS_REPORTS_DIR=str(data_dir / "reports"),
        NEXUS_TEMPORAL_PORT=str(_free_port()),
        NEXUS_TEMPORAL_UI_PORT=str(_free_port()),
        NEXUS_HTTP_PORT=str(_free_port()),
        NEXUS_WORKER_WARM_UP="false",
        **extra,
    )
    return env


class _Output:
    """Lines of a child's stderr, read on a thread so the test can wait."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        self._stream = process.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            await asyncio.sleep(0.2)
        raise AssertionError(f"{pattern!r} not in the output:\n{self.text}")


_RUN = [
    sys.executable,
    "-m",
    "app",
    "benchmark",
    "run",
    "--duration",
    "30s",
    "--load-multiplier",
    "1",
    "--streams",
    "1",
    "--epochs",
    "1",
]


def _start_cli(
    command: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[str], _Output]:
    """Start the CLI in a session of its own, as a terminal's foreground job,
    and read its stderr."""
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return process, _Output(process)


async def _running_phase(client: Client, run_id: str, timeout: float) -> str:
    """Wait until the run is inside a phase and return that phase's workflow id."""
    handle = client.get_workflow_handle(run_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RPCError, WorkflowQueryFailedError):
            progress = await handle.query("progress", result_type=BenchmarkProgress)
            if progress.phase:
                return f"{run_id}-c{progress.cycle}-{progress.phase}"
        await asyncio.sleep(0.5)
    raise AssertionError(f"no phase of {run_id} started within {timeout} s")


async def _wait_for_json(url: str, timeout: float) -> dict[str, object]:
    """GET `url` until it returns 200 with JSON, and return that JSON."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                response = await http.get(url)
            except httpx.TransportError as error:
                last = repr(error)
            else:
                if response.status_code == 200:
                    return dict(response.json())
                last = f"{response.status_code} {response.text[:200]}"
            await asyncio.sleep(1.0)
    raise AssertionError(f"{url} did not answer with JSON in {timeout} s: {last}")


@pytest.mark.timeout(600)
async def test_embedded_run_ends_with_bars_and_link(tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = ["1s" if word == "30s" else word for word in _RUN]  # one cycle
    process, output = _start_cli(command, env)
    try:
        exit_code = await asyncio.to_thread(process.wait, 480)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = output.text
    assert exit_code == 0, text
    bars = {
        line.split("━")[0].strip(): " ".join(line.replace("━", " ").split())
        for line in text.splitlines()
        if "━" in line
    }
    for title in benchmark_cli.PHASE_TITLES.values():
        assert re.fullmatch(rf"{title} ✅ \d+\.\d s", bars[title]), bars.get(title)
    assert bars["Run"].startswith("Run 1 cycle, report written "), bars["Run"]

    # The command stopped the server it started, so the link needs `nexus up`.
    shown = re.search(r"Web UI: +(\S+) \(works while `(.+)` runs\)", text)
    assert shown is not None, text
    link, serve_again = shown[1], shown[2]
    ui_port, temporal_port = env["NEXUS_TEMPORAL_UI_PORT"], env["NEXUS_TEMPORAL_PORT"]
    assert serve_again == (
        f"NEXUS_DATA_DIR={tmp_path} NEXUS_TEMPORAL_PORT={temporal_port} "
        f"NEXUS_TEMPORAL_UI_PORT={ui_port} NEXUS_HTTP_PORT={env['NEXUS_HTTP_PORT']} "
        "nexus up"
    )
    run_id = link.rsplit("/", 1)[1]
    assert link == f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/{run_id}"
    assert not port_is_open("127.0.0.1", int(ui_port))

    up = subprocess.Popen(
        serve_again,
        shell=True,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # The web UI's own API, which the page at the link reads.
        api = f"http://127.0.0.1:{ui_port}/api/v1/namespaces/default/workflows/{run_id}"
        described = await _wait_for_json(api, 120)
        execution = described["workflowExecutionInfo"]
        assert isinstance(execution, dict)
        assert execution["status"] == "WORKFLOW_EXECUTION_STATUS_COMPLETED"
        async with httpx.AsyncClient(timeout=10) as http:
            page = await http.get(link)
        assert page.status_code == 200
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            await asyncio.to_thread(up.wait, 60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
async def test_interrupt_cancels_embedded_run(tmp_path: Path, stop: str) -> None:
    env = _cli_env(tmp_path)
    process, output = _start_cli(_RUN, env)
    address = f"127.0.0.1:{env['NEXUS_TEMPORAL_PORT']}"
    try:
        started = await output.wait_for(r"Benchmark (benchmark-\S+): (\S+)", 240)
        run_id = started[1]
        # The embedded server's web UI, not its gRPC address.
        assert started[2] == (
            f"http://127.0.0.1:{env['NEXUS_TEMPORAL_UI_PORT']}/namespaces/"
            f"default/workflows/{run_id}"
        ), output.text
        client = await Client.connect(address)
        phase_id = await _running_phase(client, run_id, 120)
        if stop == "ctrl-c":
            # A terminal sends SIGINT to the whole foreground process group.
            os.killpg(process.pid, signal.SIGINT)
        else:
            # `kill PID` and `timeout` send SIGTERM to the command alone.
            process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.wait, 120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert exit_code == (130 if stop == "ctrl-c" else 143), output.text
    assert f"Benchmark {run_id} cancelled" in output.text
    url = Settings(data_dir=tmp_path).effective_database_url
    assert recording.run_status(url, run_id) == "cancelled"

    # The stack is down, so read the run's history from its own database.
    server = EmbeddedTemporal(Settings(data_dir=tmp_path, temporal_port=_free_port()))
    server.ui_port = _free_port()
    client = await Client.connect(await server.start())
    try:
        run = await client.get_workflow_handle(run_id).describe()
        assert run.status == WorkflowExecutionStatus.CANCELED
        # The phase seen running may have completed before the cancellation
        # arrived, and the run was then cancelled in its next phase.
        phase = await client.get_workflow_handle(phase_id).describe()
        assert phase.status in (
            WorkflowExecutionStatus.CANCELED,
            WorkflowExecutionStatus.COMPLETED,
        )
        sampler = await client.get_workflow_handle(f"{run_id}-sampler").describe()
        assert sampler.status == WorkflowExecutionStatus.COMPLETED
        running = [
            w.id async for w in client.list_workflows("ExecutionStatus='Running'")
        ]
        assert running == []
    finally:
        server.stop()


@pytest.mark.timeout(300)
async def test_worker_exit_at_start_fails_at_once(tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    process, output = _start_cli(_RUN, env)
    try:
        started = await output.wait_for(
            r"started worker nexus-sandbox \(pid (\d+)\)", 240
        )
        os.kill(int(started[1]), signal.SIGKILL)
        # Well below the 120 s that the command gives workers to poll.
        exit_code = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = " ".join(output.text.split())
    assert exit_code == 1, text
    assert (
        f"error: worker nexus-sandbox (pid {started[1]}) exited with code -9 "
        "before it polled its queue" in text
    )
    assert str(tmp_path / "logs" / "nexus-sandbox.log") in text


@pytest.mark.timeout(420)
async def test_second_interrupt_leaves_embedded_run(tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    process, output = _start_cli(_RUN, env)
    port = int(env["NEXUS_TEMPORAL_PORT"])
    try:
        run_id = (await output.wait_for(r"Benchmark (benchmark-\S+):", 240))[1]
        client = await Client.connect(f"127.0.0.1:{port}")
        await _running_phase(client, run_id, 120)
        os.killpg(process.pid, signal.SIGINT)
        await output.wait_for(r"Interrupted: cancelling", 60)
        os.killpg(process.pid, signal.SIGINT)
        exit_code = await asyncio.to_thread(process.wait, 120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = " ".join(output.text.split())
    assert exit_code == 130, text
    # The command prints that it is cancelling once the server has recorded
    # the request, so the run ends as cancelled when workers take it.
    assert (
        f"Exited without waiting: the cancellation of benchmark {run_id} was "
        "requested but has not completed" in text
    )
    assert "was not cancelled" not in text
    # The command stopped its server and workers before it exited.
    assert not port_is_open("127.0.0.1", port)
    url = Settings(data_dir=tmp_path).effective_database_url
    assert recording.run_status(url, run_id) == "running"


@pytest.mark.timeout(300)
async def test_interrupt_leaves_external_run(tmp_path: Path) -> None:
    # The "external" server is one of this test's own, so that the sandbox
    # sessions and other workflows that the interrupted run leaves behind
    # cannot reach the workers of later tests on the shared server.
    server = EmbeddedTemporal(
        Settings(data_dir=tmp_path / "external", temporal_port=_free_port())
    )
    server.ui_port = _free_port()
    temporal_address = await server.start()
    process: subprocess.Popen[str] | None = None
    try:
        client = await Client.connect(temporal_address)
        env = _cli_env(tmp_path, NEXUS_TEMPORAL_ADDRESS=temporal_address)
        # The command's own workers run the run, so that nothing in this
        # process waits for its phase activity when the test ends.
        process, output = _start_cli([*_RUN, "--start-workers"], env)
        run_id = (await output.wait_for(r"Benchmark (benchmark-\S+):", 240))[1]
        await _running_phase(client, run_id, 120)

        os.killpg(process.pid, signal.SIGINT)
        exit_code = await asyncio.to_thread(process.wait, 120)
        text = " ".join(output.text.split())
        assert exit_code == 130, text
        assert f"benchmark {run_id} continues on the Temporal server" in text
        assert f"nexus benchmark report {run_id}" in text
        assert f"nexus benchmark cancel {run_id}" in text

        handle = client.get_workflow_handle(run_id)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        url = Settings(data_dir=tmp_path).effective_database_url
        assert recording.run_status(url, run_id) == "running"
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        server.stop()


@pytest.mark.timeout(300)
async def test_stopped_server_leaves_run_open(tmp_path: Path) -> None:
    """A server that stops while the command follows a run on it, as when
    `nexus up` stops, ends the command with one error line: the run stays
    open, with the commands that follow, report or cancel it."""
    server = EmbeddedTemporal(
        Settings(data_dir=tmp_path / "external", temporal_port=_free_port())
    )
    server.ui_port = _free_port()
    temporal_address = await server.start()
    process: subprocess.Popen[str] | None = None
    try:
        client = await Client.connect(temporal_address)
        env = _cli_env(tmp_path, NEXUS_TEMPORAL_ADDRESS=temporal_address)
        process, output = _start_cli([*_RUN, "--start-workers"], env)
        run_id = (await output.wait_for(r"Benchmark (benchmark-\S+):", 240))[1]
        await _running_phase(client, run_id, 120)

        server.stop()
        exit_code = await asyncio.to_thread(process.wait, 120)
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        server.stop()

    text = output.text
    assert exit_code == 1, text
    assert "Traceback" not in text
    # The SDK's coloured WARN line of each retried gRPC call.
    assert "retried" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    assert errors[0] == (
        f"error: the Temporal server at {temporal_address} stopped responding while "
        f"this command followed benchmark {run_id}. The run stays open there and "
        "resumes when the server is back. Follow it with `temporal workflow show "
        f"--follow --workflow-id {run_id} --address {temporal_address} "
        "--namespace default`, write its report again after it ends with "
        f"`nexus benchmark report {run_id}`, or cancel it with "
        f"`nexus benchmark cancel {run_id}`."
    )
    bars = _bar_lines(text)
    assert bars["Run"].startswith("Run still running on the server"), bars
    assert not any(line.endswith(" failed") for line in bars.values()), bars


async def test_run_uses_running_deployment(
    client: Client, shared_settings: Settings
) -> None:
    """With workers already on every queue, `benchmark run` starts none of its
    own; with nothing listening it starts the stack."""
    closed = shared_settings.model_copy(
        update={"temporal_address": f"127.0.0.1:{_free_port()}"}
    )
    assert not await benchmark_cli._deployment_serves(closed)
    async with running_workers(client, shared_settings):
        assert await benchmark_cli._deployment_serves(shared_settings)


@pytest.mark.timeout(300)
async def test_run_on_deployment_takes_no_lock(
    client: Client,
    shared_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the workers of `nexus up` the command starts no server of its own,
    so it holds no lock on the data dir and leaves the reports folder to the
    workers, which write the report."""
    reports = tmp_path / "file" / "reports"
    (tmp_path / "file").write_text("")
    settings = shared_settings.model_copy(
        update={"data_dir": tmp_path, "reports_dir": reports}
    )
    env = _cli_env(tmp_path, NEXUS_TEMPORAL_ADDRESS=settings.effective_temporal_address)
    env["NEXUS_REPORTS_DIR"] = str(reports)
    run = [*_RUN, "--start-workers"]

    def run_command() -> subprocess.CompletedProcess[str]:
        return subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)

    open_id = f"benchmark-open-{uuid.uuid4().hex[:6]}"
    async with running_workers(client, shared_settings):
        # A command that runs its own stack on this data dir holds the lock,
        # and the workers that serve the queues are then that command's.
        with benchmark_cli._embedded_run_lock(settings):
            locked = await asyncio.to_thread(run_command)
        assert locked.returncode == 1, locked.stderr
        assert "another `nexus benchmark run` (process" in locked.stderr

        # A run open on the deployment is named, whatever the reports folder
        # of this command.
        handle = await client.start_workflow(
            "ExtendedDurationBenchmarkWorkflow",
            {"run_id": open_id},
            id=open_id,
            task_queue=f"unpolled-{uuid.uuid4().hex[:6]}",
        )
        try:
            deadline = time.monotonic() + 60
            while open_id not in await benchmark_cli.running_benchmarks(client):
                assert time.monotonic() < deadline, "the run was never listed"
                await asyncio.sleep(0.2)
            rejected = await asyncio.to_thread(run_command)
        finally:
            await handle.terminate("test cleanup")
        output = " ".join(rejected.stderr.split())
        assert rejected.returncode == 1, output
        assert f"error: benchmark run {open_id} is running on the Temporal" in output
        assert f"`nexus benchmark cancel {open_id}`" in output
        assert "reports folder" not in output
        assert "another `nexus benchmark run`" not in output

        # While the run goes on, another command can take the lock. No worker
        # polls the run's queue, so the run itself does nothing.
        monkeypatch.setattr(benchmark_cli, "ORCHESTRATION", f"unpolled-{open_id}")

        async def follow_takes_lock(
            handle: Any, *args: object, **kwargs: object
        ) -> BenchmarkResult:
            try:
                with benchmark_cli._embedded_run_lock(settings):
                    pass
            finally:
                await handle.terminate("test cleanup")
            return _result(cycles=1)

        monkeypatch.setattr(benchmark_cli, "follow", follow_takes_lock)
        finished = await benchmark_cli.run_benchmark(
            settings, BenchmarkConfig(), start_workers=True
        )
        assert finished.stopped_server_history is None


@pytest.mark.timeout(600)
async def test_second_run_refused_and_orphan_cancelled(tmp_path: Path) -> None:
    """A second run on the same data dir is rejected while the first one runs
    its server. A run that a killed command left behind is cancelled by the
    next run there before that one starts."""
    env = _cli_env(tmp_path)
    address = f"127.0.0.1:{env['NEXUS_TEMPORAL_PORT']}"
    first, first_output = _start_cli(_RUN, env)
    later: subprocess.Popen[str] | None = None
    try:
        run_id = (await first_output.wait_for(r"Benchmark (benchmark-\S+):", 240))[1]
        second = await asyncio.to_thread(
            subprocess.run, _RUN, env=env, capture_output=True, text=True, timeout=120
        )
        refusal = " ".join(second.stderr.split())
        assert second.returncode == 1, refusal
        assert "another `nexus benchmark run` (process" in refusal
        assert "Traceback" not in refusal

        client = await Client.connect(address)
        await _running_phase(client, run_id, 120)
        # Killed with its server and workers, the command leaves the run open
        # in the data dir's history.
        os.killpg(first.pid, signal.SIGKILL)
        await asyncio.to_thread(first.wait, 60)
        # Its server, in a session of its own, exits on the SIGTERM that the
        # kernel sends when its parent dies.
        deadline = time.monotonic() + 60
        while port_is_open("127.0.0.1", int(env["NEXUS_TEMPORAL_PORT"])):
            assert time.monotonic() < deadline, "the killed run's server stayed up"
            await asyncio.sleep(0.2)

        later, later_output = _start_cli(_RUN, env)
        await later_output.wait_for(
            f"Benchmark {run_id} was left running .* cancelling it first", 240
        )
        await later_output.wait_for(f"Benchmark {run_id} cancelled", 120)
        new_id = (await later_output.wait_for(r"Benchmark (benchmark-\S+):", 120))[1]
        assert new_id != run_id
        os.killpg(later.pid, signal.SIGINT)
        assert await asyncio.to_thread(later.wait, 120) == 130
    finally:
        for process in (first, later):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    url = Settings(data_dir=tmp_path).effective_database_url
    assert recording.run_status(url, run_id) == "cancelled"
    assert recording.run_status(url, new_id) == "cancelled"


def test_busy_ports_give_one_line_errors(tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["NEXUS_TEMPORAL_UI_PORT"])))
        holder.listen()
        started = time.monotonic()
        done = subprocess.run(
            _RUN, env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"web UI port {env['NEXUS_TEMPORAL_UI_PORT']}" in done.stderr
    assert time.monotonic() - started < 60
    # A closed address given with --no-start-workers fails within seconds.
    closed = {**env, "NEXUS_TEMPORAL_ADDRESS": f"127.0.0.1:{_free_port()}"}
    done = subprocess.run(
        [*_RUN, "--no-start-workers"],
        env=closed,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "cannot reach Temporal at" in done.stderr


def test_ui_port_equal_to_server_port(tmp_path: Path) -> None:
    port = str(_free_port())
    env = {**_cli_env(tmp_path), "NEXUS_TEMPORAL_PORT": port}
    env["NEXUS_TEMPORAL_UI_PORT"] = port
    done = subprocess.run(_RUN, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert f"the web UI port and the Temporal port are both {port}" in errors[0]
    assert "set NEXUS_TEMPORAL_UI_PORT to another free port" in done.stderr
    # The check comes before the server starts.
    assert not (tmp_path / "temporal.db").exists()


def test_server_exit_names_logged_error(tmp_path: Path) -> None:
    server = EmbeddedTemporal(Settings(data_dir=tmp_path))
    server.log_path.write_text(
        "an earlier start's line\n"
        '{"level":"FATAL","message":"listen tcp 127.0.0.1:7233: bind: address '
        'already in use"}\n'
        '{"level":"INFO","message":"stopping"}\n'
    )
    assert server._last_log_error() == (
        "listen tcp 127.0.0.1:7233: bind: address already in use"
    )
    server.log_path.write_text('time=1 level=ERROR msg="no database"\n')
    assert server._last_log_error() == 'time=1 level=ERROR msg="no database"'
    server.log_path.write_text('{"level":"WARN","message":"slow"}\nplain text\n')
    assert server._last_log_error() is None


def test_unwritable_reports_dir_rejected_first(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    reports = blocker / "reports"
    env = {**_cli_env(tmp_path), "NEXUS_REPORTS_DIR": str(reports)}
    started = time.monotonic()
    done = subprocess.run(_RUN, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"the reports folder {reports} is not writable" in done.stderr
    assert "set NEXUS_REPORTS_DIR to a folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    # The check comes before the server, so nothing was started.
    assert not (tmp_path / "temporal.db").exists()
    assert time.monotonic() - started < 30


def _invoke_failed_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cause: BaseException
) -> CliResult:
    """Run `nexus benchmark run` with a run that fails with `cause`."""

    async def failed_run(
        *args: object, started: list[benchmark_cli.StartedRun], **kwargs: object
    ) -> benchmark_cli.FinishedRun:
        started.append(benchmark_cli.StartedRun("benchmark-x", own_server=True))
        raise WorkflowFailureError(cause=cause)

    monkeypatch.setattr(benchmark_cli, "run_benchmark", failed_run)
    environment: dict[str, str | None] = {
        key: None for key in os.environ if key.startswith("NEXUS_")
    }
    environment.update(
        NEXUS_DATA_DIR=str(tmp_path), NEXUS_REPORTS_DIR=str(tmp_path / "reports")
    )
    return CliRunner().invoke(cli, ["benchmark", "run"], env=environment)


def _activity_failure(activity_type: str, cause: ApplicationError) -> ActivityError:
    """The failure of a run's own activity, as the workflow raises it."""
    failure = ActivityError(
        "Activity task failed",
        scheduled_event_id=1,
        started_event_id=2,
        identity="worker",
        activity_type=activity_type,
        activity_id="1",
        retry_state=None,
    )
    failure.__cause__ = cause
    return failure


def test_failed_run_gives_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As the run fails when its report cannot be written.
    cause = _activity_failure(
        "finish_benchmark_run",
        ApplicationError("[Errno 28] No space left on device", type="OSError"),
    )
    done = _invoke_failed_run(monkeypatch, tmp_path, cause)
    assert done.exit_code == 1, done.output
    assert isinstance(done.exception, SystemExit)
    output = " ".join(done.output.split())
    assert (
        "error: benchmark run benchmark-x failed: OSError: [Errno 28] No space "
        "left on device." in output
    )
    assert "`nexus benchmark report benchmark-x`" in output


def test_workers_reports_folder_refusal_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Under `nexus up` the worker checks its own reports folder first.
    cause = _activity_failure(
        "start_benchmark_run",
        ApplicationError(
            "the reports folder /srv/reports is not writable ([Errno 13] "
            "Permission denied); set NEXUS_REPORTS_DIR to a folder that you can "
            "write to",
            type=REPORTS_FOLDER_ERROR,
            non_retryable=True,
        ),
    )
    done = _invoke_failed_run(monkeypatch, tmp_path, cause)
    assert done.exit_code == 1, done.output
    output = " ".join(done.output.split())
    assert output == (
        "error: benchmark run benchmark-x did not start: the reports folder "
        "/srv/reports is not writable ([Errno 13] Permission denied); set "
        "NEXUS_REPORTS_DIR to a folder that you can write to"
    )


def test_run_open_rejection_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A run that started after this command's own check holds the claim.
    cause = _activity_failure(
        "start_benchmark_run",
        ApplicationError(
            "benchmark run nexus-benchmark-run-1 is running on this Temporal "
            "server, and two runs at once would each measure the other's load. "
            "Wait for it to end, or cancel it with `nexus benchmark cancel "
            "nexus-benchmark-run-1`",
            type=RUN_OPEN_ERROR,
            non_retryable=True,
        ),
    )
    done = _invoke_failed_run(monkeypatch, tmp_path, cause)
    assert done.exit_code == 1, done.output
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert done.output.strip() == (
        "error: benchmark run benchmark-x did not start: benchmark run "
        "nexus-benchmark-run-1 is running on this Temporal server, and two runs "
        "at once would each measure the other's load. Wait for it to end, or "
        "cancel it with `nexus benchmark cancel nexus-benchmark-run-1`"
    )


def test_cancelled_run_gives_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    done = _invoke_failed_run(
        monkeypatch, tmp_path, CancelledError("Workflow cancelled")
    )
    assert done.exit_code == 1, done.output
    assert isinstance(done.exception, SystemExit)
    output = " ".join(done.output.split())
    assert "error: benchmark run benchmark-x was cancelled; it has no report" in output


def test_up_busy_http_port(tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["NEXUS_HTTP_PORT"])))
        holder.listen()
        done = subprocess.run(
            [sys.executable, "-m", "app", "up"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert f"the HTTP port {env['NEXUS_HTTP_PORT']} on 127.0.0.1" in done.stderr
    assert "NEXUS_HTTP_PORT" in done.stderr
    # Nothing was started, so no Temporal server listens on its port.
    assert not port_is_open("127.0.0.1", int(env["NEXUS_TEMPORAL_PORT"]))


@pytest.mark.parametrize(
    ("run_id", "origin"),
    [
        ("benchmark-stuck", "by an earlier `nexus benchmark run`"),
        # A schedule's run, left open when `nexus up` stopped.
        ("two-run-2026-12-05T15:52:30Z", "when the server that ran it stopped"),
    ],
)
async def test_orphan_that_ignores_cancel_is_terminated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str, origin: str
) -> None:
    """A run left open on the command's own server that no worker serves
    (as one whose workflow task fails on every attempt) ends by termination
    when its cancellation does not take effect."""
    server = EmbeddedTemporal(Settings(data_dir=tmp_path, temporal_port=_free_port()))
    server.ui_port = _free_port()
    address = await server.start()
    settings = Settings(data_dir=tmp_path, temporal_address=address)
    upgrade(settings.effective_database_url)
    monkeypatch.setattr(benchmark_cli, "ORPHAN_CANCEL_SECONDS", 1.0)
    out = io.StringIO()
    monkeypatch.setattr(benchmark_cli, "console", Console(file=out, width=400))
    try:
        client = await Client.connect(address)
        handle = await client.start_workflow(
            "ExtendedDurationBenchmarkWorkflow",
            {"run_id": run_id},
            id=run_id,
            task_queue="no-worker-polls-this",
        )
        # An execution of its orchestration phase, left open too.
        leftover = await client.start_workflow(
            "FlowNexusWorkflow",
            id=f"left-{run_id}",
            task_queue="no-worker-polls-this",
            search_attributes=search_attributes(
                "definition-left", f"benchmark-orchestration-{run_id}-1"
            ),
        )
        deadline = time.monotonic() + 60
        query = phase_executions_query(run_id)
        while handle.id not in await benchmark_cli.running_benchmarks(client) or not [
            e async for e in client.list_workflows(query)
        ]:
            assert time.monotonic() < deadline, "the run was never listed"
            await asyncio.sleep(0.2)
        # On a server that the command did not start, the run is not its own.
        with pytest.raises(benchmark_cli.BenchmarkStartError):
            await benchmark_cli._check_no_other_run(client, settings, own_server=False)
        await benchmark_cli._check_no_other_run(client, settings, own_server=True)
        described = await handle.describe()
        assert described.status == WorkflowExecutionStatus.TERMINATED
        history = await leftover.fetch_history()
        assert any(
            event.HasField("workflow_execution_cancel_requested_event_attributes")
            for event in history.events
        )
    finally:
        server.stop()
    text = " ".join(out.getvalue().split())
    assert (
        f"Cancelled 1 orchestration execution(s) and destroyed 0 swarm(s) that "
        f"benchmark {run_id} left open." in text
    )
    assert f"Benchmark {run_id} was left running {origin}" in text
    assert "cancelling it first." in text
    assert f"Benchmark {run_id} terminated; it has no report" in text


@pytest.mark.timeout(300)
async def test_cancel_command_and_run_beside_deployment(
    tmp_path: Path, shared_settings: Settings
) -> None:
    server = EmbeddedTemporal(
        Settings(data_dir=tmp_path / "deployment", temporal_port=_free_port())
    )
    server.ui_port = _free_port()
    address = await server.start()
    settings = shared_settings.model_copy(update={"temporal_address": address})
    env = _cli_env(tmp_path, NEXUS_TEMPORAL_ADDRESS=address)
    env["NEXUS_DATABASE_URL"] = settings.effective_database_url
    cancel = [sys.executable, "-m", "app", "benchmark", "cancel"]
    try:
        client = await Client.connect(address)
        run_id = f"test-cancel-{uuid.uuid4().hex[:6]}"
        async with running_workers(client, settings):
            handle = await client.start_workflow(
                "ExtendedDurationBenchmarkWorkflow",
                benchmark_cli.BenchmarkState(
                    run_id=run_id,
                    config=benchmark_cli.build_config(
                        {},
                        duration_seconds=60,
                        cycle_interval_seconds=0,
                        load_multiplier=1,
                        streams=1,
                        epochs=1,
                    ),
                ),
                id=run_id,
                task_queue="nexus-orchestration",
            )
            # The server's list of workflows lags behind their starts.
            deadline = time.monotonic() + 60
            while handle.id not in await benchmark_cli.running_benchmarks(client):
                assert time.monotonic() < deadline, "the run was never listed"
                await asyncio.sleep(0.2)
            url = settings.effective_database_url
            while recording.slot_holder(url) != handle.id:
                assert time.monotonic() < deadline, "the run never claimed the slot"
                await asyncio.sleep(0.2)
            with pytest.raises(benchmark_cli.BenchmarkStartError) as refused:
                await benchmark_cli._check_no_other_run(
                    client, settings, own_server=False
                )
            assert f"benchmark run {handle.id} is running" in str(refused.value)
            unknown = await asyncio.to_thread(
                subprocess.run,
                [*cancel, "no-such-run"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert unknown.returncode == 1
            assert f"the runs open there: {handle.id}" in unknown.stderr
            done = await asyncio.to_thread(
                subprocess.run,
                [*cancel, handle.id],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert f"Benchmark {handle.id} cancelled" in done.stderr
            described = await handle.describe()
            assert described.status == WorkflowExecutionStatus.CANCELED
            assert recording.slot_holder(url) is None
            again = await asyncio.to_thread(
                subprocess.run,
                [*cancel, handle.id],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert again.returncode == 1
            assert "has ended already (status canceled)" in again.stderr
    finally:
        server.stop()
