"""Benchmark local sandboxes against a raw subprocess, in the same run.

Prints p50 of `sandbox_create` and of `sandbox_execute` for a one-line
Python program on two paths, next to `subprocess.run([python3, "-c", code])`
measured before and after them:

- backend: `LocalBackend.create` / `LocalBackend.run` called directly;
- tool: `invoke_tool("sandbox_create" | "sandbox_execute")`, which goes
  through the session workflow (update-with-start, update, activities) on a
  local Temporal dev server, with the audit write.

The targets are: create p50 <= 100 ms, execute p50 <= 1.5x the raw
subprocess p50.

For reference it also prints the floor of the tool path on the same dev
server: an update of a minimal workflow that returns at once, and one whose
handler runs a no-op local activity, as `execute` runs the sandbox call.

Run: python -m bench.sandbox [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.client import Client

CODE = "print(1)"
_FLOOR_QUEUE = "bench-sandbox-floor"


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def backend_level(runs: int, root: Path) -> tuple[list[float], list[float]]:
    from app.sandbox.local import LocalBackend

    # One spare, as a sandbox worker keeps by default (NEXUS_SANDBOX_SPARES).
    backend = LocalBackend(root, spares=1)
    creates: list[float] = []
    executes: list[float] = []
    for index in range(runs):
        started = time.perf_counter()
        await backend.create(
            f"b{index}", template="base", timeout=600, env={}, metadata={}
        )
        creates.append(time.perf_counter() - started)
        started = time.perf_counter()
        await backend.run(
            f"b{index}",
            ["python3", "-c", CODE],
            env={},
            cwd=None,
            timeout=30,
            output_limit=65536,
        )
        executes.append(time.perf_counter() - started)
        await backend.delete(f"b{index}")
    await backend.close()
    return creates, executes


@activity.defn(name="bench_sandbox_noop")
async def _noop(value: str) -> str:
    return value


@workflow.defn(name="BenchSandboxFloorWorkflow", sandboxed=False)
class FloorWorkflow:
    """A session-like workflow whose updates do no sandbox work."""

    def __init__(self) -> None:
        self._done = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self._done)

    @workflow.update
    async def bare(self, value: str) -> str:
        return value

    @workflow.update
    async def local_activity(self, value: str) -> str:
        return await workflow.execute_local_activity(
            _noop, value, start_to_close_timeout=timedelta(seconds=30)
        )

    @workflow.signal
    def finish(self) -> None:
        self._done = True


async def update_floor(client: Client, runs: int) -> dict[str, list[float]]:
    """Time `runs` updates of each kind on a minimal workflow."""
    import uuid

    from temporalio.worker import Worker

    samples: dict[str, list[float]] = {"bare": [], "local_activity": []}
    async with Worker(
        client,
        task_queue=_FLOOR_QUEUE,
        workflows=[FloorWorkflow],
        activities=[_noop],
    ):
        handle = await client.start_workflow(
            FloorWorkflow.run,
            id=f"bench-sandbox-floor-{uuid.uuid4().hex[:8]}",
            task_queue=_FLOOR_QUEUE,
        )
        try:
            for _ in range(runs):
                for name, times in samples.items():
                    started = time.perf_counter()
                    await handle.execute_update(name, "x", result_type=str)
                    times.append(time.perf_counter() - started)
        finally:
            await handle.signal(FloorWorkflow.finish)
            await handle.result()
    return samples


async def tool_level(
    runs: int, root: Path
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    from temporalio.testing import WorkflowEnvironment

    from app.contracts.queues import ORCHESTRATION, SANDBOX
    from app.db.migrate import upgrade
    from app.settings import Settings
    from app.temporal.client import build_data_converter
    from app.temporal.devserver import temporal_binary
    from app.temporal.search_attributes import dev_server_args
    from app.tools import ToolContext, invoke_tool, load_tools
    from tests.conftest import TEST_ENCRYPTION_KEY, running_workers

    settings = Settings(
        data_dir=root,
        encryption_key=TEST_ENCRYPTION_KEY,
        temporal_address="127.0.0.1:1",  # type: ignore[arg-type]
    )
    upgrade(settings.effective_database_url)
    load_tools()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal_binary()),
        data_converter=build_data_converter(settings),
        dev_server_extra_args=dev_server_args(),
    )
    creates: list[float] = []
    executes: list[float] = []
    try:
        client = env.client
        async with running_workers(client, settings, [ORCHESTRATION, SANDBOX]):
            ctx = ToolContext(settings, user_id="bench", temporal_client=client)
            for _ in range(runs):
                started = time.perf_counter()
                created = await invoke_tool(ctx, "sandbox_create", {"template": "base"})
                creates.append(time.perf_counter() - started)
                started = time.perf_counter()
                await invoke_tool(
                    ctx,
                    "sandbox_execute",
                    {"sandbox_id": created["sandbox_id"], "code": CODE},
                )
                executes.append(time.perf_counter() - started)
                await invoke_tool(
                    ctx, "sandbox_delete", {"sandbox_id": created["sandbox_id"]}
                )
        floor = await update_floor(client, runs)
    finally:
        from app.sandbox.local import LocalBackend
        from app.sandbox.runtime import get_backend

        backend = get_backend(settings)
        if isinstance(backend, LocalBackend):
            await backend.close()  # the in-process workers' spare runner
        await env.shutdown()
    return creates, executes, floor


def raw_subprocess(runs: int) -> list[float]:
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([python, "-c", CODE], capture_output=True, check=True)
        samples.append(time.perf_counter() - started)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    load_before = _load()
    with tempfile.TemporaryDirectory() as folder:
        raw = raw_subprocess(args.runs)
        b_create, b_exec = await backend_level(args.runs, Path(folder) / "backend")
        t_create, t_exec, floor = await tool_level(args.runs, Path(folder) / "tool")
        raw_after = raw_subprocess(args.runs)
    baseline = p50(raw + raw_after)
    from app.sandbox.local import find_bwrap

    mode = "bubblewrap" if find_bwrap() else "plain subprocess (no bwrap)"
    print(f"local sandbox isolation: {mode}; {args.runs} runs per figure")
    print(f"load average at start {load_before}, at end {_load()}")
    print(f"raw subprocess.run python3 -c       p50 {baseline:8.2f} ms  (baseline)")
    rows = [
        ("backend create  (LocalBackend)", b_create, None),
        ("backend execute (LocalBackend)", b_exec, baseline),
        ("tool sandbox_create  (workflow)", t_create, None),
        ("tool sandbox_execute (workflow)", t_exec, baseline),
    ]
    for label, samples, base in rows:
        value = p50(samples)
        if base is None:
            verdict = "meets" if value <= 100 else "misses"
            print(f"{label:35s} p50 {value:8.2f} ms  target <= 100 ms: {verdict}")
        else:
            ratio = value / base
            verdict = "meets" if ratio <= 1.5 else "misses"
            print(
                f"{label:35s} p50 {value:8.2f} ms  ratio {ratio:.2f}x of raw  "
                f"target <= 1.5x: {verdict}"
            )
    print("floor of the tool path, same dev server (no sandbox work):")
    print(f"{'  update, handler returns at once':35s} p50 {p50(floor['bare']):8.2f} ms")
    print(
        f"{'  update running a no-op local act.':35s} "
        f"p50 {p50(floor['local_activity']):8.2f} ms"
    )


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    asyncio.run(main())
