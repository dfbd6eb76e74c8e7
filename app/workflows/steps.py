"""The registry of step types: type name -> activity, task queue, params model.

A capability plugs its step type in by calling `register_step_type` from a
module listed in `STEP_TYPE_MODULES` (imported by `load_step_types`, which
the workers, the tools and the workflow call), and by registering the named
activity on the named task queue in workers/registry.py. The activity takes a
`StepRequest` and returns a `StepOutcome` (app/contracts/workflows.py); it
parses `request.params` with the type's params model.

This module imports only pydantic and the standard library, because the
workflow reads the registry inside the workflow sandbox.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.contracts.object_paths import path_problem, prefix_problem, shown
from app.contracts.queues import ORCHESTRATION, STREAMING

UNAVAILABLE_ACTIVITY = "step_unavailable"

# Modules that register step types when imported, one per capability.
STEP_TYPE_MODULES: tuple[str, ...] = ("app.integration.steps",)


class AnyParams(BaseModel):
    """Params of a step type that declares no model: any JSON object."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class StepType:
    """How a step of one type runs.

    Attributes:
        name: the `type` written in a definition's step.
        activity: the activity name that runs it.
        task_queue: the queue whose worker registers that activity.
        params_model: validates the step's rendered params in the activity.
        local: run as a local activity inside the workflow's worker, which
            saves two server round trips; only for short, cheap work.
        wants_upstream: pass every upstream step's output in the request.
        heartbeat_timeout: seconds, for activities that heartbeat. A cancel
            reaches an activity only through a heartbeat, so with this set a
            cancelled run waits until the step's activity has stopped.
        missing: set when the capability behind the type is not installed;
            a step of this type then fails with this text, never succeeds.
    """

    name: str
    activity: str
    task_queue: str = ORCHESTRATION
    params_model: type[BaseModel] = AnyParams
    local: bool = False
    wants_upstream: bool = False
    heartbeat_timeout: float | None = None
    missing: str | None = None

    @property
    def available(self) -> bool:
        return self.missing is None


_registry: dict[str, StepType] = {}


def register_step_type(step_type: StepType, *, replace: bool = False) -> None:
    """Add a step type; `replace=True` lets a capability take over a type that
    is registered as not available.

    Raises:
        ValueError: the name is taken and `replace` is False.
    """
    if step_type.name in _registry and not replace:
        raise ValueError(f"step type {step_type.name!r} is registered twice")
    _registry[step_type.name] = step_type


def get_step_type(name: str) -> StepType | None:
    load_step_types()
    return _registry.get(name)


def step_type_names() -> list[str]:
    load_step_types()
    return sorted(_registry)


_loaded = False


def load_step_types() -> None:
    """Import every module in `STEP_TYPE_MODULES` once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in STEP_TYPE_MODULES:
        importlib.import_module(module)


# Params of the step types built here.

# The storage capability's rule for bucket names (S3's, without dots).
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def _bucket_name(bucket: str) -> str:
    if not _BUCKET_NAME.match(bucket):
        raise ValueError(
            f"invalid bucket name {shown(bucket)}: use 3-63 lowercase letters, digits "
            "and hyphens, starting and ending with a letter or digit"
        )
    return bucket


BucketName = Annotated[str, AfterValidator(_bucket_name)]


class EchoParams(BaseModel):
    """`echo` returns its params as its output; the cheapest real step."""

    model_config = ConfigDict(extra="allow")


class SystemInitializationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queues: list[str] = Field(
        default_factory=lambda: [ORCHESTRATION],
        description="Task queues that must have a polling worker.",
    )
    allow_degraded: bool = Field(
        True, description="Accept a degraded platform when these queues are up."
    )


class StorageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: Literal["put", "get", "delete", "list"]
    bucket: BucketName
    path: str = ""
    content: str | None = Field(None, description="Object body for put.")
    encoding: Literal["utf-8", "base64"] = "utf-8"
    content_type: str | None = None
    prefix: str = Field("", description="Path prefix for list.")

    @model_validator(mode="after")
    def _path_fits_operation(self) -> StorageParams:
        if self.operation == "list":
            if self.path:
                raise ValueError(
                    f"path {shown(self.path)} is not read by list; give the "
                    "folder to list as prefix"
                )
            if "{{" not in self.prefix:
                problem = prefix_problem(self.prefix)
                if problem is not None:
                    raise ValueError(f"prefix: {problem}")
            return self
        if self.prefix:
            raise ValueError(
                f"prefix {shown(self.prefix)} is read only by list; {self.operation} "
                "takes the object's path"
            )
        if not self.path:
            raise ValueError(
                f"path is missing; {self.operation} needs the object's path, "
                "such as reports/run-1.md"
            )
        # A path with a reference is checked once the run renders it.
        if "{{" not in self.path:
            problem = path_problem(self.path)
            if problem is not None:
                raise ValueError(f"path: {problem}")
        return self


class ReportingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = "Workflow report"
    bucket: BucketName = "reports"
    path: str | None = Field(
        None, description="Object path; default workflows/EXECUTION/STEP.md."
    )
    steps: list[str] | None = Field(
        None, description="Upstream steps to include; default all upstream steps."
    )
    notes: str | None = None


def _unavailable(name: str, queue: str, missing: str) -> StepType:
    return StepType(
        name=name,
        activity=UNAVAILABLE_ACTIVITY,
        task_queue=queue,
        local=True,
        missing=missing,
    )


def _builtin_types() -> list[StepType]:
    from app.contracts.queues import NEURAL, SANDBOX

    return [
        StepType("echo", "step_echo", ORCHESTRATION, EchoParams, local=True),
        StepType(
            "system_initialization",
            "step_system_initialization",
            ORCHESTRATION,
            SystemInitializationParams,
        ),
        StepType("storage", "step_storage", STREAMING, StorageParams),
        StepType(
            "reporting",
            "step_reporting",
            STREAMING,
            ReportingParams,
            wants_upstream=True,
        ),
        _unavailable(
            "sandbox_execution",
            SANDBOX,
            "the sandboxes capability is not installed in this build, so no "
            "worker can create or run a sandbox",
        ),
        _unavailable(
            "swarm_orchestration",
            ORCHESTRATION,
            "the swarms capability is not installed in this build, so there is "
            "no swarm to orchestrate",
        ),
        _unavailable(
            "neural_computation",
            NEURAL,
            "the neural capability is not installed in this build, so no worker "
            "can train or run a model",
        ),
        _unavailable(
            "real_time_monitoring",
            STREAMING,
            "the realtime capability is not installed in this build, so there "
            "is no change stream to monitor",
        ),
        _unavailable(
            "real_time_streaming",
            STREAMING,
            "the realtime capability is not installed in this build, so there "
            "is no change stream to produce or consume",
        ),
        _unavailable(
            "cross_system_integration",
            ORCHESTRATION,
            "it needs the neural, swarms and realtime capabilities, which are "
            "not installed in this build",
        ),
        _unavailable(
            "performance_optimization",
            ORCHESTRATION,
            "no performance optimizer is implemented in this build",
        ),
        _unavailable(
            "scalability_validation",
            ORCHESTRATION,
            "no scalability load generator is implemented in this build",
        ),
    ]


for _step_type in _builtin_types():
    register_step_type(_step_type)


def describe_step_types() -> list[dict[str, Any]]:
    """Return every registered type with its queue and availability."""
    return [
        {
            "type": t.name,
            "activity": t.activity,
            "task_queue": t.task_queue,
            "local": t.local,
            "available": t.available,
            "missing": t.missing,
        }
        for t in (_registry[name] for name in step_type_names())
    ]
