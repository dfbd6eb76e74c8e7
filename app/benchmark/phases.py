"""The six benchmark phases. Each drives real capabilities through the same
tools that MCP and HTTP clients call, and counts every operation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from temporalio.client import Client

from app.benchmark.leftovers import cancel_executions, definition_executions_query
from app.benchmark.load import run_load
from app.contracts.benchmark import (
    LoadRequest,
    LoadResult,
    OperationRecord,
    PhaseInput,
    PhaseName,
    PhaseRecord,
    PhaseResult,
)
from app.contracts.queues import NEURAL, SANDBOX, STREAMING
from app.services.health import describe_queue
from app.settings import Settings
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from app.tools.registry import _registry

logger = logging.getLogger(__name__)


class PhaseFailed(Exception):
    """A phase's operation failed; the message names it and the cause."""


class CapabilityUnavailable(PhaseFailed):
    """A tool the phase needs is not part of this installation."""


class PhaseRunner:
    """Runs one phase: calls tools, times and counts every operation."""

    def __init__(self, settings: Settings, client: Client, request: PhaseInput) -> None:
        self.settings = settings
        self.client = client
        self.request = request
        self.config = request.config
        self.ctx = ToolContext(
            settings, user_id=f"benchmark:{request.run_id}", temporal_client=client
        )
        self.operations: list[OperationRecord] = []
        self.metrics: dict[str, Any] = {}
        self.carry: dict[str, Any] = {}

    def record(
        self, name: str, ok: bool, latency_ms: float, error: str | None = None
    ) -> None:
        self.operations.append(
            OperationRecord(
                name=name, ok=ok, latency_ms=round(latency_ms, 3), error=error
            )
        )

    def require(self, *tools: str) -> None:
        load_tools()
        missing = [name for name in tools if name not in _registry]
        if missing:
            message = (
                f"not available: this installation has no {', '.join(missing)} "
                "tool, so the phase cannot run"
            )
            # Counted, so a phase that could not run lowers the success rate.
            self.record("capability_check", False, 0.0, message)
            raise CapabilityUnavailable(message)

    async def call(
        self, tool: str, arguments: dict[str, Any], *, name: str | None = None
    ) -> dict[str, Any]:
        """Invoke a tool, record it as one operation, and raise if it failed."""
        self.require(tool)
        started = time.perf_counter()
        try:
            result = await invoke_tool(self.ctx, tool, arguments)
        except ToolError as error:
            self.record(
                name or tool,
                False,
                (time.perf_counter() - started) * 1000,
                error.message,
            )
            raise PhaseFailed(f"{tool} failed: {error.message}") from error
        self.record(name or tool, True, (time.perf_counter() - started) * 1000)
        return result

    def check(self, name: str, condition: bool, message: str) -> None:
        """Record a verification as an operation; fail the phase if it is false.

        A check has latency 0, which keeps it out of the phase's calls per
        second and the latency figures."""
        self.record(name, condition, 0.0, None if condition else message)
        if not condition:
            raise PhaseFailed(message)


PhaseFunction = Callable[[PhaseRunner], Awaitable[None]]


