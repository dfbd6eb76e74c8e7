"""Soak: run the benchmark workflow for N minutes and print each worker's
memory growth in MB (10**6 bytes) per minute, over the whole run and after a
warm-up.

    flock /work/wt/bench.lock .venv/bin/python -m bench.soak --minutes 60

It starts its own embedded Temporal server, workers and HTTP API in its own
data folder, so it does not touch a running `nexus up`. The server listens
on --port, its web UI on --port + 1000 and the HTTP API on --port + 2000,
or on --ui-port and --http-port.

Growth is the least squares slope of RSS, of the malloc heap and of the
Python heap (pymalloc's allocated blocks) against minutes. Two fits are
printed and labelled: one over every sample of the run, and one over the
samples taken after the stated warm-up (imports, JAX compilation and
first-use caches fill in the first minutes). The target applies to the whole
run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.benchmark.cli import cancel_on_sigterm, run_benchmark
from app.benchmark.report import build_metrics
from app.contracts.benchmark import BenchmarkConfig
from app.logs import configure_logging
from app.settings import Settings
from workers.allocator import parse_allocator_setting

TARGET_MB_PER_MIN = 0.005
TARGET_MINUTES = 60.0
PUBLISHED_MB_PER_MIN = 0.05


def _interval(fit: dict[str, Any] | None, key: str) -> str:
    if fit is None or fit.get(key) is None:
        return "n/a"
    low, high = fit[key]
    if low is None or high is None:
        return "unbounded"
    return f"[{low:.5f}, {high:.5f}]"


def _slope(fit: dict[str, Any] | None) -> str:
    if fit is None or fit.get("growth_mb_per_min") is None:
        return "n/a"
    return f"{fit['growth_mb_per_min']:.5f}"


def print_table(title: str, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Print one fit per worker: (worker entry, {"rss": fit, "heap": fit,
    "python_heap": fit}), where `heap` is the malloc heap."""
    print(title)
    print(
        f"  {'queue':20} {'pid':>7} {'n':>5} {'RSS MB/min':>11} "
        f"{'95% (OLS)':>22} {'95% (autocorr.)':>22} {'malloc MB/min':>13} "
        f"{'malloc 95% (autocorr.)':>22} {'Python MB/min':>13} "
        f"{'Python 95% (autocorr.)':>22}"
    )
    for worker, fits in rows:
        rss, heap, python_heap = fits["rss"], fits["heap"], fits["python_heap"]
        print(
            f"  {worker['task_queue']:20} {worker['pid']:>7} {rss['samples']:>5} "
            f"{_slope(rss):>11} {_interval(rss, 'ci95_mb_per_min'):>22} "
            f"{_interval(rss, 'adjusted_ci95_mb_per_min'):>22} {_slope(heap):>13} "
            f"{_interval(heap, 'adjusted_ci95_mb_per_min'):>22} "
            f"{_slope(python_heap):>13} "
            f"{_interval(python_heap, 'adjusted_ci95_mb_per_min'):>22}"
        )


def _worst(fits: list[dict[str, Any]]) -> float | None:
    slopes = [
        f["growth_mb_per_min"] for f in fits if f["growth_mb_per_min"] is not None
    ]
    return max(slopes) if slopes else None


_MAX_PORT = 65535
# The limits of BenchmarkConfig's duration_seconds and sample_interval_seconds.
_MAX_MINUTES = 7 * 24 * 60
_MAX_SAMPLE_SECONDS = 3600


