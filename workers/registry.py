"""What each task queue's worker runs, and how many tasks it takes at once.

Capabilities add their workflows and activities through `Capability`
entries in `CAPABILITIES`; a queue's worker registers what every capability
contributes to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from activities.benchmark import BenchmarkActivities
from activities.integration import IntegrationActivities
from activities.neural import neural_queue_activities, orchestration_activities
from activities.realtime import RealtimeActivities
from activities.sandbox import SandboxActivities, SandboxRecordActivities
from activities.swarm import (
    SwarmActivities,
    SwarmMirrorActivities,
    watch_task_close,
)
from activities.system import ProbeActivities, SystemActivities
from activities.workflows import WorkflowActivities
from app.contracts import queues
from app.settings import Settings
from workflows.benchmark import (
    BenchmarkPhaseWorkflow,
    ExtendedDurationBenchmarkWorkflow,
    LoadOperationWorkflow,
    MetricsSamplerWorkflow,
)
from workflows.flow import FlowNexusWorkflow
from workflows.neural import (
    DistributedTrainingWorkflow,
    NeuralMaintenanceWorkflow,
    NeuralTrainWorkflow,
)
from workflows.sandbox import SandboxSessionWorkflow
from workflows.swarm import SwarmTaskWorkflow, SwarmWorkflow
from workflows.system import SystemCheckWorkflow


@dataclass(frozen=True)
class QueueLimits:
    """Slots of one worker; sized for the kind of work its queue gets."""

    max_concurrent_workflow_tasks: int
    max_concurrent_activities: int
    max_concurrent_local_activities: int = 50


QUEUE_LIMITS: dict[str, QueueLimits] = {
    # Workflow tasks are cheap and must never wait behind heavy work.
    queues.ORCHESTRATION: QueueLimits(100, 50),
    # JAX training is CPU-bound: one step at a time per process.
    queues.NEURAL: QueueLimits(5, 2),
    # Sandbox calls mostly wait on child processes or the E2B API.
    queues.SANDBOX: QueueLimits(10, 40),
    queues.STREAMING: QueueLimits(10, 100),
}


@dataclass(frozen=True)
class QueueWarmUp:
    """Modules and warm-up steps that a queue's worker imports and runs before
    it polls, because its tasks would otherwise do the same on first use."""

    modules: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()


QUEUE_WARM_UPS: dict[str, QueueWarmUp] = {
    # Neural tools run in-process in phase and step activities here: dataset
    # preparation imports scikit-learn, and predictions run jitted JAX code.
    queues.ORCHESTRATION: QueueWarmUp(("sklearn.datasets",), ("jax",)),
    queues.NEURAL: QueueWarmUp(("sklearn.datasets",), ("jax",)),
}


@dataclass(frozen=True)
class Capability:
    """Workflows and activity factories that one capability adds to queues."""

    name: str
    workflows: dict[str, Sequence[type]] = field(default_factory=dict)
    activities: dict[str, Callable[[Settings], Sequence[Callable[..., Any]]]] = field(
        default_factory=dict
    )


def _system_activities(settings: Settings) -> list[Callable[..., Any]]:
    return [SystemActivities(settings).check_health]


FOUNDATION = Capability(
    name="foundation",
    workflows={queues.ORCHESTRATION: [SystemCheckWorkflow]},
    activities={queues.ORCHESTRATION: _system_activities},
)


def _benchmark_orchestration(settings: Settings) -> list[Callable[..., Any]]:
    benchmark = BenchmarkActivities(settings)
    return [
        benchmark.start_run,
        benchmark.cancel_run,
        benchmark.run_phase,
        benchmark.record_phase,
        benchmark.record_samples,
        benchmark.finish_run,
    ]


def _benchmark_streaming(settings: Settings) -> list[Callable[..., Any]]:
    return [BenchmarkActivities(settings).load_operation]


BENCHMARK = Capability(
    name="benchmark",
    workflows={
        queues.ORCHESTRATION: [
            ExtendedDurationBenchmarkWorkflow,
            BenchmarkPhaseWorkflow,
            MetricsSamplerWorkflow,
            LoadOperationWorkflow,
        ]
    },
    activities={
        queues.ORCHESTRATION: _benchmark_orchestration,
        queues.STREAMING: _benchmark_streaming,
    },
)


def _workflow_orchestration_activities(settings: Settings) -> list[Callable[..., Any]]:
    # Persistence and the local-activity step types run in the workflow's
    # worker, so they must be registered on the orchestration queue.
    built = WorkflowActivities(settings)
    return [
        built.register_execution,
        built.record_progress,
        built.echo,
        built.unavailable,
        built.system_initialization,
    ]


def _workflow_streaming_activities(settings: Settings) -> list[Callable[..., Any]]:
    built = WorkflowActivities(settings)
    return [built.storage, built.reporting]


WORKFLOWS = Capability(
    name="workflows",
    workflows={queues.ORCHESTRATION: [FlowNexusWorkflow]},
    activities={
        queues.ORCHESTRATION: _workflow_orchestration_activities,
        queues.STREAMING: _workflow_streaming_activities,
    },
)


def _sandbox_activities(settings: Settings) -> list[Callable[..., Any]]:
    sandbox = SandboxActivities(settings)
    return [
        sandbox.create,
        sandbox.execute,
        sandbox.upload,
        sandbox.configure,
        sandbox.describe,
        sandbox.stop,
        sandbox.delete,
    ]


def _sandbox_orchestration_activities(
    settings: Settings,
) -> list[Callable[..., Any]]:
    # The mirror write and the short local-backend calls run as local
    # activities of the session workflow, so they live on its queue.
    sandbox = SandboxActivities(settings)
    return [
        SandboxRecordActivities(settings).record,
        sandbox.create,
        sandbox.execute,
        sandbox.upload,
        sandbox.describe,
        sandbox.stop,
        sandbox.delete,
    ]


SANDBOX = Capability(
    name="sandbox",
    workflows={queues.ORCHESTRATION: [SandboxSessionWorkflow]},
    activities={
        queues.SANDBOX: _sandbox_activities,
        queues.ORCHESTRATION: _sandbox_orchestration_activities,
    },
)


NEURAL = Capability(
    name="neural",
    workflows={
        queues.ORCHESTRATION: [
            NeuralTrainWorkflow,
            DistributedTrainingWorkflow,
            NeuralMaintenanceWorkflow,
        ]
    },
    activities={
        queues.ORCHESTRATION: orchestration_activities,
        queues.NEURAL: neural_queue_activities,
    },
)


def _integration_activities(settings: Settings) -> list[Callable[..., Any]]:
    steps = IntegrationActivities(settings)
    return [
        steps.sandbox_execution,
        steps.neural_computation,
        steps.swarm_orchestration,
        steps.real_time_streaming,
        steps.real_time_monitoring,
        steps.cross_system_integration,
        steps.performance_optimization,
        steps.scalability_validation,
    ]


INTEGRATION = Capability(
    name="integration",
    activities={queues.ORCHESTRATION: _integration_activities},
)


def _swarm_sandbox_activities(settings: Settings) -> list[Callable[..., Any]]:
    swarm = SwarmActivities(settings)
    return [swarm.run_agent_step, swarm.run_last_agent_step, swarm.stop_agent_sandboxes]


def _swarm_orchestration_activities(settings: Settings) -> list[Callable[..., Any]]:
    return [SwarmMirrorActivities(settings).mirror_swarm, watch_task_close]


SWARM = Capability(
    name="swarm",
    workflows={queues.ORCHESTRATION: [SwarmWorkflow, SwarmTaskWorkflow]},
    activities={
        queues.ORCHESTRATION: _swarm_orchestration_activities,
        queues.SANDBOX: _swarm_sandbox_activities,
    },
)


def _realtime_activities(settings: Settings) -> list[Callable[..., Any]]:
    realtime = RealtimeActivities(settings)
    return [realtime.consume_changes, realtime.prune_realtime_changes]


REALTIME = Capability(
    name="realtime",
    activities={queues.STREAMING: _realtime_activities},
)

CAPABILITIES: list[Capability] = [
    FOUNDATION,
    BENCHMARK,
    WORKFLOWS,
    SANDBOX,
    NEURAL,
    INTEGRATION,
    SWARM,
    REALTIME,
]


def all_workflows() -> list[type]:
    """Return every workflow class, for replay tests and the orchestration worker."""
    found: list[type] = []
    for capability in CAPABILITIES:
        for classes in capability.workflows.values():
            found += [c for c in classes if c not in found]
    return found


@dataclass
class QueueSpec:
    task_queue: str
    limits: QueueLimits
    workflows: list[type]
    activities: list[Callable[..., Any]]


def queue_spec(task_queue: str, settings: Settings) -> QueueSpec:
    """Collect what the worker of `task_queue` registers.

    Raises:
        ValueError: `task_queue` is not one of the project's queues.
    """
    if task_queue not in QUEUE_LIMITS:
        raise ValueError(
            f"unknown task queue {task_queue!r}; choose one of "
            f"{', '.join(QUEUE_LIMITS)}"
        )
    workflows: list[type] = []
    activities: list[Callable[..., Any]] = [ProbeActivities(task_queue).probe_worker]
    for capability in CAPABILITIES:
        workflows += list(capability.workflows.get(task_queue, ()))
        factory = capability.activities.get(task_queue)
        if factory is not None:
            activities += list(factory(settings))
    return QueueSpec(task_queue, QUEUE_LIMITS[task_queue], workflows, activities)