async def sandbox_integration(runner: PhaseRunner) -> None:
    runner.require("sandbox_create", "sandbox_execute", "sandbox_delete")
    from app.benchmark.integration import claude_code_ready, lose_sandbox

    template = "claude-code" if claude_code_ready(runner.settings) else "python"
    runner.metrics["template"] = template
    # The operator's own run: its key goes to the sandbox as anthropic_key,
    # sealed like any caller's.
    own_key = runner.settings.anthropic_api_key
    key_argument = (
        {"anthropic_key": own_key.get_secret_value()}
        if template == "claude-code" and own_key is not None
        else {}
    )
    creation = asyncio.ensure_future(
        runner.call(
            "sandbox_create",
            {
                "template": template,
                "name": f"bench-{runner.request.run_id}-{runner.request.cycle}",
                "env_vars": {
                    "BENCH_RUN": runner.request.run_id,
                    "BENCH_CYCLE": str(runner.request.cycle),
                    "BENCH_API_KEY": "bench-secret-value",
                },
                "timeout": 7200,
                **key_argument,
            },
        )
    )
    try:
        created = await asyncio.shield(creation)
    except asyncio.CancelledError:
        # A creation in flight finishes, so that its sandbox can be deleted;
        # its session would otherwise run on until the 2-hour timeout.
        with contextlib.suppress(Exception):
            leftover = await creation
            await runner.call("sandbox_delete", {"sandbox_id": leftover["sandbox_id"]})
        raise
    sandbox_id = created["sandbox_id"]
    code = (
        "import os\n"
        "print(os.environ['BENCH_RUN'], os.environ['BENCH_CYCLE'], "
        "len(os.environ['BENCH_API_KEY']))"
    )
    try:
        first = await runner.call(
            "sandbox_execute", {"sandbox_id": sandbox_id, "code": code}
        )
        expected = (
            f"{runner.request.run_id} {runner.request.cycle} "
            f"{len('bench-secret-value')}"
        )
        runner.check(
            "env_vars_visible",
            first["stdout"].strip() == expected,
            f"sandbox printed {first['stdout']!r}, expected {expected!r}",
        )
        started = time.perf_counter()
        await lose_sandbox(runner, sandbox_id)
        runner.record("lose_sandbox", True, (time.perf_counter() - started) * 1000)
        second = await runner.call(
            "sandbox_execute",
            {"sandbox_id": sandbox_id, "code": code},
            name="sandbox_execute_after_loss",
        )
        recreated = int(second.get("recreated", 0))
        runner.check(
            "sandbox_recreated",
            recreated >= 1 and second["stdout"].strip() == expected,
            f"after the loss the session reported recreated={recreated} and "
            f"printed {second['stdout']!r}",
        )
        runner.metrics["recreated"] = recreated
        runner.metrics["execution_time_seconds"] = second.get("execution_time")
    finally:
        await runner.call("sandbox_delete", {"sandbox_id": sandbox_id})


def orchestration_definition(run_id: str, cycle: int) -> dict[str, Any]:
    """The 8-step definition of the orchestration phase."""
    steps = [
        {"name": "initialize", "type": "system_initialization", "params": {}},
        {
            "name": "coordinate_swarms",
            "type": "swarm_orchestration",
            "depends_on": ["initialize"],
            "params": {"swarms": 3, "topology": "hierarchical"},
        },
        {
            "name": "neural_processing",
            "type": "neural_computation",
            "depends_on": ["initialize"],
            "params": {"dataset": "iris", "epochs": 2, "tier": "nano"},
        },
        {
            "name": "stream",
            "type": "real_time_streaming",
            "depends_on": ["initialize"],
            "params": {"streams": 5, "table": "extended_duration_test_events"},
        },
        {
            "name": "integrate",
            "type": "cross_system_integration",
            "depends_on": ["coordinate_swarms", "neural_processing", "stream"],
            "params": {"systems": ["sandbox", "swarm", "neural", "realtime"]},
        },
        {
            "name": "optimize",
            "type": "performance_optimization",
            "depends_on": ["integrate"],
            "params": {},
        },
        {
            "name": "validate_scale",
            "type": "scalability_validation",
            "depends_on": ["optimize"],
            "params": {},
        },
        {
            "name": "report",
            "type": "reporting",
            "depends_on": ["validate_scale"],
            "params": {},
        },
    ]
    return {
        "name": f"benchmark-orchestration-{run_id}-{cycle}",
        "description": "Extended-duration benchmark: 8-step orchestration",
        "priority": 5,
        "steps": steps,
    }


async def multi_workflow_orchestration(runner: PhaseRunner) -> None:
    runner.require("workflow_create", "workflow_execute")
    request = runner.request
    definition = orchestration_definition(request.run_id, request.cycle)
    created = await runner.call("workflow_create", definition)
    workflow_id = created["workflow_id"]
    executions = runner.config.concurrent_executions
    try:
        results = await asyncio.gather(
            *(
                runner.call(
                    "workflow_execute",
                    {
                        "workflow_id": workflow_id,
                        "input_data": {"execution": index},
                        "async": False,
                    },
                )
                for index in range(executions)
            ),
            return_exceptions=True,
        )
    except asyncio.CancelledError:
        # The executions are not children of this phase, so they would run
        # on, and stop half done once the workers stop.
        with contextlib.suppress(Exception):
            await cancel_executions(
                runner.client, definition_executions_query(definition["name"])
            )
        raise
    failures = [r for r in results if isinstance(r, BaseException)]
    runner.metrics["executions"] = executions
    runner.metrics["executions_failed"] = len(failures)
    if failures:
        raise PhaseFailed(
            f"{len(failures)} of {executions} executions failed: {failures[0]}"
        )


