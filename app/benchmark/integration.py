"""Parts of phases that reach into a capability beyond its tools: losing a
sandbox from outside, waiting for training, the streaming load, and the
cross-system checks."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from app.settings import Settings

if TYPE_CHECKING:
    from app.benchmark.phases import PhaseRunner


def claude_code_ready(settings: Settings) -> bool:
    """True where the `claude` command and an Anthropic key both exist."""
    return shutil.which("claude") is not None and settings.anthropic_api_key is not None


async def lose_sandbox(runner: PhaseRunner, sandbox_id: str) -> str:
    """Kill the session's sandbox on its backend, as an expiry or a crash
    would, without telling the session; return the backend id."""
    from app.sandbox.service import discard_backend_sandbox

    return await discard_backend_sandbox(runner.client, runner.settings, sandbox_id)


def _matches(filter_index: int, phase: str, sequence: int, half: int) -> bool:
    """Whether a row passes STREAM_FILTERS[filter_index], evaluated here to
    know how many events each subscription must receive."""
    return [
        phase in ("phase_1", "phase_2", "phase_3", "phase_4"),
        phase == "phase_1",
        phase != "phase_1",
        sequence < half,
        sequence >= half,
    ][filter_index]


ToolCall = Callable[..., Awaitable[dict[str, Any]]]


async def stream_load(runner: PhaseRunner) -> dict[str, Any]:
    """The streaming phase: the load below, with every call counted."""
    from app.benchmark.phases import PhaseFailed

    outcome = await run_stream_load(
        runner.call,
        runner.settings,
        scope=(runner.request.run_id, runner.request.cycle),
        total=runner.config.stream_events,
        streams=runner.config.streams,
    )
    runner.metrics.update(outcome)
    lost, duplicates = outcome["events_lost"], outcome["duplicates"]
    runner.check(
        "no_events_lost",
        lost == 0 and duplicates == 0,
        f"{lost} events lost and {duplicates} delivered twice across "
        f"{outcome['subscriptions']} subscriptions",
    )
    if lost:
        raise PhaseFailed(f"{lost} events lost")
    return outcome


async def run_stream_load(
    call: ToolCall,
    settings: Settings,
    *,
    scope: tuple[str, int],
    total: int,
    streams: int,
) -> dict[str, Any]:
    """Insert `total` rows into extended_duration_test_events while `streams`
    filtered subscriptions consume them, and count what each receives against
    what its filter admits. `scope` is the (run_id, cycle) the rows carry."""
    from app.benchmark.phases import STREAM_FILTERS
    from app.benchmark.stats import percentile

    run_id, cycle = scope
    half = total // 2
    prefix = f"run_id=eq.{run_id},cycle=eq.{cycle}"
    # Past the five filters, subscriptions reuse them in turn, so every
    # requested subscription exists and consumes its share of the load.
    kinds = [index % len(STREAM_FILTERS) for index in range(streams)]
    filters = [STREAM_FILTERS[kind].format(half=half) for kind in kinds]
    subscriptions = []
    for text in filters:
        created = await call(
            "realtime_subscribe",
            {
                "table": "extended_duration_test_events",
                "event": "INSERT",
                "filter": f"{prefix},{text}",
            },
        )
        subscriptions.append(created["subscription_id"])
    phases = [f"phase_{1 + i % 5}" for i in range(total)]
    expected = [
        sum(_matches(kind, phases[i], i, half) for i in range(total)) for kind in kinds
    ]
    latencies: list[float] = []
    received = [0] * len(filters)
    duplicates = 0

    async def consume(index: int, subscription_id: str) -> None:
        nonlocal duplicates
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while received[index] < expected[index] and time.monotonic() < deadline:
            batch = await call(
                "realtime_events",
                {"subscription_id": subscription_id, "limit": 1000, "wait_ms": 1000},
            )
            now = time.time()
            for event in batch["events"]:
                row = event["new"]
                if row["sequence"] in seen:
                    duplicates += 1
                    continue
                seen.add(row["sequence"])
                received[index] += 1
                latencies.append((now - row["sent_at"]) * 1000)

    started = time.perf_counter()
    consumers = [
        asyncio.create_task(consume(i, sid)) for i, sid in enumerate(subscriptions)
    ]
    insert_seconds = await asyncio.to_thread(
        _insert_events, settings, run_id, cycle, phases
    )
    await asyncio.gather(*consumers)
    seconds = time.perf_counter() - started
    for subscription_id in subscriptions:
        await call("realtime_unsubscribe", {"subscription_id": subscription_id})
    delivered = sum(received)
    return {
        "subscriptions": len(filters),
        "events_inserted": total,
        "insert_seconds": round(insert_seconds, 3),
        "events_expected": sum(expected),
        "events_delivered": delivered,
        "events_lost": sum(expected) - delivered,
        "duplicates": duplicates,
        "delivered_per_second": round(delivered / seconds, 3) if seconds else 0.0,
        "latency_p50_ms": round(percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p99_ms": round(percentile(latencies, 0.99), 3) if latencies else None,
    }


def _insert_events(
    settings: Settings, run_id: str, cycle: int, phases: list[str]
) -> float:
    """Insert the rows in small transactions; return the seconds taken."""
    from app.benchmark.models import ExtendedDurationTestEvent
    from app.db import session_scope

    started = time.perf_counter()
    url = settings.effective_database_url
    batch = 50
    for offset in range(0, len(phases), batch):
        with session_scope(url) as session:
            for sequence in range(offset, min(offset + batch, len(phases))):
                session.add(
                    ExtendedDurationTestEvent(
                        run_id=run_id,
                        cycle=cycle,
                        test_phase=phases[sequence],
                        sequence=sequence,
                        sent_at=time.time(),
                    )
                )
    return time.perf_counter() - started


async def cross_system(runner: PhaseRunner) -> None:
    """Neural to workflow, swarm to realtime, storage to processing."""
    from app.benchmark.phases import PhaseFailed

    failures: list[str] = []
    for part in (_model_in_workflow, _swarm_events, _checkpoint_round_trip):
        try:
            await part(runner)
        except PhaseFailed as error:
            failures.append(f"{part.__name__.strip('_')}: {error}")
    if failures:
        raise PhaseFailed("; ".join(failures))


async def _model_in_workflow(runner: PhaseRunner) -> None:
    from app.benchmark.phases import PhaseFailed

    model_id = runner.request.carry.get("model_id")
    if not model_id:
        raise PhaseFailed("no trained model: the neural training phase did not pass")
    runner.require("workflow_create", "workflow_execute", "neural_predict")
    created = await runner.call(
        "workflow_create",
        {
            "name": f"benchmark-predict-{runner.request.run_id}-{runner.request.cycle}",
            "steps": [
                {
                    "name": "predict",
                    "type": "neural_computation",
                    "params": {
                        "mode": "predict",
                        "model_id": model_id,
                        "input": "{{input.rows}}",
                    },
                }
            ],
        },
    )
    rows = [[0.0] * 64, [8.0] * 64]
    executed = await runner.call(
        "workflow_execute",
        {
            "workflow_id": created["workflow_id"],
            "input_data": {"rows": rows},
            "async": False,
        },
    )
    steps = executed.get("result", executed)["steps"]
    predictions = steps[0]["output"].get("predictions", [])
    runner.check(
        "predictions_in_workflow",
        len(predictions) == len(rows),
        f"the workflow step returned {len(predictions)} predictions for "
        f"{len(rows)} rows",
    )
    runner.metrics["predictions"] = predictions


async def _swarm_events(runner: PhaseRunner) -> None:
    runner.require("swarm_init", "agent_spawn", "swarm_destroy", "realtime_subscribe")
    swarm = await runner.call(
        "swarm_init", {"topology": "star", "maxAgents": runner.config.swarm_size}
    )
    swarm_id = swarm["swarm_id"]
    try:
        subscription = await runner.call(
            "realtime_subscribe",
            {"table": "swarm_events", "filter": f"swarm_id=eq.{swarm_id}"},
        )
        for _ in range(runner.config.swarm_size):
            await runner.call("agent_spawn", {"type": "coder", "swarm_id": swarm_id})
        seen = 0
        deadline = time.monotonic() + 30
        while seen < runner.config.swarm_size and time.monotonic() < deadline:
            batch = await runner.call(
                "realtime_events",
                {
                    "subscription_id": subscription["subscription_id"],
                    "wait_ms": 1000,
                },
            )
            seen += batch["count"]
        await runner.call(
            "realtime_unsubscribe",
            {"subscription_id": subscription["subscription_id"]},
        )
        runner.metrics["swarm_events_seen"] = seen
        runner.check(
            "swarm_events_streamed",
            seen >= runner.config.swarm_size,
            f"saw {seen} swarm events for {runner.config.swarm_size} spawned agents",
        )
    finally:
        await runner.call("swarm_destroy", {"swarm_id": swarm_id})


async def _checkpoint_round_trip(runner: PhaseRunner) -> None:
    import base64
    import hashlib
    import os

    from app.benchmark.report import run_folder_name

    checkpoint = os.urandom(4096)
    folder = run_folder_name(runner.request.run_id)
    path = f"checkpoints/{folder}/cycle-{runner.request.cycle}.bin"
    await runner.call(
        "storage_upload",
        {
            "bucket": "benchmark-checkpoints",
            "path": path,
            "content": base64.b64encode(checkpoint).decode(),
            "encoding": "base64",
        },
    )
    downloaded = await runner.call(
        "storage_download",
        {"bucket": "benchmark-checkpoints", "path": path, "encoding": "base64"},
    )
    same = base64.b64decode(downloaded["content"]) == checkpoint
    runner.check(
        "checkpoint_verified",
        same,
        f"checkpoint {path} read back differs from what was written",
    )
    runner.metrics["checkpoint_sha256"] = hashlib.sha256(checkpoint).hexdigest()
