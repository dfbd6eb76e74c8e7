"""Latency of tool calls over HTTP against a bare FastAPI endpoint.

Starts an embedded Temporal server (on NEXUS_TEMPORAL_PORT, default 17700),
the flow-nexus HTTP server (`python -m app.api`) and a bare FastAPI app that
returns a constant JSON object, each uvicorn in its own process, then drives
each target with 50 concurrent httpx clients and prints p50 and p99 and the
ratio to the bare endpoint.

    python bench/api.py [--requests 2000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
from fastapi import FastAPI

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def bare_app() -> FastAPI:

    app = FastAPI()

    @app.post("/bare")
    async def bare() -> dict[str, str]:
        return {"status": "ok"}

    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index]


async def drive(
    url: str,
    body: Mapping[str, object],
    headers: dict[str, str],
    total: int,
    width: int,
) -> tuple[list[float], int]:
    """Send `total` POSTs from `width` concurrent clients; return the
    latencies in ms and the count of non-200 responses."""
    latencies: list[float] = []
    failures = 0
    remaining = total

    async def one_client() -> None:
        nonlocal remaining, failures
        async with httpx.AsyncClient(headers=headers, timeout=60) as http:
            await http.post(url, json=body)  # connection setup is not measured
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await http.post(url, json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    failures += 1

    await asyncio.gather(*(one_client() for _ in range(width)))
    return latencies, failures


async def measure(args: argparse.Namespace) -> None:
    from app.api.keys import create_key
    from app.db.migrate import upgrade
    from app.settings import Settings
    from app.temporal.devserver import EmbeddedTemporal

    data_dir = Path(tempfile.mkdtemp(prefix="nexus-bench-api-"))
    temporal_port = int(os.environ.get("NEXUS_TEMPORAL_PORT", "17700"))
    settings = Settings(
        data_dir=data_dir,
        temporal_port=temporal_port,
        temporal_ui_port=temporal_port + 1000,
    )
    temporal = EmbeddedTemporal(settings)
    address = await temporal.start()
    upgrade(settings.effective_database_url)
    token, _ = create_key(settings.effective_database_url, "bench")
    api_port, bare_port = free_port(), free_port()
    env = {
        **os.environ,
        "NEXUS_DATA_DIR": str(data_dir),
        "NEXUS_TEMPORAL_ADDRESS": address,
        "NEXUS_HTTP_PORT": str(api_port),
        "NEXUS_API_RATE_LIMIT": "1000000",
        "NEXUS_API_RATE_BURST": "1000000",
        "NEXUS_LOG_LEVEL": "WARNING",
    }
    api = subprocess.Popen([sys.executable, "-m", "app.api"], cwd=REPO_ROOT, env=env)
    bare = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "bench.api:bare_app",
            "--port",
            str(bare_port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
    )
    try:
        wait_for(f"http://127.0.0.1:{api_port}/health", api)
        wait_for(f"http://127.0.0.1:{bare_port}/docs", bare)
        headers = {"Authorization": f"Bearer {token}"}
        targets: list[tuple[str, str, Mapping[str, object]]] = [
            ("bare FastAPI", f"http://127.0.0.1:{bare_port}/bare", {}),
            (
                "system_health",
                f"http://127.0.0.1:{api_port}/api/tools/system_health",
                {},
            ),
            (
                "audit_log",
                f"http://127.0.0.1:{api_port}/api/tools/audit_log",
                {"limit": 10},
            ),
        ]
        results: dict[str, tuple[float, float]] = {}
        for name, url, body in targets:
            latencies, failures = await drive(
                url, body, headers, args.requests, args.concurrency
            )
            p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
            results[name] = (p50, p99)
            print(
                f"{name:14} n={len(latencies)} failures={failures} "
                f"p50={p50:.1f} ms p99={p99:.1f} ms "
                f"mean={statistics.fmean(latencies):.1f} ms"
            )
        bare_p50, bare_p99 = results["bare FastAPI"]
        for name in ("system_health", "audit_log"):
            p50, p99 = results[name]
            verdict = "met" if p99 <= 20 else "missed"
            print(
                f"{name:14} / bare: p50 x{p50 / bare_p50:.1f}, "
                f"p99 x{p99 / bare_p99:.1f}; p99 target 20 ms {verdict}"
            )
    finally:
        for process in (api, bare):
            process.terminate()
            process.wait(timeout=30)
        temporal.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=2000, help="Requests per target."
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="Concurrent httpx clients."
    )
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