async def neural_training(runner: PhaseRunner) -> None:
    runner.require(
        "neural_cluster_init",
        "neural_node_deploy",
        "neural_train_distributed",
        "neural_cluster_status",
        "neural_cluster_terminate",
    )
    cluster = await runner.call(
        "neural_cluster_init",
        {
            "name": f"bench-{runner.request.run_id}-{runner.request.cycle}",
            "topology": "mesh",
            "architecture": "hybrid",
            "consensus": "proof-of-learning",
        },
    )
    cluster_id = cluster["cluster_id"]
    try:
        for role in ("parameter_server", "worker", "worker", "validator"):
            await runner.call(
                "neural_node_deploy",
                {"cluster_id": cluster_id, "role": role},
                name=f"deploy_{role}",
            )
        session = await runner.call(
            "neural_train_distributed",
            {
                "cluster_id": cluster_id,
                "dataset": "digits",
                "epochs": runner.config.epochs,
                "federated": True,
                "wait": True,
            },
        )
        trained = session["result"]
        runner.metrics.update(
            {
                "session_id": session["session_id"],
                "mode": session["mode"],
                "rounds": trained["rounds_completed"],
                "rejections": trained["rounds_rejected"],
                "loss": trained["loss"],
                "accuracy": trained["accuracy"],
                "samples_per_second": trained["samples_per_second"],
                "training_time": trained["training_time"],
            }
        )
        runner.check(
            "model_learned",
            trained["accuracy"] > 0.5,
            f"accuracy {trained['accuracy']} on digits is below 0.5, so the "
            "cluster did not learn (chance is 0.1)",
        )
        runner.carry["model_id"] = trained["model_id"]
    finally:
        await runner.call("neural_cluster_terminate", {"cluster_id": cluster_id})


STREAM_FILTERS = (
    "test_phase=in.(phase_1,phase_2,phase_3,phase_4)",
    "test_phase=eq.phase_1",
    "test_phase=neq.phase_1",
    "sequence=lt.{half}",
    "sequence=gte.{half}",
)


async def realtime_streaming(runner: PhaseRunner) -> None:
    runner.require("realtime_subscribe", "realtime_events", "realtime_unsubscribe")
    from app.benchmark.integration import stream_load

    outcome = await stream_load(runner)
    runner.metrics.update(outcome)


async def cross_system_integration(runner: PhaseRunner) -> None:
    from app.benchmark.integration import cross_system

    await cross_system(runner)


async def performance_scalability(runner: PhaseRunner) -> None:
    config = runner.config
    request = runner.request
    results: list[LoadResult] = []
    stop = asyncio.Event()
    # The readings run beside both loads, so their RSS is this worker's under
    # load, since this worker runs the phase and the load's workflows.
    sampler = asyncio.create_task(
        sample_health(runner, stop, config.health_sample_seconds)
    )
    try:
        for label, multiplier in (("baseline", 1), ("scaled", config.load_multiplier)):
            name = f"load_{label}"
            result = await run_load(
                runner.client,
                LoadRequest(
                    run_id=request.run_id,
                    cycle=request.cycle,
                    label=label,
                    operations=config.baseline_operations * multiplier,
                    concurrency=config.baseline_concurrency * multiplier,
                ),
                on_operation=functools.partial(runner.record, name),
            )
            results.append(result)
            runner.metrics[label] = result.model_dump(exclude={"errors"})
    finally:
        stop.set()
        health_samples, health_failure = await sampler
    runner.metrics["health_samples_rss_mb"] = health_samples
    runner.metrics["health_sample_seconds"] = config.health_sample_seconds
    baseline, scaled = results
    runner.metrics["load_multiplier"] = config.load_multiplier
    runner.metrics["throughput_ratio"] = (
        round(scaled.throughput_per_second / baseline.throughput_per_second, 3)
        if baseline.throughput_per_second
        else 0.0
    )
    failures = []
    failed = sum(r.operations - r.succeeded for r in results)
    if failed:
        failures.append(f"{failed} load operations failed: {results[-1].errors[:1]}")
    if health_failure is not None:
        failures.append(f"health readings stopped: {health_failure}")
    if failures:
        raise PhaseFailed("; ".join(failures))


async def sample_health(
    runner: PhaseRunner, stop: asyncio.Event, interval: float
) -> tuple[list[float], PhaseFailed | None]:
    """Call `system_health` at once and then every `interval` seconds until
    `stop` is set.

    Returns:
        The RSS of each reading in MB, and the failed call that ended the
        readings early, or None.
    """
    from app.benchmark.report import MB

    samples: list[float] = []
    while True:
        try:
            health = await runner.call("system_health", {})
        except PhaseFailed as failure:
            return samples, failure
        samples.append(round(health["memory"]["rss"] / MB, 3))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return samples, None


