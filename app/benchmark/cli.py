"""`nexus benchmark run/schedule/report`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import os
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer
from pydantic import ValidationError
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn
from rich.text import Text
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    SchedulePolicy,
    ScheduleSpec,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError
from temporalio.service import RPCError, RPCStatusCode

from app.benchmark.leftovers import end_phase_leftovers
from app.benchmark.report import ReportsFolderError, check_reports_writable
from app.benchmark.runs import running_benchmarks
from app.cli_group import NexusGroup
from app.contracts.benchmark import (
    PHASE_TITLES,
    REPORTS_FOLDER_ERROR,
    RUN_OPEN_ERROR,
    BenchmarkConfig,
    BenchmarkProgress,
    BenchmarkResult,
    BenchmarkState,
)
from app.contracts.queues import ALL_QUEUES, ORCHESTRATION
from app.settings import Settings, environment_variable

if TYPE_CHECKING:
    from app.processes import ManagedProcess

benchmark_cli = typer.Typer(
    cls=NexusGroup,
    help="The extended-duration benchmark: an operator's validation run.",
    no_args_is_help=True,
)
console = Console(stderr=True)

# Bounds of `schedule --every`: runs more often than a minute would mostly be
# skipped as overlapping, and an interval of 999999 days gave a schedule
# without a next run time.
_MIN_EVERY = 60.0
_MAX_EVERY = 365 * 86400.0
_SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(
    text: str, option: str = "--duration", *, allow_zero: bool = False
) -> float:
    """Parse `90s`, `3m`, `2h`, `1d` or plain seconds into seconds.

    Raises:
        typer.BadParameter: the text is not such a duration, or it is zero
            where `allow_zero` is false; the message names `option`.
    """
    match = _DURATION.match(text.strip())
    if match and (allow_zero or float(match.group(1)) > 0):
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    kind = "a duration of 0 or more" if allow_zero else "a positive duration"
    raise typer.BadParameter(
        f"{text!r} is not {kind}; use a number with an optional unit s, m, h "
        "or d, for example 90s, 3m or 2h",
        param_hint=f"'{option}'",
    )


def parse_whole_number(text: str | int) -> int:
    """Parse an option's whole number, such as `--streams 5`. typer passes
    the option's default unparsed, as an int.

    typer 0.29 rejects `--streams 2.5` with pydantic's message alone, which
    names neither the value nor a fix.

    Raises:
        typer.BadParameter: the text is not a whole number.
    """
    if isinstance(text, int):
        return text
    try:
        return int(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a whole number; use a whole number, for example 5"
        ) from None


# The command-line option of each config field that the commands expose.
_OPTIONS = {
    "duration_seconds": "--duration",
    "cycle_interval_seconds": "--interval",
    "load_multiplier": "--load-multiplier",
    "streams": "--streams",
    "epochs": "--epochs",
}


def build_config(typed: dict[str, str], **fields: Any) -> BenchmarkConfig:
    """Build the run's config. `typed` maps a field to the text the operator
    typed, so that an error shows the value as given.

    Raises:
        typer.BadParameter: a field is out of the range BenchmarkConfig allows.
    """
    try:
        return BenchmarkConfig(**fields)
    except ValidationError as error:
        detail = error.errors()[0]
        field = str(detail["loc"][0])
        unit = " seconds" if field.endswith("_seconds") else ""
        bound = str(detail["msg"]).removeprefix("Input should be ")
        raise typer.BadParameter(
            f"{typed.get(field, detail['input'])!r} is out of range: the value "
            f"must be {bound}{unit}; pass a value within that range",
            param_hint=f"'{_OPTIONS.get(field, field)}'",
        ) from None


def web_ui_link(settings: Settings, workflow_id: str) -> str:
    """Return the workflow's page in the embedded server's web UI. For a
    server set by NEXUS_TEMPORAL_ADDRESS, whose web UI this process does not
    know, say where to look instead."""
    if not settings.embedded:
        return (
            f"workflow {workflow_id} in namespace {settings.namespace}, in the "
            f"web UI of the Temporal server at {settings.effective_temporal_address}"
        )
    return (
        f"http://127.0.0.1:{settings.temporal_ui_port}/namespaces/"
        f"{settings.namespace}/workflows/{workflow_id}"
    )


class FinishedRun(NamedTuple):
    run_id: str
    result: BenchmarkResult
    stopped_server_history: Path | None
    """History file of the embedded server that the command started and then
    stopped when the run ended, or None when the server outlives the command."""


# The settings that decide which history `nexus up` serves, and where; the
# HTTP port too, since `nexus up` fails when its port is taken.
_SERVER_SETTINGS = (
    "data_dir",
    "temporal_port",
    "temporal_ui_port",
    "http_port",
    "namespace",
)


def serve_again_command(settings: Settings) -> str:
    """Return the `nexus up` command line that serves the history of an
    embedded server with `settings` again: the program as it was started,
    after the settings that differ from their defaults."""
    words: list[str] = []
    for name in _SERVER_SETTINGS:
        value = getattr(settings, name)
        if value == Settings.model_fields[name].default:
            continue
        if name == "data_dir":
            value = settings.resolved_data_dir
        # The name of a shell assignment must stay unquoted.
        words.append(f"{environment_variable(name)}={shlex.quote(str(value))}")
    program = "nexus"
    if Path(sys.argv[0]).name == "nexus" and "/" in sys.argv[0]:
        # Absolute, so that the command works from any folder.
        program = str(Path(sys.argv[0]).absolute())
    return " ".join([*words, shlex.quote(program), "up"])


def print_web_ui_link(settings: Settings, finished: FinishedRun) -> None:
    """Print the run's web UI link, and when this command's own server has
    stopped, what serves the link again."""
    link = web_ui_link(settings, finished.run_id)
    history = finished.stopped_server_history
    lines = [f"Web UI:  {link}"]
    if history is not None and history.exists():
        lines = [
            f"Web UI:  {link} (works while `{serve_again_command(settings)}` runs)",
            "         The Temporal server that this command started has stopped. "
            f"It kept the run's history in {history}.",
        ]
    elif history is not None:
        lines = [
            f"Web UI:  {link} (not served: the run's history is gone)",
            "         The Temporal server that this command started has stopped, "
            f"and its history file {history} no longer exists.",
        ]
    for line in lines:
        # soft_wrap keeps a link longer than the terminal on one line.
        console.print(line, soft_wrap=True, markup=False)


async def _deployment_serves(settings: Settings) -> bool:
    """Return whether a Temporal server responds at the configured address with
    workers polling every queue, as under `nexus up`."""
    from app.temporal.client import connect
    from app.temporal.devserver import port_is_open

    host, _, port = settings.effective_temporal_address.rpartition(":")
    if not port.isdigit() or not port_is_open(host, int(port)):
        return False
    try:
        # Bounded, because a listener that is not Temporal may never reply.
        client = await asyncio.wait_for(connect(settings), 5.0)
        return await asyncio.wait_for(_every_queue_polled(client, settings), 5.0)
    except Exception:
        return False


async def _every_queue_polled(client: Client, settings: Settings) -> bool:
    return not await _unpolled_queues(client, settings)


async def _unpolled_queues(client: Client, settings: Settings) -> list[str]:
    """Return the queues that no worker polls for activities."""
    from app.services.health import describe_queue

    described = [
        (queue, await describe_queue(client, settings.namespace, queue))
        for queue in ALL_QUEUES
    ]
    return [queue for queue, info in described if not info.activity_pollers]


async def cancel_on_sigterm(run: Coroutine[Any, Any, FinishedRun]) -> FinishedRun:
    """Await `run`, cancelling it on SIGTERM as asyncio.run does on Ctrl-C,
    so that a `kill` or `timeout` ends the run it started instead of leaving
    it to come back with the next start of the workers."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


