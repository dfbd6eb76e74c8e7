"""The benchmark report: metrics.json first, then Markdown and PNG plots made
only from it, so every figure in the report is a measured value."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.benchmark.recording import WORKFLOW_CLOSED, as_utc, load_run
from app.benchmark.stats import Regression, linear_regression, percentile
from app.contracts.benchmark import ALL_PHASES, PHASE_TITLES, ReportResult
from app.settings import Settings, environment_variable
from app.storage import StorageError, storage_for

REPORT_BUCKET = "benchmark-reports"
# Every "MB" in metrics.json, report.md and bench.soak is 10**6 bytes. Until
# 2026-12-05 it was 2**20 bytes (a MiB), and summaries of runs written then
# have no `mb_bytes` field.
MB = 1_000_000
# A worker's growth is shown only when fitted over this many samples. A
# worker that started late (a restart) can have 4 samples over seconds, and
# their slope does not measure steady growth.
MIN_FIT_SAMPLES = 10
# The plots that render_plots writes beside report.md, which links them.
MEMORY_PLOT = "memory.png"
LATENCY_PLOT = "latency.png"
THROUGHPUT_PLOT = "throughput.png"
_UNSAFE_IN_FOLDER_NAME = re.compile(r"[^A-Za-z0-9._-]")


class ReportsFolderError(OSError):
    """The reports folder cannot take a file."""


def check_reports_writable(settings: Settings, *, workers: bool = False) -> None:
    """Raise ReportsFolderError unless a file can be created in the reports
    folder. Reports are written after the last cycle, which can be hours
    after the start, so a run checks first. `workers` marks the folder
    as a worker's, whose settings come from the environment that started it
    (`nexus up`), not from the command that started the run."""
    folder = settings.reports_dir.expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        variable = environment_variable("reports_dir")
        fix = (
            f"set {variable} in the environment of `nexus up` (or of the worker "
            "processes) to a folder that they can write to, and restart them"
            if workers
            else f"set {variable} to a folder that you can write to"
        )
        raise ReportsFolderError(
            f"the workers' reports folder {folder} is not writable ({error}); {fix}"
            if workers
            else f"the reports folder {folder} is not writable ({error}); {fix}"
        ) from None


def run_folder_name(run_id: str) -> str:
    """Return the folder name of a run's files: its report folder, and its
    prefix in the report and checkpoint buckets. It is the run id with each
    character other than a letter, digit, `.`, `_` or `-` replaced by `-`,
    and a leading `.` by `_`.

    A scheduled run's id ends in the time the schedule started it, such as
    `nexus-benchmark-run-2026-12-05T07:01:00Z`, and a colon in a path breaks
    scp and rsync `host:path` arguments, Windows and some archivers.

    NOTE: two run ids that differ only in replaced characters share a folder.
    """
    name = _UNSAFE_IN_FOLDER_NAME.sub("-", run_id)
    if name.startswith("."):
        # A hidden folder, or `..`, which is the parent folder.
        name = "_" + name[1:]
    return name or "_"


def _round(value: float, digits: int = 3) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, digits)


def growth_fit(minutes: list[float], values_mb: list[float]) -> dict[str, Any]:
    """Least-squares growth in MB/min of `values_mb` over `minutes`, with the
    plain and the autocorrelation-adjusted 95% intervals (None when fewer
    than two samples or one instant)."""
    entry: dict[str, Any] = {
        "samples": len(values_mb),
        "growth_mb_per_min": None,
        "ci95_mb_per_min": None,
        "adjusted_ci95_mb_per_min": None,
        "effective_samples": None,
        "r_squared": None,
    }
    try:
        fit: Regression = linear_regression(minutes, values_mb)
    except ValueError:
        return entry
    entry["growth_mb_per_min"] = _round(fit.slope, 5)
    entry["ci95_mb_per_min"] = [_round(fit.ci95_low, 5), _round(fit.ci95_high, 5)]
    entry["adjusted_ci95_mb_per_min"] = [
        _round(fit.adjusted_ci95_low, 5),
        _round(fit.adjusted_ci95_high, 5),
    ]
    entry["effective_samples"] = _round(fit.effective_samples, 1)
    entry["r_squared"] = _round(fit.r_squared)
    return entry


def memory_growth(
    samples: list[Any], warmup_minutes: float = 0.0
) -> list[dict[str, Any]]:
    """Fit RSS, and where sampled the malloc heap (`heap`) and the Python heap
    (`python_heap`), in MB against minutes since the run's first sample, per
    worker: over the whole run, and over the samples taken `warmup_minutes`
    or more after that first sample."""
    if not samples:
        return []
    origin = min(as_utc(s.taken_at) for s in samples)
    by_worker: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for sample in samples:
        by_worker[(sample.task_queue, sample.pid)].append(sample)
    workers: list[dict[str, Any]] = []
    for (queue, pid), series in sorted(by_worker.items()):
        minutes = [(as_utc(s.taken_at) - origin).total_seconds() / 60 for s in series]
        rss_mb = [s.rss / MB for s in series]
        whole = growth_fit(minutes, rss_mb)
        entry: dict[str, Any] = {
            "task_queue": queue,
            "pid": pid,
            "samples": len(series),
            "sampled_minutes": _round(minutes[-1] - minutes[0], 2),
            "first_rss_mb": _round(rss_mb[0]),
            "last_rss_mb": _round(rss_mb[-1]),
            "growth_mb_per_min": whole["growth_mb_per_min"],
            "ci95_mb_per_min": whole["ci95_mb_per_min"],
            "adjusted_ci95_mb_per_min": whole["adjusted_ci95_mb_per_min"],
            "r_squared": whole["r_squared"],
            "heap": _heap_fit(minutes, series, "heap_used"),
            "python_heap": _heap_fit(minutes, series, "python_heap_used"),
            **_first_and_last(series),
        }
        late = [i for i, m in enumerate(minutes) if m >= warmup_minutes]
        late_minutes = [minutes[i] for i in late]
        late_series = [series[i] for i in late]
        entry["after_warmup"] = {
            "warmup_minutes": warmup_minutes,
            "rss": growth_fit(late_minutes, [rss_mb[i] for i in late]),
            "heap": _heap_fit(late_minutes, late_series, "heap_used"),
            "python_heap": _heap_fit(late_minutes, late_series, "python_heap_used"),
        }
        workers.append(entry)
    return workers


def _heap_fit(
    minutes: list[float], series: list[Any], field: str
) -> dict[str, Any] | None:
    """Fit the samples' `field` (bytes, None where not sampled) in MB."""
    pairs = [
        (m, getattr(s, field) / MB)
        for m, s in zip(minutes, series, strict=True)
        if getattr(s, field) is not None
    ]
    if not pairs:
        return None
    return growth_fit([m for m, _ in pairs], [h for _, h in pairs])