PHASES: dict[str, PhaseFunction] = {
    "sandbox_integration": sandbox_integration,
    "multi_workflow_orchestration": multi_workflow_orchestration,
    "neural_training": neural_training,
    "realtime_streaming": realtime_streaming,
    "cross_system_integration": cross_system_integration,
    "performance_scalability": performance_scalability,
}


# The queues each phase's work runs on besides the orchestration queue, whose
# worker runs the phase itself. An activity on a queue without a worker waits
# for one without end, as Temporal intends, so the phase watches them.
PHASE_QUEUES: dict[str, tuple[str, ...]] = {
    "sandbox_integration": (SANDBOX,),
    "multi_workflow_orchestration": (NEURAL, SANDBOX, STREAMING),
    "neural_training": (NEURAL,),
    "realtime_streaming": (),
    "cross_system_integration": (NEURAL, SANDBOX, STREAMING),
    "performance_scalability": (STREAMING,),
}
# Seconds between two looks at a phase's queues, and how long a queue may
# have no live worker before the phase fails.
QUEUE_CHECK_SECONDS = 5.0
QUEUE_LOST_SECONDS = 30.0
# Seconds a phase that lost a queue's worker gets to end after its cancel.
LOST_PHASE_GRACE_SECONDS = 30.0


async def _watched(
    work: Awaitable[None], client: Client, namespace: str, queues: tuple[str, ...]
) -> None:
    """Run a phase's work; fail it once one of `queues` has had no live
    worker for QUEUE_LOST_SECONDS.

    Raises:
        PhaseFailed: a queue lost its workers; the message names the queue.
    """
    task = asyncio.ensure_future(work)
    if not queues:
        await task
        return
    try:
        await _watch(task, client, namespace, queues)
    except asyncio.CancelledError:
        # asyncio.wait leaves the awaited task alone: pass the phase's
        # cancel on, and let its work clean up as a cancelled phase does.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


async def _watch(
    task: asyncio.Future[None],
    client: Client,
    namespace: str,
    queues: tuple[str, ...],
) -> None:
    lost_since: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    while True:
        done, _ = await asyncio.wait({task}, timeout=QUEUE_CHECK_SECONDS)
        if done:
            task.result()
            return
        healths = await asyncio.gather(
            *(describe_queue(client, namespace, queue) for queue in queues)
        )
        now = loop.time()
        for queue, health in zip(queues, healths, strict=True):
            if health.status != "unhealthy":
                lost_since.pop(queue, None)
                continue
            since = lost_since.setdefault(queue, now)
            if now - since < QUEUE_LOST_SECONDS:
                continue
            task.cancel()
            await asyncio.wait({task}, timeout=LOST_PHASE_GRACE_SECONDS)
            if not task.done():
                logger.warning("a phase that lost queue %s is still ending", queue)
            raise PhaseFailed(
                f"no live worker has polled {queue} for {QUEUE_LOST_SECONDS:.0f} s "
                f"({health.error}), so this phase's work there cannot run; start "
                "that queue's worker (`nexus up` starts every worker)"
            )


async def run_phase(
    settings: Settings, client: Client, request: PhaseInput
) -> PhaseRecord:
    """Run one phase; a failure is recorded with its error, never raised."""
    runner = PhaseRunner(settings, client, request)
    started = datetime.now(UTC)
    error: str | None = None
    try:
        if request.phase in request.config.inject_failure:
            raise PhaseFailed(
                f"fault injected into {request.phase} by the run's config"
            )
        await _watched(
            PHASES[request.phase](runner),
            client,
            settings.namespace,
            PHASE_QUEUES[request.phase],
        )
    except PhaseFailed as failure:
        error = str(failure)
    except Exception as failure:  # a phase's bug must not stop the run
        logger.exception("benchmark phase %s crashed", request.phase)
        error = f"{type(failure).__name__}: {failure}"
    if error:
        logger.warning(
            "benchmark %s cycle %d phase %s failed: %s",
            request.run_id,
            request.cycle,
            request.phase,
            error,
        )
    operations = runner.operations
    result = PhaseResult(
        phase=request.phase,
        cycle=request.cycle,
        ok=error is None,
        error=error,
        operations=len(operations),
        succeeded=sum(1 for op in operations if op.ok),
        started_at=started,
        ended_at=datetime.now(UTC),
        metrics=json.loads(json.dumps(runner.metrics, default=str)),
        carry=runner.carry,
    )
    record = PhaseRecord(run_id=request.run_id, result=result, operations=operations)
    return record.with_failure_counted()


__all__ = ["PHASES", "PhaseName", "run_phase"]