WORKER_START_SECONDS = 120


async def _wait_for_workers(
    client: Client, settings: Settings, children: Sequence[ManagedProcess] = ()
) -> None:
    """Wait until a worker polls every queue.

    Raises:
        BenchmarkStartError: one of `children` (the workers that this command
            started) exited, or a queue has no poller after
            WORKER_START_SECONDS.
    """
    deadline = time.monotonic() + WORKER_START_SECONDS
    unpolled = list(ALL_QUEUES)
    while time.monotonic() < deadline:
        unpolled = await _unpolled_queues(client, settings)
        if not unpolled:
            return
        for child in children:
            process = child.process
            if process is not None and process.poll() is not None:
                raise BenchmarkStartError(
                    f"{child.name} (pid {process.pid}) exited with code "
                    f"{process.returncode} before it polled its queue; see "
                    f"{child.log_path} for why"
                )
        await asyncio.sleep(0.5)
    raise BenchmarkStartError(
        f"no worker polled the queue(s) {', '.join(unpolled)} within "
        f"{WORKER_START_SECONDS} s; see the worker logs in "
        f"{settings.resolved_data_dir / 'logs'}"
    )


def format_seconds(seconds: float) -> str:
    """Format a duration for a progress bar: `4.2 s`, `3 min 05 s`, `2 h 07 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _phase_mark(name: str, state: BenchmarkProgress) -> str:
    """Return ✅ or ❌ for a phase that ran. As in the report, a phase passed
    only if it passed in every cycle, so the mark names the failed cycles
    unless the only failure is this cycle's."""
    failed = state.failed_cycles.get(name, 0)
    failed_now = not state.completed.get(name, True)
    if failed == 0 and not failed_now:
        return "✅"
    if failed <= 1 and failed_now:
        return "❌"
    return f"❌ failed in {failed} cycle{'s' if failed > 1 else ''}"


_NOT_RUN = "not run"
_STILL_RUNNING = "still running"


class PhaseEnd(NamedTuple):
    """A phase of a cycle that ended, as the command learned of it."""

    cycle: int
    name: str
    ok: bool
    seconds: float | None
    error: str | None


class RecordedPhase(NamedTuple):
    ok: bool
    seconds: float
    error: str | None


