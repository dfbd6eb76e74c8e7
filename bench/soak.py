"""Soak: run the benchmark workflow for N minutes and print each worker's
memory growth in MB per minute, with the regression's 95% interval.

    .venv/bin/python bench/soak.py --minutes 60

It starts its own embedded server and workers in a temporary data folder
(ports from --port), so it does not touch a running `nexus up`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from app.benchmark.cli import run_benchmark
from app.benchmark.report import build_metrics
from app.contracts.benchmark import BenchmarkConfig
from app.logs import configure_logging
from app.settings import Settings

TARGET_MB_PER_MIN = 0.005
PUBLISHED_MB_PER_MIN = 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=27233, help="Temporal gRPC port.")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    options = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="nexus-soak-"))
    os.environ.pop("NEXUS_TEMPORAL_ADDRESS", None)
    settings = Settings(
        data_dir=data_dir,
        reports_dir=data_dir / "reports",
        temporal_port=options.port,
        temporal_ui_port=options.port + 1000,
        http_port=options.port + 2000,
    )
    # Child worker processes read their settings from the environment.
    os.environ.update(
        {
            "NEXUS_DATA_DIR": str(data_dir),
            "NEXUS_TEMPORAL_PORT": str(options.port),
            "NEXUS_TEMPORAL_UI_PORT": str(options.port + 1000),
            "NEXUS_HTTP_PORT": str(options.port + 2000),
            "NEXUS_REPORTS_DIR": str(data_dir / "reports"),
        }
    )
    configure_logging("WARNING")
    config = BenchmarkConfig(
        duration_seconds=options.minutes * 60,
        sample_interval_seconds=options.sample_seconds,
    )
    run_id, result = asyncio.run(run_benchmark(settings, config, start_workers=True))
    metrics = build_metrics(settings, run_id, None)
    print(f"run {run_id}: {result.cycles} cycles over {options.minutes:g} min")
    print(f"report: {result.report.markdown_path}")
    print(
        f"{'queue':22} {'pid':>7} {'samples':>7} {'MB/min':>10} "
        f"{'95% interval':>24} {'vs target':>9}"
    )
    worst = 0.0
    for worker in metrics["memory"]["workers"]:
        growth = worker["growth_mb_per_min"]
        interval = worker["ci95_mb_per_min"]
        if growth is None:
            print(f"{worker['task_queue']:22} {worker['pid']:>7} too few samples")
            continue
        worst = max(worst, growth)
        shown = f"[{interval[0]:.5f}, {interval[1]:.5f}]"
        print(
            f"{worker['task_queue']:22} {worker['pid']:>7} {worker['samples']:>7} "
            f"{growth:>10.5f} {shown:>24} {growth / TARGET_MB_PER_MIN:>8.2f}x"
        )
    print(
        f"largest growth {worst:.5f} MB/min: {worst / TARGET_MB_PER_MIN:.2f}x the "
        f"{TARGET_MB_PER_MIN} MB/min target, {worst / PUBLISHED_MB_PER_MIN:.2f}x the "
        f"{PUBLISHED_MB_PER_MIN} MB/min Flow Nexus published"
    )
    return 0 if worst <= TARGET_MB_PER_MIN else 1


if __name__ == "__main__":
    sys.exit(main())
