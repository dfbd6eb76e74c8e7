"""A measured load of real platform operations: each one a workflow execution
that writes a row and reads it back through an activity."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from temporalio.client import Client

from app.benchmark.stats import percentile
from app.contracts.benchmark import LoadRequest, LoadResult
from app.contracts.queues import ORCHESTRATION

OperationCallback = Callable[[bool, float, str | None], None]


async def run_load(
    client: Client,
    request: LoadRequest,
    on_operation: OperationCallback | None = None,
) -> LoadResult:
    """Run `operations` load workflows, `concurrency` at a time, and time each
    from start to result; `on_operation(ok, latency_ms, error)` sees each."""
    semaphore = asyncio.Semaphore(request.concurrency)
    latencies: list[float] = []
    errors: list[str] = []

    async def one(index: int) -> None:
        async with semaphore:
            started = time.perf_counter()
            try:
                await client.execute_workflow(
                    "LoadOperationWorkflow",
                    {"run_id": request.run_id, "cycle": request.cycle, "index": index},
                    id=f"{request.run_id}-load-{request.label}-{uuid.uuid4().hex[:8]}",
                    task_queue=ORCHESTRATION,
                )
            except Exception as error:  # counted as a failed operation
                message = f"{type(error).__name__}: {error}"
                errors.append(message)
                if on_operation:
                    on_operation(False, (time.perf_counter() - started) * 1000, message)
                return
            latency = (time.perf_counter() - started) * 1000
            latencies.append(latency)
            if on_operation:
                on_operation(True, latency, None)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(request.operations)))
    seconds = time.perf_counter() - started
    return LoadResult(
        label=request.label,
        operations=request.operations,
        succeeded=len(latencies),
        concurrency=request.concurrency,
        seconds=round(seconds, 3),
        throughput_per_second=round(len(latencies) / seconds, 3) if seconds else 0.0,
        latency_p50_ms=round(percentile(latencies, 0.5), 3) if latencies else 0.0,
        latency_p95_ms=round(percentile(latencies, 0.95), 3) if latencies else 0.0,
        latency_p99_ms=round(percentile(latencies, 0.99), 3) if latencies else 0.0,
        errors=errors[:10],
    )