def read_recorded_phase(
    url: str, run_id: str, cycle: int, phase: str
) -> RecordedPhase | None:
    """Read the row that the run recorded for a phase of a cycle. Return None
    when there is none or the database cannot be read, since the display
    then shows what the progress query returned."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import col, select

    from app.benchmark.models import BenchmarkPhase
    from app.db import session_scope

    try:
        with session_scope(url) as session:
            row = session.exec(
                select(BenchmarkPhase)
                .where(BenchmarkPhase.run_id == run_id)
                .where(BenchmarkPhase.cycle == cycle)
                .where(BenchmarkPhase.phase == phase)
                .order_by(col(BenchmarkPhase.id).desc())
            ).first()
            if row is None:
                return None
            seconds = (row.ended_at - row.started_at).total_seconds()
            return RecordedPhase(row.ok, seconds, row.error)
    except SQLAlchemyError:
        return None


PhaseLookup = Callable[[int, str], RecordedPhase | None]


class PhaseEnds:
    """Finds the phases that ended since the last poll of the progress query.

    A phase can end between two polls together with its cycle, which then
    continues as new: the last phase nearly always does. The new cycle's
    state has neither the time nor the error of that phase, so they come
    from the row that the run recorded (`lookup`). Without a row, the
    outcome comes from the failed-cycle counts, and the time is unknown.
    """

    def __init__(self, lookup: PhaseLookup | None = None) -> None:
        self.lookup = lookup
        self.reported: set[tuple[int, str]] = set()
        self.cycle: int | None = None
        self.failed: dict[str, int] = {}

    def update(self, state: BenchmarkProgress) -> list[PhaseEnd]:
        ended: list[PhaseEnd] = []
        if self.cycle is not None and state.cycle != self.cycle:
            for name in PHASE_TITLES:
                if (self.cycle, name) in self.reported:
                    continue
                failed = state.failed_cycles.get(name, 0) > self.failed.get(name, 0)
                ended.append(self._ended(self.cycle, name, not failed, None))
        self.cycle = state.cycle
        self.failed = dict(state.failed_cycles)
        for name in PHASE_TITLES:
            if name not in state.completed or (state.cycle, name) in self.reported:
                continue
            times = state.phase_times.get(name)
            seconds = times.seconds if times is not None else None
            ended.append(self._ended(state.cycle, name, state.completed[name], seconds))
        return ended

    def _ended(
        self, cycle: int, name: str, ok: bool, seconds: float | None
    ) -> PhaseEnd:
        self.reported.add((cycle, name))
        recorded = None
        if self.lookup is not None and (seconds is None or not ok):
            recorded = self.lookup(cycle, name)
        if recorded is None:
            return PhaseEnd(cycle, name, ok, seconds, None)
        if seconds is None:
            # The row is this phase's own record, unlike the failed-cycle
            # counts, which a failure of the same phase in a later cycle moves.
            ok, seconds = recorded.ok, recorded.seconds
        return PhaseEnd(cycle, name, ok, seconds, recorded.error)


# A failed phase's error line is cut after this many characters; the report
# has the whole error.
_ERROR_CHARS = 300


def failure_line(end: PhaseEnd) -> str:
    """Return the line that shows why a phase failed: its recorded error's
    first line, or where to find the error when none was recorded yet."""
    title = PHASE_TITLES[end.name]
    error = (end.error or "").strip().splitlines()
    reason = error[0][:_ERROR_CHARS] if error else "its error is in the report"
    return f"Cycle {end.cycle + 1}: {title} failed: {reason}"


class PhaseLines:
    """One printed line per phase as it ends, for output that is not a
    terminal, where rich draws the bars only once, when the run has ended.
    A failed phase gets a second line with its error."""

    def show(self, ended: Sequence[PhaseEnd]) -> None:
        for end in ended:
            mark = "✅" if end.ok else "❌"
            took = f" {format_seconds(end.seconds)}" if end.seconds is not None else ""
            title = PHASE_TITLES[end.name]
            console.print(
                f"Cycle {end.cycle + 1}: {title} {mark}{took}",
                soft_wrap=True,
                markup=False,
            )
            if not end.ok:
                console.print(f"  {failure_line(end)}", soft_wrap=True, markup=False)


class NotedProgress(Progress):
    """A rich progress display with lines of text under its bars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Progress's own __init__ draws the display, which reads the notes.
        self.notes: list[str] = []
        super().__init__(*args, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for note in self.notes:
            yield Text(note)


class PhaseBars:
    """A rich progress bar per phase, and one for the whole run, drawn from
    the results of the `progress` query."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.overall = progress.add_task("Run", total=1.0, status="", elapsed="")
        self.tasks = {
            name: progress.add_task(title, total=1.0, status="waiting", elapsed="")
            for name, title in PHASE_TITLES.items()
        }
        self.running: str | None = None
        self.cycle = 0
        self.statuses = dict.fromkeys(self.tasks, "waiting")

    def update(self, state: BenchmarkProgress, now: datetime) -> None:
        """Show `state`. The running phase is timed against `now`, because the
        query's own times stand still while a phase runs."""
        if state.duration_seconds:
            fraction = min(1.0, state.elapsed_seconds / state.duration_seconds)
            self.progress.update(
                self.overall, completed=fraction, status=f"cycle {state.cycle + 1}"
            )
        # In the same cycle, a running phase that is gone without an outcome
        # was cancelled, and its bar stays running until stop().
        self.running = state.phase
        if state.cycle != self.cycle:
            # A new cycle: reset the bars that still show the last cycle's
            # outcomes, also that of a phase that ended unseen between polls.
            self.cycle = state.cycle
            for name in self.tasks:
                if name not in (state.phase, *state.completed):
                    self._show(name, "waiting", "")
        for name in self.tasks:
            if name == state.phase:
                started = state.phase_started_at
                elapsed = (now - started).total_seconds() if started else 0.0
                self._show(name, "running", format_seconds(max(0.0, elapsed)))
            elif name in state.completed:
                times = state.phase_times.get(name)
                elapsed_text = format_seconds(times.seconds) if times else ""
                self._show(name, _phase_mark(name, state), elapsed_text)

    def _show(self, name: str, status: str, elapsed: str) -> None:
        """Draw a phase's bar: pulsing while it runs, full once it has an
        outcome (✅ or ❌), empty otherwise."""
        running = status == "running"
        self.statuses[name] = status
        # rich pulses the bar of a task that is not started, which fits a
        # phase that has no measure of how far it has got.
        self.progress.reset(
            self.tasks[name],
            start=not running,
            total=1.0,
            completed=1 if status.startswith(("✅", "❌")) else 0,
            status=status,
            elapsed=elapsed,
        )

    def stop(self, how: str) -> None:
        """Show a run that ended without a result (`how`: cancelled,
        terminated, failed or interrupted): the running phase ends with it,
        and a phase still waiting in this cycle did not run."""
        for name, status in self.statuses.items():
            if status == "running":
                self._show(name, how, "")
            elif status == "waiting":
                self._show(name, _NOT_RUN, "")
        self.progress.update(self.overall, status=how)

    def leave(self) -> None:
        """Show a run that goes on after this command stops following it:
        the running phase still runs, and the waiting ones still wait."""
        for name, status in self.statuses.items():
            if status == "running":
                self._show(name, _STILL_RUNNING, "")
        self.progress.update(self.overall, status=f"{_STILL_RUNNING} on the server")

    def finish(self, state: BenchmarkProgress | None, result: BenchmarkResult) -> None:
        """Show every bar as the run left it: each phase of the last cycle
        with its outcome, and a phase that did not run as such."""
        if state is not None:
            self.update(state, datetime.now(UTC))
            for name in self.tasks:
                if name not in state.completed:
                    self._show(name, _NOT_RUN, "")
        cycles = f"{result.cycles} cycle{'s' if result.cycles != 1 else ''}"
        self.progress.update(
            self.overall, completed=1.0, status=f"{cycles}, report written"
        )


def server_unreachable(error: RPCError) -> bool:
    """Return whether `error` means that the server did not respond, as when
    `nexus up` stops, rather than that it rejected the call. A connection
    that breaks in the middle of a call ends it with UNKNOWN and a transport
    error."""
    if error.status == RPCStatusCode.UNKNOWN:
        return "transport error" in error.message or "connect error" in error.message
    return error.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
    )