def _first_and_last(series: list[Any]) -> dict[str, Any]:
    """Return the first and last sampled malloc heap, Python heap (both MB)
    and pymalloc arena count of one worker, None where never sampled."""
    entry: dict[str, Any] = {}
    for key, field in (
        ("heap_mb", "heap_used"),
        ("python_heap_mb", "python_heap_used"),
    ):
        values = [getattr(s, field) for s in series if getattr(s, field) is not None]
        entry[f"first_{key}"] = _round(values[0] / MB) if values else None
        entry[f"last_{key}"] = _round(values[-1] / MB) if values else None
    arenas = [s.python_arenas for s in series if s.python_arenas is not None]
    entry["first_python_arenas"] = arenas[0] if arenas else None
    entry["last_python_arenas"] = arenas[-1] if arenas else None
    return entry


def build_metrics(
    settings: Settings,
    run_id: str,
    health: dict[str, Any] | None,
    *,
    health_note: str | None = None,
    warmup_minutes: float | None = None,
) -> dict[str, Any]:
    """Collect every figure of the report from the database; memory growth
    is also fitted after the first `warmup_minutes` of samples.

    The default warm-up is a third of the time from the first sample to the
    last, at most 10 minutes. `bench.soak` passes a third of its `--minutes`
    instead, so a report written with the default may start that fit at
    another sample than the soak's own output.

    Args:
        health_note: where `health` comes from, when it is not the health
            read as the run ended. The key is always present, so a report
            written again from the recorded health has the same keys.
    """
    data = load_run(settings.effective_database_url, run_id)
    run = data["run"]
    phases = data["phases"]
    operations = data["operations"]
    started = as_utc(run.started_at)
    ended = as_utc(run.ended_at) if run.ended_at else datetime.now(UTC)
    total = len(operations)
    succeeded = sum(1 for op in operations if op.ok)

    phase_entries: list[dict[str, Any]] = []
    issues: list[str] = []
    for name in ALL_PHASES:
        rows = [p for p in phases if p.phase == name]
        if not rows:
            continue
        ops = [op for op in operations if op.phase == name]
        ok_ops = sum(1 for op in ops if op.ok)
        # A verification check is recorded with no latency; only timed calls
        # make a phase's rate.
        calls = sum(1 for op in ops if op.latency_ms > 0)
        failed_rows = [p for p in rows if not p.ok]
        seconds = sum(
            (as_utc(p.ended_at) - as_utc(p.started_at)).total_seconds() for p in rows
        )
        errors = sorted({p.error for p in failed_rows if p.error})
        issues += [f"{PHASE_TITLES[name]}: {error}" for error in errors]
        phase_entries.append(
            {
                "phase": name,
                "title": PHASE_TITLES[name],
                "passed": not failed_rows,
                "cycles": len(rows),
                "cycles_failed": len(failed_rows),
                "operations": len(ops),
                "checks": len(ops) - calls,
                "succeeded": ok_ops,
                "success_rate_percent": _round(100 * ok_ops / len(ops), 2)
                if ops
                else None,
                "seconds": _round(seconds),
                "calls_per_second": _round(calls / seconds) if seconds else None,
                "errors": errors,
                "metrics": rows[-1].metrics,
                # Counted from 1, as the report shows it.
                "metrics_cycle": rows[-1].cycle + 1,
            }
        )

    latency: dict[str, dict[str, Any]] = {}
    by_name: dict[str, list[float]] = defaultdict(list)
    for op in operations:
        if op.ok and op.latency_ms > 0:
            by_name[op.name].append(op.latency_ms)
    for operation_name, values in sorted(by_name.items()):
        latency[operation_name] = {
            "count": len(values),
            "p50_ms": _round(percentile(values, 0.5)),
            "p95_ms": _round(percentile(values, 0.95)),
            "p99_ms": _round(percentile(values, 0.99)),
        }

    sample_times = [as_utc(s.taken_at) for s in data["samples"]]
    span = (
        (max(sample_times) - min(sample_times)).total_seconds() / 60
        if sample_times
        else None
    )
    sampled_minutes = _round(span, 2) if span is not None else None
    if warmup_minutes is None:
        # Imports, compilations and first-use caches fill in the first minutes.
        warmup_minutes = round(min(10.0, (span or 0.0) / 3), 2)
    workers = memory_growth(data["samples"], warmup_minutes)
    fitted = [
        w
        for w in workers
        if w["growth_mb_per_min"] is not None and w["samples"] >= MIN_FIT_SAMPLES
    ]
    largest = max(fitted, key=lambda w: w["growth_mb_per_min"], default=None)
    previous = data["previous"]
    previous_entry = None
    if previous is not None:
        summary = previous.summary or {}
        previous_entry = {
            "run_id": previous.run_id,
            "duration_seconds": summary.get("duration_seconds"),
            "success_rate_percent": summary.get("success_rate_percent"),
            "operations": summary.get("operations"),
            "max_growth_mb_per_min": summary.get("max_growth_mb_per_min"),
            "mb_bytes": summary.get("mb_bytes"),
            "phases_passed": summary.get("phases_passed"),
        }
    cycles = sorted({p.cycle for p in phases})
    phases_passed = sum(1 for p in phase_entries if p["passed"])
    workflow_closed = (run.summary or {}).get(WORKFLOW_CLOSED)
    if workflow_closed is not None:
        issues.insert(
            0,
            f"The run's workflow was {workflow_closed} before its duration ended, "
            "so the phase that ran then recorded nothing",
        )
    return {
        "run_id": run_id,
        "schedule_id": run.schedule_id,
        "workflow_closed": workflow_closed,
        "config": run.config,
        "timeline": {
            "started_at": started.isoformat(),
            "ended_at": ended.isoformat(),
            "duration_seconds": _round((ended - started).total_seconds()),
            "cycles": len(cycles),
        },
        "totals": {
            "operations": total,
            "succeeded": succeeded,
            "failed": total - succeeded,
            "success_rate_percent": _round(100 * succeeded / total, 2)
            if total
            else None,
            "phases_passed": phases_passed,
            "phases_failed": len(phase_entries) - phases_passed,
            "phases_run": len(phase_entries),
        },
        "phases": phase_entries,
        "latency": latency,
        "memory": {
            "mb_bytes": MB,
            "samples": len(data["samples"]),
            "workers": workers,
            "max_growth_mb_per_min": largest["growth_mb_per_min"] if largest else None,
            "max_growth_task_queue": largest["task_queue"] if largest else None,
            "max_growth_adjusted_ci95_mb_per_min": (
                largest["adjusted_ci95_mb_per_min"] if largest else None
            ),
            "max_growth_samples": largest["samples"] if largest else None,
            "max_growth_sampled_minutes": (
                largest["sampled_minutes"] if largest else None
            ),
            "min_fit_samples": MIN_FIT_SAMPLES,
            "max_worker_samples": max((w["samples"] for w in workers), default=0),
            "sampled_minutes": sampled_minutes,
        },
        "health": health,
        "health_note": health_note,
        "previous": previous_entry,
        "issues": issues,
    }