def invalid_option(options: argparse.Namespace) -> str | None:
    """Return the error message for the first invalid option, or None.

    The checks run before anything is created, so a rejected command leaves
    no data folder behind.
    """
    minutes, warmup = options.minutes, options.warmup_minutes
    if not 0 < minutes <= _MAX_MINUTES:
        return (
            f"--minutes {minutes:g} is invalid: the run must last more than 0 and "
            f"at most {_MAX_MINUTES:g} minutes; pass for example --minutes 60"
        )
    if not 1 <= options.port <= _MAX_PORT:
        return (
            f"--port {options.port} is invalid: it must be from 1 to {_MAX_PORT}; "
            "pass for example --port 27233"
        )
    ports = {"--port": options.port}
    for name, offset, value in (
        ("--ui-port", 1000, options.ui_port),
        ("--http-port", 2000, options.http_port),
    ):
        if value is None and options.port + offset > _MAX_PORT:
            return (
                f"--port {options.port} is invalid: without {name} the soak "
                f"also listens on --port + {offset}, which must be at most "
                f"{_MAX_PORT}; pass a lower --port, or {name}"
            )
        port = options.port + offset if value is None else value
        if not 1 <= port <= _MAX_PORT:
            return (
                f"{name} {port} is invalid: it must be from 1 to {_MAX_PORT}; "
                f"pass for example {name} {27233 + offset}"
            )
        for other_option, other_port in ports.items():
            if port == other_port:
                return (
                    f"{name} {port} is invalid: {other_option} is that port too; "
                    f"pass a port of its own to {name}"
                )
        ports[name] = port
    if not 0 < options.sample_seconds <= _MAX_SAMPLE_SECONDS:
        return (
            f"--sample-seconds {options.sample_seconds:g} is invalid: it must be "
            f"more than 0 and at most {_MAX_SAMPLE_SECONDS}; pass for example "
            "--sample-seconds 5"
        )
    if warmup is not None and not 0 <= warmup < minutes:
        return (
            f"--warmup-minutes {warmup:g} is invalid: it must be 0 or more and "
            f"less than --minutes ({minutes:g}), or left out for a third of the "
            "run, at most 10"
        )
    return None


def listen_ports(options: argparse.Namespace) -> tuple[int, int, int]:
    """Return the ports of the Temporal server, its web UI and the HTTP API."""
    ui_port = options.port + 1000 if options.ui_port is None else options.ui_port
    http_port = options.port + 2000 if options.http_port is None else options.http_port
    return options.port, ui_port, http_port


def heap_legend(setting: str) -> str:
    """Describe the malloc and Python columns for the workers' allocator
    setting (`NEXUS_WORKER_ALLOCATOR`)."""
    default, per_queue = parse_allocator_setting(setting)
    if {default, *per_queue.values()} == {"system"}:
        return (
            "malloc is glibc's in-use bytes; Python is the bytes in pymalloc's "
            "allocated blocks."
        )
    # NOTE: a worker that cannot preload jemalloc logs a warning and uses
    # glibc, and this legend does not reflect that.
    kinds = {
        "system": "glibc's in-use bytes without Python's objects of 512 bytes "
        "or less (pymalloc's)",
        "glibc": "glibc's in-use bytes with every Python object",
        "jemalloc": "jemalloc's allocated bytes with every Python object",
    }
    used = [
        kinds[choice] for choice in kinds if choice in {default, *per_queue.values()}
    ]
    return (
        f"Workers ran with NEXUS_WORKER_ALLOCATOR={setting}. malloc is "
        f"{'; or '.join(used)}, by the worker's allocator. Python is n/a where "
        "PYTHONMALLOC=malloc turns pymalloc off."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="How long to keep starting cycles, in minutes (default: 10).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=27233,
        help="gRPC port of the embedded Temporal server. The web UI uses "
        "PORT + 1000 and the HTTP API PORT + 2000 unless --ui-port and "
        "--http-port are given (default: 27233).",
    )
    parser.add_argument(
        "--ui-port",
        type=int,
        default=None,
        help="Port of the embedded server's web UI (default: PORT + 1000).",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="Port of the HTTP API (default: PORT + 2000).",
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=5.0,
        help="Seconds between two memory samples of each worker (default: 5).",
    )
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="Minutes left out of the after-warm-up fit "
        "(default: a third of the run, at most 10).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Data folder (default: a new /tmp/soak-* folder).",
    )
    return parser