def _ending(error: BaseException) -> str:
    """Return how a run that gave no result ended, for its bars."""
    cause = error.cause if isinstance(error, WorkflowFailureError) else None
    if isinstance(cause, CancelledError):
        return "cancelled"
    if isinstance(cause, TerminatedError):
        return "terminated"
    return "failed"


async def _query_progress(
    handle: WorkflowHandle[object, BenchmarkResult],
) -> BenchmarkProgress:
    return await handle.query("progress", result_type=BenchmarkProgress)


async def follow(
    handle: WorkflowHandle[object, BenchmarkResult],
    poll_seconds: float = 1.0,
    *,
    interrupt_cancels: bool = True,
    database_url: str | None = None,
) -> BenchmarkResult:
    """Show a progress bar per phase, driven by the workflow's query, and
    once the run ends, every bar in its final state. `interrupt_cancels` is
    true when the caller cancels the run after Ctrl-C or SIGTERM stops this
    function, and false when the run goes on. Under the bars, a line per
    failed phase shows its error, read with its time from the phase rows in
    `database_url`."""
    columns = (
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TextColumn("{task.fields[elapsed]}"),
    )
    started = time.monotonic()
    lookup = (
        functools.partial(read_recorded_phase, database_url, handle.id)
        if database_url is not None
        else None
    )
    ends = PhaseEnds(lookup)
    lines = None if console.is_terminal else PhaseLines()

    def show_ended(state: BenchmarkProgress) -> None:
        ended = ends.update(state)
        if lines is not None:
            lines.show(ended)
        progress.notes += [failure_line(end) for end in ended if not end.ok]

    with NotedProgress(*columns, console=console) as progress:
        bars = PhaseBars(progress)
        result_task = asyncio.create_task(handle.result())
        try:
            while not result_task.done():
                try:
                    state: BenchmarkProgress | None = await _query_progress(handle)
                except Exception:  # the run is between continue-as-new runs
                    state = None
                if state is not None:
                    bars.update(state, datetime.now(UTC))
                    show_ended(state)
                progress.update(
                    bars.overall,
                    elapsed=format_seconds(time.monotonic() - started),
                )
                await asyncio.wait({result_task}, timeout=poll_seconds)
        except BaseException:  # Ctrl-C or SIGTERM
            if interrupt_cancels:
                bars.stop("interrupted")
            else:
                bars.leave()
            raise
        finally:
            # An interrupt leaves the result poll behind otherwise.
            result_task.cancel()
        try:
            result = result_task.result()
        except BaseException as error:
            if isinstance(error, RPCError) and server_unreachable(error):
                # The server is gone, not the run, which resumes when it is back.
                bars.leave()
            else:
                bars.stop(_ending(error))
            raise
        # The last poll may predate the last phase's end. A closed workflow
        # still returns query results while a worker polls its queue.
        try:
            final: BenchmarkProgress | None = await _query_progress(handle)
        except Exception as error:
            final = None
            console.print(f"Could not read the phases' final outcomes: {error}")
        bars.finish(final, result)
        if final is not None:
            show_ended(final)
        progress.update(
            bars.overall, elapsed=format_seconds(time.monotonic() - started)
        )
        return result


async def cancel_run(
    handle: WorkflowHandle[Any, Any],
    timeout: float = 60.0,
    *,
    announce: bool = True,
    completed: list[BenchmarkResult] | None = None,
    started: StartedRun | None = None,
) -> bool:
    """Cancel the run and wait for it to end, so that the run, its sampler and
    its phase workflows are closed before the embedded server stops. Without
    that, the next embedded start resumes the run beside the new one. Return
    whether it ended within `timeout`; a run that completed all the same
    adds its result to `completed`. `started.cancel_requested` is set once
    the server has recorded the request."""
    run_id = handle.id
    await handle.cancel()
    if started is not None:
        started.cancel_requested = True
    if announce:
        console.print(
            f"Interrupted: cancelling benchmark {run_id} (a second Ctrl-C or "
            "SIGTERM exits without waiting)",
            soft_wrap=True,
            markup=False,
        )
    try:
        result = await asyncio.wait_for(handle.result(), timeout)
    except TimeoutError:
        console.print(
            f"Benchmark {run_id} was asked to cancel but had not ended after "
            f"{timeout:.0f} s; it ends once a worker takes the cancellation"
        )
        return False
    except WorkflowFailureError as error:
        if isinstance(error.cause, CancelledError):
            console.print(f"Benchmark {run_id} cancelled; it has no report")
        else:
            console.print(f"Benchmark {run_id} failed: {error.cause or error}")
    else:
        # The cancellation came while the report was written, which finishes.
        console.print(
            f"Benchmark {run_id} completed before the cancellation took effect; "
            f"report: {result.report.markdown_path}"
        )
        if completed is not None:
            completed.append(result)
    return True


def print_left_running(settings: Settings, run: StartedRun) -> None:
    """Say what becomes of a run on this command's own server that a second
    Ctrl-C left without waiting for its cancellation."""
    run_id = run.run_id
    data_dir = settings.resolved_data_dir
    if run.cancel_requested:
        message = (
            f"Exited without waiting: the cancellation of benchmark {run_id} was "
            f"requested but has not completed. The run stays open in the history "
            f"of {data_dir} and ends as cancelled once workers process the "
            "request: under `nexus up`, or when the next `nexus benchmark run` "
            "there starts."
        )
    else:
        message = (
            f"Exited without waiting: benchmark {run_id} was not cancelled and "
            f"stays open in the history of {data_dir}. The next `nexus benchmark "
            "run` there cancels it first; under `nexus up` it runs on until "
            f"`nexus benchmark cancel {run_id}`."
        )
    console.print(message, soft_wrap=True, markup=False)