def _shown_interval(interval: list[float | None] | None) -> str:
    if not interval:
        return "n/a"
    if interval[0] is None or interval[1] is None:
        return "unbounded"  # fewer than 3 effective samples
    return f"{interval[0]} to {interval[1]}"


def _cell(value: Any) -> str:
    return "n/a" if value is None else str(value)


def _growth_summary(memory: dict[str, Any]) -> str:
    """Return the summary line of the largest worker memory growth, with the
    span and count of that worker's own samples."""
    title = "- Largest worker memory growth:"
    if not memory["samples"]:
        return f"{title} no worker was sampled"
    if memory["max_growth_mb_per_min"] is None:
        return (
            f"{title} too few samples to fit. A fit needs "
            f"{memory['min_fit_samples']} samples of one worker, and the most "
            f"that any worker has is {memory['max_worker_samples']}"
        )
    # A short run's growth is mostly its warm-up, so the span is shown.
    return (
        f"{title} {memory['max_growth_mb_per_min']} MB/min "
        f"({memory['max_growth_task_queue']}, adjusted 95% interval "
        f"{_shown_interval(memory['max_growth_adjusted_ci95_mb_per_min'])}), "
        f"fitted over {_cell(memory['max_growth_sampled_minutes'])} minutes of "
        f"its {memory['max_growth_samples']} samples, warm-up included"
    )