def parse_options(arguments: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(arguments)


def main() -> int:
    parser = build_parser()
    options = parser.parse_args()
    message = invalid_option(options)
    if message is not None:
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    warmup = (
        options.warmup_minutes
        if options.warmup_minutes is not None
        else min(10.0, options.minutes / 3)
    )

    try:
        data_dir = options.data_dir or Path(tempfile.mkdtemp(prefix="soak-"))
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        folder = options.data_dir or f"a new folder in {tempfile.gettempdir()}"
        parser.exit(
            2,
            f"{parser.prog}: error: --data-dir {folder} cannot be created: "
            f"{error}; pass a --data-dir that you can write to\n",
        )
    os.environ.pop("NEXUS_TEMPORAL_ADDRESS", None)
    _, ui_port, http_port = listen_ports(options)
    settings = Settings(
        data_dir=data_dir,
        reports_dir=data_dir / "reports",
        temporal_port=options.port,
        temporal_ui_port=ui_port,
        http_port=http_port,
    )
    # Child worker processes read their settings from the environment.
    os.environ.update(
        {
            "NEXUS_DATA_DIR": str(data_dir),
            "NEXUS_TEMPORAL_PORT": str(options.port),
            "NEXUS_TEMPORAL_UI_PORT": str(ui_port),
            "NEXUS_HTTP_PORT": str(http_port),
            "NEXUS_REPORTS_DIR": str(data_dir / "reports"),
        }
    )
    configure_logging("WARNING")
    config = BenchmarkConfig(
        duration_seconds=options.minutes * 60,
        sample_interval_seconds=options.sample_seconds,
    )
    load_before = os.getloadavg()
    try:
        finished = asyncio.run(
            cancel_on_sigterm(run_benchmark(settings, config, start_workers=True))
        )
    except (KeyboardInterrupt, asyncio.CancelledError) as error:
        # run_benchmark has cancelled the run (unless Ctrl-C came twice).
        print(f"{parser.prog}: interrupted; no growth is printed", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 143
    run_id, result = finished.run_id, finished.result
    load_after = os.getloadavg()
    metrics = build_metrics(settings, run_id, None, warmup_minutes=warmup)
    workers = metrics["memory"]["workers"]
    timeline = metrics["timeline"]
    print(f"command: {shlex.join([sys.executable, '-m', 'bench.soak', *sys.argv[1:]])}")
    print(
        f"run {run_id}: {result.cycles} cycles, {timeline['duration_seconds']} s "
        f"({options.minutes:g} min requested), success rate "
        f"{result.report.success_rate}%, all phases passed: "
        f"{result.report.all_phases_passed}"
    )
    print(f"report: {result.report.markdown_path}")
    print(
        "load average (1, 5, 15 min) at start "
        f"{', '.join(f'{v:.2f}' for v in load_before)}, at end "
        f"{', '.join(f'{v:.2f}' for v in load_after)}; {os.cpu_count()} CPUs"
    )
    print(
        "95% (OLS) is the plain regression interval; 95% (autocorr.) widens it "
        "for the lag-1 autocorrelation of the residuals, and is the one to read. "
        f"{heap_legend(settings.worker_allocator)} MB is 10**6 bytes."
    )
    print()
    print_table(
        "Whole run (every sample):",
        [
            (w, {"rss": w, "heap": w["heap"], "python_heap": w["python_heap"]})
            for w in workers
        ],
    )
    print()
    print_table(
        f"After a {warmup:.1f}-minute warm-up (samples from minute {warmup:.1f} on):",
        [(w, w["after_warmup"]) for w in workers],
    )
    print()
    whole = _worst(workers)
    late = _worst([w["after_warmup"]["rss"] for w in workers])
    for label, worst in (("whole run", whole), (f"after {warmup:.1f} min", late)):
        if worst is None:
            print(f"largest RSS growth, {label}: too few samples")
            continue
        print(
            f"largest RSS growth, {label}: {worst:.5f} MB/min = "
            f"{worst / TARGET_MB_PER_MIN:.2f}x the {TARGET_MB_PER_MIN} MB/min target "
            f"({worst / PUBLISHED_MB_PER_MIN:.2f}x the {PUBLISHED_MB_PER_MIN} MB/min "
            "Flow Nexus published)"
        )
    met = whole is not None and whole <= TARGET_MB_PER_MIN
    long_enough = options.minutes >= TARGET_MINUTES
    print(
        f"target (at most {TARGET_MB_PER_MIN} MB/min over {TARGET_MINUTES:g} min, "
        f"whole run): {'met' if met and long_enough else 'NOT met'}"
        + ("" if long_enough else f" (a {options.minutes:g}-minute run cannot show it)")
    )
    return 0 if met and long_enough else 1


if __name__ == "__main__":
    sys.exit(main())