def run_commands(settings: Settings, run_id: str) -> str:
    """Return the sentence that names the commands to follow, report or
    cancel a run on the configured server."""
    address = settings.effective_temporal_address
    server = f"--address {address} --namespace {settings.namespace}"
    return (
        f"Follow it with `temporal workflow show --follow --workflow-id {run_id} "
        f"{server}`, write its report again after it ends with `nexus benchmark "
        f"report {run_id}`, or cancel it with `nexus benchmark cancel {run_id}`."
    )


def server_lost_message(settings: Settings, run_id: str, own_server: bool) -> str:
    """Return the error message for a run whose server stopped responding
    while this command followed it."""
    address = settings.effective_temporal_address
    if own_server:
        return (
            f"the Temporal server at {address} that this command started stopped "
            f"responding. Benchmark {run_id} stays open in the history of "
            f"{settings.resolved_data_dir}: the next `nexus benchmark run` there "
            f"cancels it first, and under `nexus up` it resumes until `nexus "
            f"benchmark cancel {run_id}`."
        )
    return (
        f"the Temporal server at {address} stopped responding while this command "
        f"followed benchmark {run_id}. The run stays open there and resumes when "
        f"the server is back. {run_commands(settings, run_id)}"
    )


def print_run_continues(settings: Settings, run_id: str) -> None:
    """Tell how to follow, report or cancel a run left on a server that this
    command did not start."""
    address = settings.effective_temporal_address
    console.print(
        f"Interrupted: benchmark {run_id} continues on the Temporal server at "
        f"{address}. {run_commands(settings, run_id)}",
        # Unwrapped and unstyled, so that the commands paste whole.
        soft_wrap=True,
        markup=False,
    )


class BenchmarkStartError(RuntimeError):
    """Error raised when a run cannot start, with the reason and the fix."""


class ServerLostError(RuntimeError):
    """Error raised when the server of a started run stops responding. Its
    message states what becomes of the run."""


def check_reports_dir(settings: Settings) -> None:
    """Raise BenchmarkStartError unless this command's reports folder takes a
    file. The command checks before it starts the workers that it runs with
    these settings. A run on `nexus up` is checked by its worker instead, as
    the run's first step (`start_benchmark_run`)."""
    try:
        check_reports_writable(settings)
    except ReportsFolderError as error:
        raise BenchmarkStartError(str(error)) from None


def _root_cause(error: BaseException) -> BaseException:
    """Return the innermost cause of a Temporal failure chain."""
    while getattr(error, "cause", None) is not None:
        error = error.cause  # type: ignore[attr-defined]
    return error


@dataclasses.dataclass
class StartedRun:
    """A run that this command started, as an interrupt leaves it."""

    run_id: str
    own_server: bool
    ended: bool = False
    cancel_requested: bool = False


