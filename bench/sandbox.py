"""Benchmark local sandboxes against a raw subprocess, in the same run.

Prints p50 of `sandbox_create` and of `sandbox_execute` for a one-line
Python program on two paths, next to `subprocess.run([python3, "-c", code])`
measured in the same loop, right before each creation, so that the baseline
and the path see the same machine (the tool path's dev server and workers
run during both, idle while the baseline runs):

- backend: `LocalBackend.create` / `LocalBackend.run` called directly;
- tool: `invoke_tool("sandbox_create" | "sandbox_execute")`, which goes
  through the session workflow (update-with-start, update, activities) on a
  local Temporal dev server, with the audit row queued to an `AuditWriter`
  as the HTTP and MCP servers queue it.

The targets are: create p50 <= 100 ms, execute p50 <= 1.5x the raw
subprocess p50. The raw p50 on the idle machine, before anything starts, is
printed for reference.

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


class Samples:
    """Seconds per call of each measured kind."""

    def __init__(self) -> None:
        self.raw: list[float] = []
        self.create: list[float] = []
        self.execute: list[float] = []


async def backend_level(runs: int, root: Path) -> Samples:
    from app.sandbox.local import LocalBackend

    # One spare, as a sandbox worker keeps by default (NEXUS_SANDBOX_SPARES).
    backend = LocalBackend(root, spares=1)
    samples = Samples()
    for index in range(runs):
        await asyncio.sleep(_SETTLE)
        samples.raw.append(raw_once())
        started = time.perf_counter()
        await backend.create(
            f"b{index}", template="base", timeout=600, env={}, metadata={}
        )
        samples.create.append(time.perf_counter() - started)
        started = time.perf_counter()
        await backend.run(
            f"b{index}",
            ["python3", "-c", CODE],
            env={},
            cwd=None,
            timeout=30,
            output_limit=65536,
        )
        samples.execute.append(time.perf_counter() - started)
        await backend.delete(f"b{index}")
    await backend.close()
    return samples


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


async def tool_level(runs: int, root: Path) -> tuple[Samples, dict[str, list[float]]]:
    from temporalio.testing import WorkflowEnvironment

    from app.contracts.queues import ORCHESTRATION, SANDBOX
    from app.db.migrate import upgrade
    from app.services.audit_writer import AuditWriter
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
    samples = Samples()
    try:
        client = env.client
        async with running_workers(client, settings, [ORCHESTRATION, SANDBOX]):
            # Audit rows are queued and written in batches, as the HTTP and
            # MCP servers write them.
            writer = AuditWriter(settings.effective_database_url)
            ctx = ToolContext(
                settings, user_id="bench", temporal_client=client, audit_writer=writer
            )
            for _ in range(runs):
                await asyncio.sleep(_SETTLE)
                samples.raw.append(raw_once())
                started = time.perf_counter()
                created = await invoke_tool(ctx, "sandbox_create", {"template": "base"})
                samples.create.append(time.perf_counter() - started)
                started = time.perf_counter()
                await invoke_tool(
                    ctx,
                    "sandbox_execute",
                    {"sandbox_id": created["sandbox_id"], "code": CODE},
                )
                samples.execute.append(time.perf_counter() - started)
                await invoke_tool(
                    ctx, "sandbox_delete", {"sandbox_id": created["sandbox_id"]}
                )
            await writer.close()
        floor = await update_floor(client, runs)
    finally:
        from app.sandbox.local import LocalBackend
        from app.sandbox.runtime import get_backend

        backend = get_backend(settings)
        if isinstance(backend, LocalBackend):
            await backend.close()  # the in-process workers' spare runner
        await env.shutdown()
    return samples, floor


# Before each baseline sample, the previous round's background work (the
# deleted sandbox's cleanup, the audit batch) ends, so that it slows neither
# the baseline nor the path measured next.
_SETTLE = 0.05
_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"


def raw_once() -> float:
    started = time.perf_counter()
    subprocess.run([_PYTHON, "-c", CODE], capture_output=True, check=True)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    load_before = _load()
    with tempfile.TemporaryDirectory() as folder:
        idle = [raw_once() for _ in range(args.runs)]
        backend = await backend_level(args.runs, Path(folder) / "backend")
        tool, floor = await tool_level(args.runs, Path(folder) / "tool")
    from app.sandbox.local import find_bwrap

    mode = "bubblewrap" if find_bwrap() else "plain subprocess (no bwrap)"
    print(f"local sandbox isolation: {mode}; {args.runs} runs per figure")
    print(f"load average at start {load_before}, at end {_load()}")
    print(f"{'raw python3 -c, idle machine':35s} p50 {p50(idle):8.2f} ms  (reference)")
    for path, samples in (("backend", backend), ("tool", tool)):
        name = "LocalBackend" if path == "backend" else "workflow"
        baseline = p50(samples.raw)
        print(f"{path} path ({name}):")
        print(f"{'  raw python3 -c, same loop':35s} p50 {baseline:8.2f} ms  (baseline)")
        value = p50(samples.create)
        verdict = "meets" if value <= 100 else "misses"
        label = f"  {path} create"
        print(f"{label:35s} p50 {value:8.2f} ms  target <= 100 ms: {verdict}")
        value = p50(samples.execute)
        ratio = value / baseline
        verdict = "meets" if ratio <= 1.5 else "misses"
        label = f"  {path} execute"
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
    import uvloop

    # The in-process workers run on the event loop that `python -m workers`
    # gives them in `nexus up`.
    uvloop.run(main())
