"""Activities of the capability step types: each calls the capability's tools."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeat_every
from activities.workflows import parse_params, require_group, step_error
from app.benchmark.integration import run_stream_load
from app.benchmark.load import run_load
from app.contracts.benchmark import LoadRequest
from app.contracts.swarm import TaskWork
from app.contracts.workflows import StepOutcome, StepRequest
from app.integration.steps import (
    CrossSystemParams,
    MonitoringParams,
    NeuralComputationParams,
    PerformanceOptimizationParams,
    SandboxExecutionParams,
    ScalabilityParams,
    StreamingParams,
    SwarmOrchestrationParams,
)
from app.sandbox.runtime import redact
from app.sandbox.secrets import SealError, load_key
from app.services.audit import list_calls
from app.services.memory import read_memory
from app.settings import Settings
from app.swarm.agent_tasks import AgentTaskError, run_on_agent, step_task_id
from app.swarm.resolver import find_agent
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from app.tools.registry import _registry
from app.workflows.secrets import unseal_values

# The read-only tool call that proves each system responds.
SYSTEM_PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "sandbox": ("sandbox_list", {}),
    "swarm": ("swarm_list", {"status": "all"}),
    "neural": ("neural_list_models", {}),
    "realtime": ("realtime_list", {}),
    "storage": ("storage_list", {"bucket": "workflow-checks"}),
    "workflows": ("workflow_list", {"limit": 1}),
}


def step_call_id(request: StepRequest) -> str:
    """Return the sandbox call id of a step, the same for all its attempts.
    It is a digest, because ids and step names may contain characters that a
    call id may not."""
    digest = hashlib.sha256(f"{request.execution_id}/{request.step}".encode())
    return f"step-{digest.hexdigest()[:32]}"


def step_user(execution_id: str, step: str) -> str:
    """Return the user that a step's tool calls run as, in the audit log."""
    return f"workflow:{execution_id}/{step}"


# Seconds between the swarm step's heartbeats; its step type's heartbeat
# timeout is several times this.
SWARM_HEARTBEAT_SECONDS = 10.0
# Seconds between the heartbeats of a `sandbox_execution` step that runs in
# a sandbox of its own. Its step type's heartbeat timeout is several times this.
SANDBOX_STEP_HEARTBEAT_SECONDS = 5.0
# Seconds between the heartbeats of a `sandbox_execution` step that runs on
# an agent. A cancel of the step reaches it only in the response to a
# heartbeat, and the worker sends at most one per
# max_heartbeat_throttle_interval (5 s, see workers/run.py).
AGENT_STEP_HEARTBEAT_SECONDS = 2.0


def failed_step(
    request: StepRequest, message: str, output: dict[str, Any], kind: str
) -> ApplicationError:
    """Build the non-retryable error of a step whose work ran and failed; the
    output and the attempt travel in the error's details."""
    return ApplicationError(
        f"step {request.step!r} ({request.type}): {message}",
        output,
        {"attempt": activity.info().attempt},
        type=kind,
        non_retryable=True,
    )


def describe_code_failure(
    status: str, exit_code: int | None, stdout: str, stderr: str
) -> str:
    """Say how the code ended: the status, the exit code when there is one,
    and the last 500 characters of stderr, or of stdout when stderr is empty."""
    text = f"the code ended {status}"
    if exit_code is not None:
        text += f" with exit code {exit_code}"
    if stderr.strip():
        return f"{text}; stderr ends: {stderr.strip()[-500:]}"
    if stdout.strip():
        return f"{text}; stderr is empty, stdout ends: {stdout.strip()[-500:]}"
    return f"{text}; it printed nothing to stdout or stderr"


# Minimum seconds left before an attempt's start-to-close deadline to create
# a sandbox or start a program. With less, the server reports the attempt
# timed out (and maybe the run failed) before that work would even start.
START_MARGIN_SECONDS = 1.0


def _require_time_left(request: StepRequest, what: str) -> None:
    """Raise an ApplicationError when less than START_MARGIN_SECONDS is left
    of this attempt's start-to-close timeout."""
    info = activity.info()
    if info.start_to_close_timeout is None:
        return
    deadline = info.started_time + info.start_to_close_timeout
    left = (deadline - datetime.now(UTC)).total_seconds()
    if left < START_MARGIN_SECONDS:
        raise ApplicationError(
            f"step {request.step!r}: this attempt's timeout ran out before {what}; "
            "raise the step's timeout",
            type="StepTimedOut",
        )


class IntegrationActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _context(self, request: StepRequest) -> ToolContext:
        return ToolContext(
            self.settings,
            user_id=step_user(request.execution_id, request.step),
            groups=None if request.groups is None else tuple(request.groups),
            temporal_client=activity.client(),
        )

    async def _call(
        self, request: StepRequest, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        load_tools()
        if tool not in _registry:
            raise step_error(
                request,
                f"not available: this installation has no {tool} tool",
                kind="StepTypeNotAvailable",
                non_retryable=True,
            )
        try:
            return await invoke_tool(self._context(request), tool, arguments)
        except ToolError as error:
            raise step_error(
                request,
                f"{tool} failed: {error.message}",
                kind="ToolFailed",
                # Invalid, missing or forbidden things stay so on a retry.
                non_retryable=error.kind
                in ("invalid_argument", "not_found", "forbidden"),
            ) from None

    @activity.defn(name="step_sandbox_execution")
    async def sandbox_execution(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, SandboxExecutionParams)
        if request.agent_id is not None:
            return await self._sandbox_execution_on_agent(request, params)
        env = self._step_env(request, params)
        sandbox_id = params.sandbox_id
        created = sandbox_id is None
        run: dict[str, Any] = {}
        # Heartbeats let the server retry the step soon after its worker
        # dies, and let a cancel reach this attempt while it waits.
        heartbeat = asyncio.create_task(heartbeat_every(SANDBOX_STEP_HEARTBEAT_SECONDS))
        try:
            if sandbox_id is None:
                await self._delete_earlier_sandboxes(request)
                _require_time_left(request, "its sandbox was created")
                new_sandbox = await self._call(
                    request,
                    "sandbox_create",
                    {"template": params.template, "env_vars": env},
                )
                sandbox_id = new_sandbox["sandbox_id"]
            elif env:
                # A sandbox of its own takes the step's env vars for this run
                # only.
                run["env_vars"] = env
            if env:
                # Every env var value of the step is a secret, whatever its
                # name. The sandbox masks them before its result reaches the
                # session's history and logs.
                run["mask_env_vars"] = sorted(env)
            try:
                _require_time_left(request, "its program started")
                result = await self._call(
                    request,
                    "sandbox_execute",
                    {
                        "sandbox_id": sandbox_id,
                        "code": params.code,
                        "language": params.language,
                        "timeout": params.timeout,
                        # One call id for every attempt of the step: when a
                        # worker dies, the next attempt gets the program's
                        # run in the named sandbox, which its session goes on
                        # with, rather than start a second run beside it.
                        "call_id": step_call_id(request),
                        **run,
                    },
                )
            finally:
                if created:
                    await self._call(
                        request, "sandbox_delete", {"sandbox_id": sandbox_id}
                    )
        finally:
            heartbeat.cancel()
        # The sandbox masked them already. Masking again keeps the step's
        # output and error, which go into history and the database, free of
        # them even from a sandbox worker older than `mask_env_vars`.
        secrets = list(env.values())
        stdout = redact(result["stdout"], secrets)
        stderr = redact(result["stderr"], secrets)
        output = {
            "sandbox_id": sandbox_id,
            "stdout": stdout,
            "stderr": stderr,
            "exit_code": result["exit_code"],
            "status": result["status"],
            "execution_time": result["execution_time"],
            "recreated": result.get("recreated", 0),
        }
        if result["status"] != "completed":
            raise failed_step(
                request,
                describe_code_failure(
                    result["status"], result["exit_code"], stdout, stderr
                ),
                output,
                "SandboxCodeFailed",
            )
        return StepOutcome(output=output, attempt=activity.info().attempt)

    async def _delete_earlier_sandboxes(self, request: StepRequest) -> None:
        """Delete the sandboxes that earlier attempts of this step created and
        could not delete, since their worker died, which also stops the
        programs still running in them.

        The audit log names them: each `sandbox_create` of the step runs as
        the step's user, and its audit row is written before the call
        returns. A sandbox that the step's params name is never created by
        the step, so it is never deleted here.
        NOTE: a worker that dies between the sandbox's start and that write
        leaves the sandbox unnamed, until its timeout ends it."""
        earlier = await self._created_by_earlier_attempts(
            request, "sandbox_create", "sandbox_id"
        )
        if not earlier:
            return
        # A deleted sandbox leaves the list, and a stopped one still contains
        # its files, which the attempt that created it would have deleted.
        listed = await invoke_tool(
            self._context(request), "sandbox_list", {"status": "all"}
        )
        present = {sandbox["sandbox_id"] for sandbox in listed["sandboxes"]}
        for sandbox_id in earlier:
            if sandbox_id not in present:
                continue  # deleted by the attempt that created it
            try:
                await invoke_tool(
                    self._context(request),
                    "sandbox_delete",
                    {"sandbox_id": sandbox_id},
                )
            except ToolError as error:
                if error.kind != "not_found":
                    raise step_error(
                        request,
                        f"sandbox_delete of {sandbox_id}, left by an earlier "
                        f"attempt, failed: {error.message}",
                        kind="ToolFailed",
                        non_retryable=False,
                    ) from None
                continue
            activity.logger.warning(
                "deleted sandbox %s, left by an earlier attempt of step %s",
                sandbox_id,
                request.step,
            )

    def _step_env(
        self, request: StepRequest, params: SandboxExecutionParams
    ) -> dict[str, str]:
        """Unseal the step's env var values, right before a sandbox gets them."""
        if not params.env_vars:
            return {}
        try:
            return unseal_values(
                load_key(self.settings),
                request.workflow_id,
                request.step,
                params.env_vars,
            )
        except SealError as error:
            raise step_error(
                request,
                f"params.env_vars: {error}; store the definition again with "
                "workflow_create and the plain values",
                kind="InvalidStepParams",
                non_retryable=True,
            ) from None

    async def _sandbox_execution_on_agent(
        self, request: StepRequest, params: SandboxExecutionParams
    ) -> StepOutcome:
        """Run the code as a task of the agent's swarm on that agent, in the
        agent's sandbox, so the swarm's events and the agent's counters show
        the step."""
        assert request.agent_id is not None
        # The task runs without the tool layer, as task_orchestrate's code
        # tasks do, so it needs what that tool needs.
        require_group(request, "swarm")
        if params.sandbox_id is not None or params.env_vars:
            raise step_error(
                request,
                f"params sandbox_id and env_vars do not apply to a step run by "
                f"agent {request.agent_id} (it runs in the agent's sandbox); "
                "remove them or remove the step's agent",
                kind="InvalidStepParams",
                non_retryable=True,
            )

        found = await asyncio.to_thread(find_agent, self.settings, request.agent_id)
        if found is None:
            raise step_error(
                request,
                f"agent {request.agent_id} is not in the swarm mirror; assign "
                "another agent type with workflow_agent_assign",
                kind="AgentNotFound",
                non_retryable=True,
            )
        agent, swarm = found

        work = TaskWork(
            kind="code",
            task=f"workflow step {request.step} of execution {request.execution_id}",
            code=params.code,
            language=params.language,
            timeout_seconds=params.timeout,
        )
        # The heartbeats let the server retry the step soon after its worker
        # dies, and receive a cancel of the step, which then cancels the task.
        heartbeat = asyncio.create_task(heartbeat_every(AGENT_STEP_HEARTBEAT_SECONDS))
        try:
            progress = await run_on_agent(
                activity.client(),
                swarm.swarm_id,
                agent.agent_id,
                step_task_id(swarm.swarm_id, request.execution_id, request.step),
                work,
                cancel_reason=(
                    f"workflow step {request.step!r} of execution "
                    f"{request.execution_id} was cancelled"
                ),
            )
        except AgentTaskError as error:
            raise step_error(
                request, str(error), kind="AgentUnavailable", non_retryable=True
            ) from None
        finally:
            heartbeat.cancel()

        ran = progress.steps[0] if progress.steps else None
        output = {
            "agent_id": agent.agent_id,
            "agent_name": agent.name,
            "agent_type": agent.type,
            "swarm_id": swarm.swarm_id,
            "task_id": progress.task_id,
            "sandbox_id": ran.sandbox_id if ran else None,
            "stdout": ran.stdout if ran else "",
            "stderr": ran.stderr if ran else "",
            "exit_code": ran.exit_code if ran else None,
            "status": progress.status,
            "execution_time": (ran.duration_ms or 0.0) / 1000 if ran else 0.0,
        }
        if progress.status != "completed":
            raise failed_step(
                request,
                f"agent {agent.name} ({agent.agent_id}) ran the code and the task "
                f"ended {progress.status}: {progress.error}",
                output,
                "SandboxCodeFailed",
            )
        return StepOutcome(output=output, attempt=activity.info().attempt)

    @activity.defn(name="step_neural_computation")
    async def neural_computation(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, NeuralComputationParams)
        if params.mode == "predict":
            if not params.model_id or params.input is None:
                raise step_error(
                    request,
                    "mode predict needs params model_id and input",
                    kind="InvalidStepParams",
                    non_retryable=True,
                )
            output = await self._call(
                request,
                "neural_predict",
                {"model_id": params.model_id, "input": params.input},
            )
            return StepOutcome(output=output, attempt=activity.info().attempt)
        heartbeat = asyncio.create_task(heartbeat_every(20))
        try:
            output = await self._call(
                request,
                "neural_train",
                {
                    "config": {
                        "architecture": {"type": params.architecture},
                        "training": {
                            "epochs": params.epochs,
                            "batch_size": params.batch_size,
                            "learning_rate": params.learning_rate,
                        },
                    },
                    "dataset": params.dataset,
                    "tier": params.tier,
                },
            )
        finally:
            heartbeat.cancel()
        return StepOutcome(output=output, attempt=activity.info().attempt)

    async def _created_by_earlier_attempts(
        self, request: StepRequest, tool: str, id_field: str
    ) -> list[str]:
        """Return the ids that successful `tool` calls of this step's earlier
        attempts created, from the audit log; none on the first attempt."""
        if activity.info().attempt == 1:
            return []
        # A restarted worker may not have loaded the tools yet, and an unknown
        # tool's error would pass for a resource that is gone already.
        load_tools()
        calls = await asyncio.to_thread(
            list_calls,
            self.settings.effective_database_url,
            user_id=step_user(request.execution_id, request.step),
            tool=tool,
            limit=10_000,
        )
        return [
            call.ids[id_field]
            for call in calls
            if call.outcome == "success" and id_field in call.ids
        ]

    async def _destroy_earlier_swarms(self, request: StepRequest) -> None:
        """Destroy the swarms that earlier attempts of this step created and
        could not destroy, since their worker died.

        The audit log names them: each `swarm_init` of the step runs as the
        step's user, and its audit row is written before the call returns.
        NOTE: a worker that dies between the swarm's start and that write
        leaves the swarm unnamed, until its timeout ends it."""
        earlier = await self._created_by_earlier_attempts(
            request, "swarm_init", "swarm_id"
        )
        if not earlier:
            return
        listed = await invoke_tool(
            self._context(request), "swarm_list", {"status": "active"}
        )
        active = {swarm["swarm_id"] for swarm in listed["swarms"]}
        for swarm_id in earlier:
            if swarm_id not in active:
                continue  # destroyed by the attempt that created it
            try:
                await invoke_tool(
                    self._context(request), "swarm_destroy", {"swarm_id": swarm_id}
                )
            except ToolError as error:
                if error.kind != "not_found":
                    raise step_error(
                        request,
                        f"swarm_destroy of {swarm_id}, left by an earlier "
                        f"attempt, failed: {error.message}",
                        kind="ToolFailed",
                        non_retryable=False,
                    ) from None
                continue
            activity.logger.warning(
                "destroyed swarm %s, left by an earlier attempt of step %s",
                swarm_id,
                request.step,
            )

    @activity.defn(name="step_swarm_orchestration")
    async def swarm_orchestration(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, SwarmOrchestrationParams)
        await self._destroy_earlier_swarms(request)
        swarm_ids: list[str] = []
        heartbeat: asyncio.Task[None] | None = None
        try:
            for _ in range(params.swarms):
                swarm = await self._call(
                    request,
                    "swarm_init",
                    {"topology": params.topology, "maxAgents": params.agents},
                )
                swarm_ids.append(swarm["swarm_id"])
            # Heartbeats let a cancel reach this attempt while it waits.
            heartbeat = asyncio.create_task(heartbeat_every(SWARM_HEARTBEAT_SECONDS))
            for swarm_id in swarm_ids:
                for index in range(params.agents):
                    # A hierarchical swarm's root splits and delegates.
                    kind = "coordinator" if index == 0 else "coder"
                    await self._call(
                        request,
                        "agent_spawn",
                        {"type": kind, "swarm_id": swarm_id},
                    )
            tasks = [
                await self._call(
                    request,
                    "task_orchestrate",
                    {
                        "task": params.task,
                        "swarm_id": swarm_id,
                        "code": params.code,
                        "language": params.language,
                    },
                )
                for swarm_id in swarm_ids
            ]
            results = await asyncio.gather(
                *(
                    self._call(
                        request,
                        "task_results",
                        {
                            "task_id": task["task_id"],
                            "wait_seconds": params.timeout_seconds,
                        },
                    )
                    for task in tasks
                )
            )
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            for swarm_id in swarm_ids:
                await self._call(request, "swarm_destroy", {"swarm_id": swarm_id})
        failed = [r for r in results if r["status"] != "completed"]
        output = {
            "swarms": [
                {
                    "swarm_id": r["swarm_id"],
                    "task_id": r["task_id"],
                    "status": r["status"],
                    "agents": len(r["results"]),
                    "duration_ms": r["duration_ms"],
                    "output": (r["output"] or "")[-2000:],
                }
                for r in results
            ]
        }
        if failed:
            raise failed_step(
                request,
                f"{len(failed)} of {len(results)} swarm tasks ended "
                f"{failed[0]['status']}: {failed[0]['error']}",
                output,
                "SwarmTaskFailed",
            )
        return StepOutcome(output=output, attempt=activity.info().attempt)

    @activity.defn(name="step_real_time_streaming")
    async def real_time_streaming(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, StreamingParams)

        async def call(tool: str, arguments: dict[str, Any], **_: Any) -> Any:
            return await self._call(request, tool, arguments)

        output = await run_stream_load(
            call,
            self.settings,
            scope=(f"step-{request.execution_id}-{request.step}", 0),
            total=params.events,
            streams=params.streams,
        )
        if output["events_lost"] or output["duplicates"]:
            raise failed_step(
                request,
                f"{output['events_lost']} events lost and {output['duplicates']} "
                "delivered twice",
                output,
                "EventsLost",
            )
        return StepOutcome(output=output, attempt=activity.info().attempt)

    @activity.defn(name="step_real_time_monitoring")
    async def real_time_monitoring(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, MonitoringParams)
        arguments: dict[str, Any] = {"table": params.table, "event": params.event}
        if params.filter:
            arguments["filter"] = params.filter
        subscription = await self._call(request, "realtime_subscribe", arguments)
        subscription_id = subscription["subscription_id"]
        try:
            batch = await self._call(
                request,
                "realtime_events",
                {
                    "subscription_id": subscription_id,
                    "limit": params.limit,
                    "wait_ms": params.wait_ms,
                },
            )
        finally:
            await self._call(
                request, "realtime_unsubscribe", {"subscription_id": subscription_id}
            )
        output = {"subscription_id": subscription_id, **batch}
        return StepOutcome(output=output, attempt=activity.info().attempt)

    @activity.defn(name="step_cross_system_integration")
    async def cross_system_integration(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, CrossSystemParams)
        checks: dict[str, dict[str, Any]] = {}
        failures: list[str] = []
        for system in params.systems:
            tool, arguments = SYSTEM_PROBES[system]
            started = time.perf_counter()
            try:
                await self._call(request, tool, arguments)
            except ApplicationError as error:
                failures.append(f"{system}: {error.message}")
                checks[system] = {"ok": False, "error": error.message}
                continue
            checks[system] = {
                "ok": True,
                "tool": tool,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        output = {"systems": checks, "upstream_steps": sorted(request.upstream)}
        if failures:
            raise failed_step(
                request,
                "; ".join(failures),
                output,
                "SystemCheckFailed",
            )
        return StepOutcome(output=output, attempt=activity.info().attempt)

    @activity.defn(name="step_performance_optimization")
    async def performance_optimization(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, PerformanceOptimizationParams)
        before = read_memory()
        collected = gc.collect() if params.collect_garbage else 0
        after = read_memory()
        output = {
            "objects_collected": collected,
            "rss_before": before.rss,
            "rss_after": after.rss,
            "heap_used_before": before.heap_used,
            "heap_used_after": after.heap_used,
            "rss_freed": before.rss - after.rss,
        }
        return StepOutcome(output=output, attempt=activity.info().attempt)

    @activity.defn(name="step_scalability_validation")
    async def scalability_validation(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, ScalabilityParams)
        run_id = f"step-{request.execution_id}-{uuid.uuid4().hex[:6]}"
        results = {}
        for label, factor in (("baseline", 1), ("scaled", params.multiplier)):
            result = await run_load(
                activity.client(),
                LoadRequest(
                    run_id=run_id,
                    cycle=0,
                    label=label,
                    operations=params.operations * factor,
                    concurrency=params.concurrency * factor,
                ),
            )
            if result.succeeded < result.operations:
                raise step_error(
                    request,
                    f"{result.operations - result.succeeded} of {result.operations} "
                    f"{label} operations failed: {result.errors[:1]}",
                    kind="LoadFailed",
                    non_retryable=False,
                )
            results[label] = result.model_dump(exclude={"errors"})
        baseline = results["baseline"]["throughput_per_second"]
        scaled = results["scaled"]["throughput_per_second"]
        output = {
            **results,
            "multiplier": params.multiplier,
            "throughput_ratio": round(scaled / baseline, 3) if baseline else 0.0,
        }
        return StepOutcome(output=output, attempt=activity.info().attempt)