@contextlib.contextmanager
def _embedded_run_lock(settings: Settings) -> Iterator[Path]:
    """Hold the data dir's benchmark lock while this command runs a server of
    its own there. Another `benchmark run` on the same data dir would reuse
    that server and die when this command stops it at its end."""
    path = settings.resolved_data_dir / "benchmark-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
            raise BenchmarkStartError(
                f"another `nexus benchmark run` ({holder or 'starting'}) runs on "
                f"the embedded server of {settings.resolved_data_dir}, and stops "
                "that server when it ends; wait for it, or give this run its own "
                "NEXUS_DATA_DIR and ports"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"process {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # which releases the lock


# Seconds that the workers have to stop after a second Ctrl-C, before they
# are killed.
LEAVING_STOP_SECONDS = 3.0

# Seconds that a run left open on this command's own server has to end after
# its cancellation, before it is terminated.
ORPHAN_CANCEL_SECONDS = 60.0


async def _check_no_other_run(
    client: Client, settings: Settings, own_server: bool
) -> None:
    """Raise BenchmarkStartError when a benchmark runs on the server, because
    each run would measure the other's load as its own.

    On a server that this command started, an open run was left there by a
    server that stopped before the run ended: an earlier `benchmark run`
    that was killed or interrupted twice, or `nexus up` while a scheduled
    run ran. No command follows such a run, and it would keep every run on
    this data dir from starting until `nexus up` serves it again, so it is
    cancelled first, with what its orchestration phase left open."""
    address = settings.effective_temporal_address
    running = await running_benchmarks(client)
    if own_server:
        for run_id in running:
            if run_id.startswith("benchmark-"):
                origin = (
                    "by an earlier `nexus benchmark run` that ended without "
                    "waiting for it"
                )
            else:
                origin = (
                    "when the server that ran it stopped, as a scheduled run "
                    "is when `nexus up` stops"
                )
            console.print(
                f"Benchmark {run_id} was left running {origin}; cancelling it first.",
                soft_wrap=True,
                markup=False,
            )
            handle = client.get_workflow_handle(run_id)
            if not await cancel_run(handle, ORPHAN_CANCEL_SECONDS, announce=False):
                # No command follows it, and a run whose workflow task fails
                # on every attempt never takes a cancellation.
                await handle.terminate(
                    reason="left open when its server stopped, and did not end "
                    "when cancelled"
                )
                console.print(f"Benchmark {run_id} terminated; it has no report")
            executions, swarms = await end_phase_leftovers(client, settings, run_id)
            if executions or swarms:
                console.print(
                    f"Cancelled {len(executions)} orchestration execution(s) and "
                    f"destroyed {len(swarms)} swarm(s) that benchmark {run_id} "
                    "left open.",
                    soft_wrap=True,
                    markup=False,
                )
        running = await running_benchmarks(client)
    if running:
        raise BenchmarkStartError(
            f"benchmark run {', '.join(running)} is running on the Temporal server "
            f"at {address}; two runs at once would each measure the other's load. "
            f"Wait for it to end, or cancel it with `nexus benchmark cancel "
            f"{running[0]}`"
        )


async def run_benchmark(
    settings: Settings,
    config: BenchmarkConfig,
    *,
    start_workers: bool,
    started: list[StartedRun] | None = None,
) -> FinishedRun:
    """Start a run and follow it to its end. Once it has started, it is
    appended to `started`."""
    with contextlib.ExitStack() as scope:
        if start_workers:
            start_workers = await _prepare_own_workers(settings, scope)
        return await _run_benchmark(
            settings, config, start_workers=start_workers, started=started
        )


async def _prepare_own_workers(settings: Settings, scope: contextlib.ExitStack) -> bool:
    """Decide whether this command starts its own server and workers, and
    return that decision. Before it starts them, check the reports folder
    and take the data dir's lock in `scope`.

    The lock is held only by a command that runs a stack of its own, so on
    a server that serves every queue, a held lock means that the server is
    that command's, and not one of `nexus up`.

    Raises:
        BenchmarkStartError: the reports folder is not writable, or another
            command runs its own stack on this data dir.
    """
    if not await _deployment_serves(settings):
        check_reports_dir(settings)
        scope.enter_context(_embedded_run_lock(settings))
        return True
    with _embedded_run_lock(settings):
        pass
    # A second set of workers would poll the same queues, and the sampler
    # would then measure whichever process took its probe.
    console.print(
        "Using the workers of the deployment already serving at "
        f"{settings.effective_temporal_address} (`nexus up`).",
        soft_wrap=True,
        markup=False,
    )
    return False


async def _run_benchmark(
    settings: Settings,
    config: BenchmarkConfig,
    *,
    start_workers: bool,
    started: list[StartedRun] | None,
) -> FinishedRun:
    from app.supervisor import STOP_SECONDS, Stack
    from app.temporal.client import connect, quiet_runtime

    stack: Stack | None = None
    leaving = False  # between a first and a second Ctrl-C
    # The settings below get the address of the server that the stack
    # started, and then no longer mark it as the embedded server whose web
    # UI port is known. So the link uses these.
    link_settings = settings
    if start_workers:
        # The benchmark calls the tools through the workers; the HTTP
        # server would only take a port and print where its key is.
        stack = Stack(settings, serve_api=False)
        try:
            address = await asyncio.to_thread(stack.start)
        except BaseException:
            await asyncio.to_thread(stack.stop)
            raise
        settings = settings.model_copy(update={"temporal_address": address})
    server = stack.server if stack is not None else None
    started_server = server is not None and not server.reused
    try:
        # A server that this command did not start is up already, or absent.
        client = await connect(
            settings, wait_seconds=30 if stack else 3, runtime=quiet_runtime()
        )
        await _wait_for_workers(
            client, settings, stack.children if stack is not None else ()
        )
        await _check_no_other_run(client, settings, started_server)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        run_id = f"benchmark-{stamp}-{uuid.uuid4().hex[:6]}"
        handle = await client.start_workflow(
            "ExtendedDurationBenchmarkWorkflow",
            BenchmarkState(run_id=run_id, config=config),
            id=run_id,
            task_queue=ORCHESTRATION,
            result_type=BenchmarkResult,
        )
        this_run = StartedRun(run_id, started_server)
        if started is not None:
            started.append(this_run)
        console.print(
            f"Benchmark {run_id}: {web_ui_link(link_settings, run_id)}",
            soft_wrap=True,
            markup=False,
        )
        try:
            result = await follow(
                handle,
                interrupt_cancels=started_server,
                database_url=settings.effective_database_url,
            )
        except asyncio.CancelledError:
            # asyncio.run cancels this task on the first Ctrl-C, and raises
            # KeyboardInterrupt at once on the second.
            if not started_server:
                print_run_continues(settings, run_id)
                raise
            leaving = True
            completed: list[BenchmarkResult] = []
            this_run.ended = await cancel_run(
                handle, completed=completed, started=this_run
            )
            leaving = False
            if not completed:
                raise
            # It completed with its report, so the command ends as a run
            # that completed does, with its summary and exit status.
            result = completed[0]
        except RPCError as error:
            if not server_unreachable(error):
                raise
            raise ServerLostError(
                server_lost_message(settings, run_id, started_server)
            ) from None
    finally:
        if stack is not None:
            # After a second Ctrl-C the run is left open anyway, and the next
            # run on this data dir cancels it with what it left, so the
            # workers get a few seconds rather than the time to drain.
            await asyncio.to_thread(
                stack.stop, LEAVING_STOP_SECONDS if leaving else STOP_SECONDS
            )
    history = server.db_path if server is not None and started_server else None
    return FinishedRun(run_id, result, history)


@benchmark_cli.command("run")
def run_command(
    duration: Annotated[
        str, typer.Option(help="How long to keep starting cycles: 90s, 3m, 2h.")
    ] = "3m",
    interval: Annotated[str, typer.Option(help="Pause between cycles.")] = "0s",
    load_multiplier: Annotated[
        int,
        typer.Option(help="Scaled load / baseline.", parser=parse_whole_number),
    ] = 10,
    streams: Annotated[
        int, typer.Option(help="Realtime subscriptions.", parser=parse_whole_number)
    ] = 5,
    epochs: Annotated[
        int,
        typer.Option(help="Training epochs per cycle.", parser=parse_whole_number),
    ] = 3,
    start_workers: Annotated[
        bool | None,
        typer.Option(
            help="Start the embedded server and workers for the run "
            "(default: yes unless NEXUS_TEMPORAL_ADDRESS is set)."
        ),
    ] = None,
) -> None:
    """Run the benchmark, show progress per phase, then print the report path
    and the run's web UI link."""
    from app.cli import load_settings

    config = build_config(
        {"duration_seconds": duration, "cycle_interval_seconds": interval},
        duration_seconds=parse_duration(duration),
        cycle_interval_seconds=parse_duration(interval, "--interval", allow_zero=True),
        load_multiplier=load_multiplier,
        streams=streams,
        epochs=epochs,
    )
    from app.temporal.devserver import EmbeddedServerError

    settings = load_settings()
    workers = settings.embedded if start_workers is None else start_workers
    started: list[StartedRun] = []
    try:
        finished = asyncio.run(
            cancel_on_sigterm(
                run_benchmark(settings, config, start_workers=workers, started=started)
            )
        )
    except KeyboardInterrupt:
        if started and started[0].own_server and not started[0].ended:
            # On another server the first Ctrl-C printed that the run goes on.
            print_left_running(settings, started[0])
        raise typer.Exit(130) from None
    except asyncio.CancelledError:  # SIGTERM
        raise typer.Exit(128 + signal.SIGTERM) from None
    except (BenchmarkStartError, EmbeddedServerError, ServerLostError) as error:
        console.print(f"error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    except WorkflowFailureError as error:
        # The phases record their own failures, so this is the run's own
        # step, such as the report, which cannot be written to a full disk.
        run_id = started[0].run_id if started else "?"
        cause = _root_cause(error)
        if isinstance(error.cause, CancelledError):
            # By `nexus benchmark cancel` from another shell.
            message = f"benchmark run {run_id} was cancelled; it has no report"
        elif isinstance(cause, ApplicationError) and cause.type in (
            REPORTS_FOLDER_ERROR,
            RUN_OPEN_ERROR,
        ):
            # The run's first step rejected it before any cycle ran: the
            # workers' reports folder, or another run that started since
            # this command's own check.
            message = f"benchmark run {run_id} did not start: {cause.message}"
        else:
            message = (
                f"benchmark run {run_id} failed: {cause}. Its "
                "cycles are recorded; once the cause is fixed, write its report "
                f"with `nexus benchmark report {run_id}`"
            )
        console.print(f"error: {message}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    except RuntimeError as error:
        # connect() and the wait for workers: the message names the address.
        if started:
            raise
        console.print(f"error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    result = finished.result
    report = result.report
    console.print(f"Report:  {report.markdown_path}", soft_wrap=True, markup=False)
    print_web_ui_link(settings, finished)
    console.print(
        f"Cycles: {result.cycles}; success rate {report.success_rate}%; "
        f"all phases passed: {report.all_phases_passed}"
    )
    if not report.all_phases_passed:
        raise typer.Exit(1)


def check_run_id(run_id: str) -> None:
    """Raise a usage error for an empty or blank RUN_ID, before any lookup.

    Raises:
        typer.BadParameter: `run_id` is empty or only whitespace.
    """
    if not run_id.strip():
        raise typer.BadParameter(
            f"{run_id!r} is not a run id; use a run id that `nexus benchmark "
            "run` printed, such as benchmark-20261204T100824-65a797",
            param_hint="'RUN_ID'",
        )


@benchmark_cli.command("cancel")
def cancel_command(
    run_id: Annotated[
        str,
        typer.Argument(metavar="RUN_ID", help="Run id, as `benchmark run` printed."),
    ],
) -> None:
    """Cancel a running benchmark on the configured Temporal server (under
    `nexus up`) and wait up to a minute for it to end. A cancelled run has no
    report."""

    from app.cli import load_settings
    from app.temporal.client import connect

    # The server would reject the request with "WorkflowId is not set".
    check_run_id(run_id)
    settings = load_settings()

    async def cancel() -> bool:
        client = await connect(settings, wait_seconds=3)
        handle = client.get_workflow_handle(run_id)
        try:
            description = await handle.describe()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            raise BenchmarkStartError(
                f"no run {run_id!r} on the Temporal server at "
                f"{settings.effective_temporal_address}; the runs open there: "
                f"{', '.join(await running_benchmarks(client)) or 'none'}"
            ) from None
        if description.workflow_type != "ExtendedDurationBenchmarkWorkflow":
            raise BenchmarkStartError(
                f"{run_id!r} is a {description.workflow_type}, not a benchmark run"
            )
        if description.status != WorkflowExecutionStatus.RUNNING:
            status = description.status.name.lower() if description.status else "?"
            raise BenchmarkStartError(
                f"benchmark run {run_id!r} has ended already (status {status})"
            )
        return await cancel_run(handle, announce=False)

    try:
        ended = asyncio.run(cancel())
    except (BenchmarkStartError, RuntimeError) as error:
        console.print(f"error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    if not ended:
        # cancel_run has printed why. A script that starts the next run after
        # this command would otherwise find this one still open.
        raise typer.Exit(1)


# How late a scheduled run may still start, after the server was down.
SCHEDULE_CATCHUP = timedelta(minutes=1)


async def create_schedule(
    client: Client, schedule_id: str, every_seconds: float, config: BenchmarkConfig
) -> None:
    """Create a Temporal Schedule that starts a benchmark run every interval."""
    config = config.model_copy(update={"schedule_id": schedule_id})
    await client.create_schedule(
        schedule_id,
        Schedule(
            action=ScheduleActionStartWorkflow(
                "ExtendedDurationBenchmarkWorkflow",
                BenchmarkState(run_id="", config=config),
                id=f"{schedule_id}-run",
                task_queue=ORCHESTRATION,
            ),
            spec=ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=every_seconds))]
            ),
            # A run due while the server was down is skipped, not started
            # when it comes back (the SDK's default window is a year).
            policy=SchedulePolicy(catchup_window=SCHEDULE_CATCHUP),
        ),
    )


@benchmark_cli.command("schedule")
def schedule_command(
    every: Annotated[str, typer.Option(help="Interval between runs: 6h.")] = "6h",
    duration: Annotated[str, typer.Option(help="Duration of each run: 2h.")] = "2h",
    schedule_id: Annotated[
        str, typer.Option("--id", help="Temporal Schedule id.")
    ] = "nexus-benchmark",
) -> None:
    """Create a Temporal Schedule that runs the benchmark (pause and trigger it
    with `temporal schedule`)."""
    from app.cli import load_settings, print_json
    from app.temporal.client import connect

    every_seconds = parse_duration(every, "--every")
    if not _MIN_EVERY <= every_seconds <= _MAX_EVERY:
        raise typer.BadParameter(
            f"{every!r} is outside 1m to 365d; a schedule starts a run every "
            "--every, so pass a value in that range, for example 6h",
            param_hint="'--every'",
        )
    if not _SCHEDULE_ID.fullmatch(schedule_id):
        raise typer.BadParameter(
            f"{schedule_id!r} is not a schedule id; use a name of 1 to 100 "
            "letters, digits, '.', '_' or '-' that starts with a letter or digit "
            "(run ids and report folders are made from it)",
            param_hint="'--id'",
        )
    config = build_config(
        {"duration_seconds": duration},
        duration_seconds=parse_duration(duration),
        schedule_id=schedule_id,
    )
    if config.duration_seconds >= every_seconds:
        # Each run would still be open when the next is due, and the next
        # would be skipped (one benchmark run at a time).
        raise typer.BadParameter(
            f"{duration!r} is not shorter than --every {every!r}, so every "
            "other run would be skipped while the one before runs; pass a "
            "value shorter than --every, for example half of it",
            param_hint="'--duration'",
        )
    settings = load_settings()

    async def create() -> None:
        client = await connect(settings)
        await create_schedule(client, schedule_id, every_seconds, config)

    try:
        asyncio.run(create())
    except RuntimeError as error:  # no Temporal server; the message names it
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except ScheduleAlreadyRunningError:
        # Without --address and --namespace, the temporal CLI deletes on
        # localhost:7233, which may be another deployment's server.
        typer.echo(
            f"error: a schedule with id {schedule_id!r} already exists; pass "
            "another --id, or delete it with `temporal schedule delete "
            f"--schedule-id {schedule_id} --address "
            f"{settings.effective_temporal_address} --namespace "
            f"{settings.namespace}`",
            err=True,
        )
        raise typer.Exit(1) from None
    print_json(
        {
            "schedule_id": schedule_id,
            "every_seconds": every_seconds,
            "config": config.model_dump(),
        }
    )


def unknown_run_lines(settings: Settings, run_id: str) -> list[str]:
    """Return the error lines for a run id that `benchmark_runs` does not
    contain. They name the database that was read and list its most recent
    runs, since the intended run may be among them."""
    from app.benchmark import recording

    database = settings.masked()["database_url"]
    runs = recording.recent_runs(settings.effective_database_url, limit=5)
    if not runs:
        return [
            f"error: benchmark run {run_id!r} not found: the database {database} "
            "has no benchmark runs. Start one with `nexus benchmark run`, or set "
            "NEXUS_DATA_DIR or NEXUS_DATABASE_URL to the deployment that ran it."
        ]
    width = max(len(run.run_id) for run in runs)
    lines = [
        f"error: benchmark run {run_id!r} not found in the database {database}. "
        f"Its {len(runs)} most recent runs, newest first:"
    ]
    for run in runs:
        started = run.started_at.isoformat(timespec="seconds")
        lines.append(f"  {run.run_id:{width}}  {run.status:9}  started {started}")
    return lines


@benchmark_cli.command("report")
def report_command(
    run_id: Annotated[
        str,
        typer.Argument(metavar="RUN_ID", help="Run id, as `benchmark run` printed."),
    ],
) -> None:
    """Write the report of a finished run again, keeping the system health
    recorded as it ended."""
    from app.benchmark import recording
    from app.benchmark.report import (
        build_metrics,
        recorded_health,
        run_summary,
        save_report,
    )
    from app.cli import load_settings, print_json
    from app.services.health import system_health
    from app.temporal.client import connect

    check_run_id(run_id)
    settings = load_settings()
    try:
        status = recording.run_status(settings.effective_database_url, run_id)
    except LookupError:
        typer.echo("\n".join(unknown_run_lines(settings, run_id)), err=True)
        raise typer.Exit(1) from None
    if status == "cancelled":
        typer.echo(
            f"error: benchmark run {run_id!r} was cancelled before its duration "
            "ended, so it has no report; start a new run with `nexus benchmark run`",
            err=True,
        )
        raise typer.Exit(1)
    if status not in ("completed", "ended"):
        # A report of a run in progress would show its first phases as the
        # whole run, with an end time of now and a verdict on partial data.
        typer.echo(
            f"error: benchmark run {run_id!r} has not finished (status "
            f"{status!r}), so it has no final figures yet. The run writes its "
            "report when it ends; run this command again after that.",
            err=True,
        )
        raise typer.Exit(1)

    async def health() -> dict[str, object]:
        try:
            client = await connect(settings)
        except RuntimeError:
            report = await system_health(settings, None)
        else:
            report = await system_health(settings, client)
        return report.model_dump(mode="json", by_alias=True)

    # The health read as the run ended stays; a health read now would show
    # this command's process and the deployment as it is today.
    recorded = recorded_health(settings, run_id)
    final_health: dict[str, Any]
    note: str | None
    if recorded is None:
        final_health = asyncio.run(health())
        note = (
            "Read when this report was written again, after the run: the "
            "health recorded at the end of the run was not found."
        )
    else:
        final_health, note = recorded
    try:
        metrics = build_metrics(settings, run_id, final_health, health_note=note)
        result = save_report(settings, metrics)
    except LookupError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except OSError as error:
        typer.echo(
            f"error: the report of benchmark run {run_id!r} could not be written: "
            f"{error}; set {environment_variable('reports_dir')} to a folder that "
            "you can write to, or free space there, and run this command again",
            err=True,
        )
        raise typer.Exit(1) from None
    if status == "ended" and not metrics["workflow_closed"]:
        # Its own report write failed, so the run is completed only now. A
        # run whose workflow closed early stays `ended`, so that no later
        # run compares itself with its partial figures.
        recording.complete_run(
            settings.effective_database_url, run_id, run_summary(metrics)
        )
    print_json(result.model_dump())
