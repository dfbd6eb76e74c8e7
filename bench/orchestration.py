"""Throughput and start-to-result latency of FlowNexusWorkflow against a
hand-written Temporal workflow, on one dev server in one run.

    python -m bench.orchestration [--executions 1,10,50] [--rounds R]

For each concurrency N, each round starts N executions at once of each kind
and waits for every result (at least 30 executions per kind and N). The
engine runs a 4-step `echo` chain (local activities, every transition
written to the database, eager start), the baseline a workflow of 4
sequential activities started the usual way. Latency is measured per
execution from the start call to its result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from app.contracts.queues import ORCHESTRATION
from app.contracts.workflows import WorkflowDefinition
from app.db.migrate import upgrade
from app.sandbox.secrets import load_key
from app.settings import Settings
from app.temporal.client import build_data_converter
from app.temporal.devserver import temporal_binary
from app.temporal.search_attributes import dev_server_args
from app.workflows import engine, store
from bench.baseline_workflow import BaselineFourStepWorkflow, baseline_noop
from workers.registry import QUEUE_LIMITS
from workers.run import build_worker

BASELINE_QUEUE = "bench-baseline"

DEFINITION = WorkflowDefinition.model_validate(
    {
        "name": "bench-four-echo",
        "steps": [
            {"name": "s1", "type": "echo", "params": {"v": "{{input.v}}"}},
            {
                "name": "s2",
                "type": "echo",
                "depends_on": ["s1"],
                "params": {"v": "{{steps.s1.output.v}}"},
            },
            {
                "name": "s3",
                "type": "echo",
                "depends_on": ["s2"],
                "params": {"v": "{{steps.s2.output.v}}"},
            },
            {
                "name": "s4",
                "type": "echo",
                "depends_on": ["s3"],
                "params": {"v": "{{steps.s3.output.v}}"},
            },
        ],
    }
)


async def measure(
    count: int, run_one: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float]]:
    """Run `count` executions at once; return (wall seconds, latencies ms)."""
    latencies: list[float] = []

    async def timed(index: int) -> None:
        started = time.perf_counter()
        await run_one(index)
        latencies.append((time.perf_counter() - started) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(timed(i) for i in range(count)))
    return time.perf_counter() - began, latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(label: str, wall: float, latencies: list[float]) -> dict[str, float]:
    result = {
        "throughput": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
    }
    print(
        f"{label:<10} {len(latencies):>5} runs  {result['throughput']:8.1f} runs/s  "
        f"p50 {result['p50']:7.1f} ms  p95 {result['p95']:7.1f} ms"
    )
    return result


async def main(levels: list[int], rounds: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    settings = Settings(data_dir=data_dir, temporal_address="127.0.0.1:1")
    upgrade(settings.effective_database_url)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal_binary()),
        data_converter=build_data_converter(settings),
        dev_server_extra_args=dev_server_args(),
    )
    client: Client = env.client
    address = str(client.service_client.config.target_host)
    settings = settings.model_copy(update={"temporal_address": address})
    row, version, _, _ = store.save_definition(
        settings.effective_database_url, DEFINITION, key=load_key(settings)
    )
    limits = QUEUE_LIMITS[ORCHESTRATION]
    baseline_worker = Worker(
        client,
        task_queue=BASELINE_QUEUE,
        workflows=[BaselineFourStepWorkflow],
        activities=[baseline_noop],
        max_concurrent_workflow_tasks=limits.max_concurrent_workflow_tasks,
        max_concurrent_activities=limits.max_concurrent_activities,
    )

    async def run_engine(index: int) -> None:
        handle = await engine.start_execution(
            client, row.id, version, DEFINITION, {"v": index}
        )
        state = await handle.result()
        assert state.status == "completed" and state.steps[3].output == {"v": index}

    async def run_baseline(index: int) -> None:
        result = await client.execute_workflow(
            BaselineFourStepWorkflow.run,
            {"v": index},
            id=f"baseline-{uuid.uuid4().hex}",
            task_queue=BASELINE_QUEUE,
        )
        assert result["v"] == index

    print(
        f"{rounds}+ rounds per concurrency, Temporal dev server at {address}, "
        f"SQLite at {data_dir}"
    )
    rows: list[tuple[int, dict[str, float], dict[str, float]]] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(build_worker(client, settings, ORCHESTRATION))
        await stack.enter_async_context(baseline_worker)
        await measure(10, run_engine)  # warm up both paths
        await measure(10, run_baseline)
        for executions in levels:
            engine_all: list[float] = []
            baseline_all: list[float] = []
            engine_wall = baseline_wall = 0.0
            for _ in range(max(rounds, -(-30 // executions))):
                wall, latencies = await measure(executions, run_baseline)
                baseline_wall += wall
                baseline_all += latencies
                wall, latencies = await measure(executions, run_engine)
                engine_wall += wall
                engine_all += latencies
            print(f"-- {executions} concurrent executions per kind")
            baseline = summary("baseline", baseline_wall, baseline_all)
            flow = summary("engine", engine_wall, engine_all)
            print(
                f"ratio engine/baseline: throughput "
                f"{flow['throughput'] / baseline['throughput']:.2f}"
                f"  p50 latency {flow['p50'] / baseline['p50']:.2f}"
                f"  p95 latency {flow['p95'] / baseline['p95']:.2f}",
                flush=True,
            )
            rows.append((executions, baseline, flow))
    print(
        "\n| concurrent | baseline runs/s | engine runs/s | throughput ratio "
        "| baseline p50 / p95 ms | engine p50 / p95 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for executions, baseline, flow in rows:
        print(
            f"| {executions} | {baseline['throughput']:.1f} | "
            f"{flow['throughput']:.1f} | "
            f"{flow['throughput'] / baseline['throughput']:.2f} | "
            f"{baseline['p50']:.0f} / {baseline['p95']:.0f} | "
            f"{flow['p50']:.0f} / {flow['p95']:.0f} |"
        )
    await env.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--executions",
        default="1,10,50",
        help="Comma-separated numbers of executions started at once.",
    )
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    levels = [int(n) for n in arguments.executions.split(",") if n.strip()]
    asyncio.run(main(levels, arguments.rounds))