def _shown_growth(fit: dict[str, Any] | None, min_samples: int) -> str:
    """Format a fit's growth, or "too few samples to fit" for a fit of fewer
    than `min_samples` samples."""
    if fit is None or fit["growth_mb_per_min"] is None:
        return "n/a"
    if fit["samples"] < min_samples:
        return "too few samples to fit"
    return str(fit["growth_mb_per_min"])


def _shown_fit_interval(fit: dict[str, Any], key: str, min_samples: int) -> str:
    if fit["samples"] < min_samples:
        return "n/a"
    return _shown_interval(fit[key])


def _previous_growth(previous: dict[str, Any]) -> str:
    """Format the previous run's largest growth, labelled MiB/min where its
    summary predates decimal megabytes."""
    growth = previous["max_growth_mb_per_min"]
    if growth is not None and previous.get("mb_bytes") != MB:
        return f"{growth} MiB/min"
    return _cell(growth)


def render_markdown(metrics: dict[str, Any]) -> str:
    """Render the report as a GitHub issue; every number comes from `metrics`."""
    totals = metrics["totals"]
    timeline = metrics["timeline"]
    memory = metrics["memory"]
    closed = metrics.get("workflow_closed")
    every_run_passed = bool(totals["phases_run"]) and (
        totals["phases_passed"] == totals["phases_run"]
    )
    # A run that closed before its end did not run all of its phases, so it
    # never counts as all passed, as in the command's result.
    all_passed = every_run_passed and not closed
    verdict = "all phases passed" if all_passed else "some phases failed"
    if closed:
        verdict = f"{closed} before its end, " + (
            "every phase that ended passed" if every_run_passed else verdict
        )
    lines = [
        f"# Extended-duration benchmark {metrics['run_id']}: {verdict}",
        "",
        "## Executive summary",
        "",
        f"- Phases passed: {totals['phases_passed']} of {totals['phases_run']}",
        f"- Operations: {totals['succeeded']} of {totals['operations']} succeeded "
        f"({_cell(totals['success_rate_percent'])}%)",
        f"- Cycles: {timeline['cycles']}",
        _growth_summary(memory),
        "",
        "## Timeline",
        "",
        "| start | end | duration (s) |",
        "| --- | --- | --- |",
        f"| {timeline['started_at']} | {timeline['ended_at']} "
        f"| {timeline['duration_seconds']} |",
        "",
        "## Phases",
        "",
        "| phase | result | cycles | operations | of them checks | succeeded "
        "| success (%) | calls/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase in metrics["phases"]:
        mark = "✅" if phase["passed"] else "❌"
        lines.append(
            f"| {phase['title']} | {mark} | {phase['cycles']} | {phase['operations']} "
            f"| {phase['checks']} | {phase['succeeded']} "
            f"| {_cell(phase['success_rate_percent'])} "
            f"| {_cell(phase['calls_per_second'])} |"
        )
    lines += [
        "",
        f"![Timed calls per second of each phase]({THROUGHPUT_PLOT})",
        "",
        "### Phase details",
        "",
    ]
    for phase in metrics["phases"]:
        mark = "✅" if phase["passed"] else "❌"
        lines.append(f"#### {mark} {phase['title']}")
        lines.append("")
        lines.append(
            f"Figures of the last cycle that ran it, cycle {phase['metrics_cycle']} "
            "of the run."
        )
        lines.append("")
        for error in phase["errors"]:
            lines.append(f"- error: {error}")
        lines.append("```json")
        lines.append(json.dumps(phase["metrics"], indent=2, sort_keys=True))
        lines.append("```")
        lines.append("")
    lines += [
        "## Latency by operation",
        "",
        "| operation | count | p50 (ms) | p95 (ms) | p99 (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in metrics["latency"].items():
        lines.append(
            f"| {name} | {entry['count']} | {_cell(entry['p50_ms'])} "
            f"| {_cell(entry['p95_ms'])} | {_cell(entry['p99_ms'])} |"
        )
    lines += [
        "",
        f"![Latency of the successful timed operations]({LATENCY_PLOT})",
    ]
    lines += [
        "",
        "## Memory growth (linear regression of RSS over time)",
        "",
        f"Samples: {memory['samples']}. Each worker's growth is fitted over all "
        "of its samples, warm-up included, and is shown only for a fit of "
        f"{memory['min_fit_samples']} samples or more. The adjusted interval "
        "widens the plain one for the autocorrelation of samples taken seconds "
        "apart. MB is a million bytes in this report, not a MiB.",
        "",
        "| queue | pid | samples | sampled (min) | first RSS (MB) | last RSS (MB) "
        "| growth (MB/min) | 95% interval (MB/min) "
        "| adjusted 95% interval (MB/min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    least = memory["min_fit_samples"]
    for worker in memory["workers"]:
        lines.append(
            f"| {worker['task_queue']} | {worker['pid']} | {worker['samples']} "
            f"| {_cell(worker['sampled_minutes'])} "
            f"| {_cell(worker['first_rss_mb'])} | {_cell(worker['last_rss_mb'])} "
            f"| {_shown_growth(worker, least)} "
            f"| {_shown_fit_interval(worker, 'ci95_mb_per_min', least)} "
            f"| {_shown_fit_interval(worker, 'adjusted_ci95_mb_per_min', least)} |"
        )
    lines += [
        "",
        f"![RSS, malloc heap and Python heap of each worker over time]({MEMORY_PLOT})",
    ]
    lines += [
        "",
        "### Heaps",
        "",
        # No digits in this text: every number in the report is a figure.
        "The malloc heap is the bytes in use in glibc's malloc: C allocations "
        "and large Python objects. The Python heap is the bytes in pymalloc's "
        "allocated blocks, which hold Python's small objects. pymalloc maps its "
        "arenas outside malloc, so neither heap contains the other.",
        "",
        "| queue | pid | malloc heap, first / last (MB) | malloc growth (MB/min) "
        "| Python heap, first / last (MB) | Python heap growth (MB/min) "
        "| pymalloc arenas, first / last |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for worker in memory["workers"]:
        lines.append(
            f"| {worker['task_queue']} | {worker['pid']} "
            f"| {_cell(worker['first_heap_mb'])} / {_cell(worker['last_heap_mb'])} "
            f"| {_shown_growth(worker['heap'], least)} "
            f"| {_cell(worker['first_python_heap_mb'])} / "
            f"{_cell(worker['last_python_heap_mb'])} "
            f"| {_shown_growth(worker['python_heap'], least)} "
            f"| {_cell(worker['first_python_arenas'])} / "
            f"{_cell(worker['last_python_arenas'])} |"
        )
    lines += ["", "## Comparison with the previous run", ""]
    previous = metrics["previous"]
    if previous is None:
        lines.append("No earlier completed run to compare with.")
    else:
        lines += [
            f"| figure | this run | previous run ({previous['run_id']}) |",
            "| --- | --- | --- |",
            f"| duration (s) | {timeline['duration_seconds']} "
            f"| {_cell(previous['duration_seconds'])} |",
            f"| operations | {totals['operations']} "
            f"| {_cell(previous['operations'])} |",
            f"| success (%) | {_cell(totals['success_rate_percent'])} "
            f"| {_cell(previous['success_rate_percent'])} |",
            f"| phases passed | {totals['phases_passed']} "
            f"| {_cell(previous['phases_passed'])} |",
            f"| max growth (MB/min) | {_cell(memory['max_growth_mb_per_min'])} "
            f"| {_previous_growth(previous)} |",
        ]
    if metrics.get("health_note"):
        lines += ["", "## System health", "", metrics["health_note"], "", "```json"]
    else:
        lines += ["", "## Final system health", "", "```json"]
    lines.append(json.dumps(metrics["health"], indent=2, sort_keys=True))
    lines += ["```", "", "## Issues found", ""]
    lines += [f"- {issue}" for issue in metrics["issues"]] or ["None."]
    lines += ["", "## Conclusion", ""]
    if all_passed:
        lines.append(
            f"Every phase passed in each of {timeline['cycles']} cycles; "
            f"{totals['succeeded']} of {totals['operations']} operations succeeded."
        )
    elif closed:
        lines.append(
            f"The run was {closed} before its end, so not every phase ran; "
            f"{totals['phases_passed']} of the {totals['phases_run']} phases that "
            f"ended passed, and {totals['succeeded']} of {totals['operations']} "
            "operations succeeded."
        )
    else:
        lines.append(
            f"{totals['phases_failed']} of "
            f"{totals['phases_run']} phases failed; see the issues above."
        )
    lines.append("")
    return "\n".join(lines)


# Each panel of memory.png: the sample field (bytes) and the axis label.
_MEMORY_PANELS = (
    ("rss", "RSS (MB)"),
    ("heap_used", "malloc heap (MB)"),
    ("python_heap_used", "Python heap (MB)"),
)


def _plot_memory(samples: list[Any], path: Path) -> Path:
    """Draw RSS, the malloc heap and the Python heap of each worker over time."""
    import matplotlib.pyplot as plt

    series: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for sample in samples:
        series[(sample.task_queue, sample.pid)].append(sample)
    origin = min((as_utc(s.taken_at) for s in samples), default=None)
    figure, axes = plt.subplots(len(_MEMORY_PANELS), 1, figsize=(8, 9), sharex=True)
    for axis, (field, label) in zip(axes, _MEMORY_PANELS, strict=True):
        for (queue, pid), points in sorted(series.items()):
            assert origin is not None
            sampled = [p for p in points if getattr(p, field) is not None]
            minutes = [
                (as_utc(p.taken_at) - origin).total_seconds() / 60 for p in sampled
            ]
            values = [getattr(p, field) / MB for p in sampled]
            axis.plot(minutes, values, label=f"{queue} ({pid})")
        axis.set_ylabel(label)
    axes[0].set_title("Worker memory")
    axes[-1].set_xlabel("minutes since start")
    if series:
        axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def render_plots(metrics: dict[str, Any], settings: Settings, out: Path) -> list[Path]:
    """Draw memory over time, the latency distribution and throughput per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_run(settings.effective_database_url, metrics["run_id"])
    paths: list[Path] = []

    paths.append(_plot_memory(data["samples"], out / MEMORY_PLOT))

    figure, axis = plt.subplots(figsize=(8, 4))
    latencies = [
        op.latency_ms for op in data["operations"] if op.ok and op.latency_ms > 0
    ]
    if latencies:
        axis.hist(latencies, bins=min(50, max(5, len(latencies) // 5)))
    axis.set_xlabel("latency (ms)")
    axis.set_ylabel("operations")
    axis.set_title("Operation latency")
    paths.append(out / LATENCY_PLOT)
    figure.tight_layout()
    figure.savefig(paths[-1])
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4))
    phases = metrics["phases"]
    axis.bar(
        [p["title"] for p in phases],
        [p["calls_per_second"] or 0 for p in phases],
        color=["tab:green" if p["passed"] else "tab:red" for p in phases],
    )
    axis.set_ylabel("timed calls per second")
    axis.set_title("Throughput per phase")
    axis.tick_params(axis="x", labelrotation=20, labelsize="small")
    paths.append(out / THROUGHPUT_PLOT)
    figure.tight_layout()
    figure.savefig(paths[-1])
    plt.close(figure)
    return paths


def write_report(
    settings: Settings,
    run_id: str,
    health: dict[str, Any] | None,
    *,
    health_note: str | None = None,
) -> ReportResult:
    """Write metrics.json, report.md and the plots to the run's report folder,
    `reports/<run_folder_name(run_id)>/`, and to the `benchmark-reports`
    bucket under the same name.

    Args:
        health_note: where `health` comes from, when it is not the health
            read as the run ended; the report shows it under its heading.
    """
    metrics = build_metrics(settings, run_id, health, health_note=health_note)
    return save_report(settings, metrics)


def recorded_health(
    settings: Settings, run_id: str
) -> tuple[dict[str, Any], str | None] | None:
    """Return the system health in the run's stored metrics.json with its
    note (None for the health read as the run ended), or None when there is
    no such file or health."""
    stored = _stored_metrics(settings, run_id)
    if stored is None or not isinstance(stored.get("health"), dict):
        return None
    note = stored.get("health_note")
    return stored["health"], note if isinstance(note, str) else None


def _stored_metrics(settings: Settings, run_id: str) -> dict[str, Any] | None:
    """Return the run's metrics.json from the report bucket, or None."""
    storage = storage_for(settings)
    # Reports written before folder names were made safe are stored under
    # the run id itself.
    for prefix in dict.fromkeys((run_folder_name(run_id), run_id)):
        try:
            stored = json.loads(storage.get(REPORT_BUCKET, f"{prefix}/metrics.json"))
        except (StorageError, ValueError):
            continue
        if isinstance(stored, dict):
            return stored
    return None


def save_report(settings: Settings, metrics: dict[str, Any]) -> ReportResult:
    """Write the files of `write_report` from metrics already built."""
    run_id = metrics["run_id"]
    folder = run_folder_name(run_id)
    reports = settings.reports_dir.expanduser().resolve()
    out = reports / folder
    reports.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics.json": json.dumps(metrics, indent=2, sort_keys=True).encode(),
        "report.md": render_markdown(metrics).encode(),
    }
    # Every file is written to a scratch folder first, so that a full disk
    # leaves no truncated file and no report that mixes two writes.
    with tempfile.TemporaryDirectory(prefix=f".{folder}-", dir=reports) as scratch:
        staged = Path(scratch)
        for name, content in files.items():
            (staged / name).write_bytes(content)
        for path in render_plots(metrics, settings, staged):
            files[path.name] = path.read_bytes()
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(staged / name, out / name)
    storage = storage_for(settings)
    for name, content in files.items():
        storage.put(REPORT_BUCKET, f"{folder}/{name}", content)
    totals = metrics["totals"]
    return ReportResult(
        run_id=run_id,
        report_dir=str(out),
        markdown_path=str(out / "report.md"),
        storage_prefix=f"{REPORT_BUCKET}/{folder}/",
        success_rate=totals["success_rate_percent"] or 0.0,
        all_phases_passed=bool(totals["phases_run"])
        and totals["phases_passed"] == totals["phases_run"]
        and not metrics.get("workflow_closed"),
    )


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the figures that a later run compares itself with."""
    return {
        "duration_seconds": metrics["timeline"]["duration_seconds"],
        "operations": metrics["totals"]["operations"],
        "success_rate_percent": metrics["totals"]["success_rate_percent"],
        "phases_passed": metrics["totals"]["phases_passed"],
        "max_growth_mb_per_min": metrics["memory"]["max_growth_mb_per_min"],
        "mb_bytes": metrics["memory"]["mb_bytes"],
    }
