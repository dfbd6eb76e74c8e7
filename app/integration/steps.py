"""Step types of the capabilities, registered over the "not available"
placeholders. Each step's activity drives its capability through the same
tools that MCP and HTTP clients call (activities/integration.py).

They all run on the orchestration queue: a step only waits on tools whose own
activities run on the capability's queue, and a step that held a neural or
sandbox slot while waiting could starve the work it waits for.

This module imports only pydantic, the standard library and modules without
imports, because the workflow reads the step registry inside the workflow
sandbox.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.contracts.queues import ORCHESTRATION
from app.contracts.sandbox import Template, check_env_names, check_env_values
from app.neural.architectures import check_architecture
from app.workflows.steps import StepType, register_step_type


class SandboxExecutionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1)
    language: Literal["python", "javascript", "bash"] = "python"
    template: Template = "python"
    sandbox_id: str | None = Field(
        None, description="Run in this sandbox; default: a new one, deleted after."
    )
    env_vars: dict[str, str] = Field(default_factory=dict)
    timeout: int = Field(60, gt=0, le=3600, description="Seconds for the code.")

    # The same rule as sandbox_create, checked when the definition is stored
    # rather than at every run.
    _env_names = field_validator("env_vars")(check_env_names)
    _env_values = field_validator("env_vars")(check_env_values)


class NeuralComputationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["train", "predict"] = "train"
    dataset: Any = "digits"
    architecture: str = "feedforward"
    tier: Literal["nano", "mini", "small", "medium", "large"] = "nano"
    # The same bounds as neural_train's; the defaults are lighter, for a step.
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=512)
    learning_rate: float = Field(0.01, gt=0, le=10)
    model_id: str | None = Field(None, description="Model to predict with.")
    input: list[Any] | None = Field(None, description="Rows to predict.")

    _architecture = field_validator("architecture")(
        classmethod(lambda cls, value: check_architecture(value))
    )

    @model_validator(mode="after")
    def _predict_needs_model(self) -> NeuralComputationParams:
        if self.mode == "predict" and (self.model_id is None or self.input is None):
            raise ValueError("mode predict needs params model_id and input")
        return self


class SwarmOrchestrationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    swarms: int = Field(1, ge=1, le=10, description="Swarms to run the task in.")
    topology: Literal["hierarchical", "mesh", "ring", "star"] = "hierarchical"
    agents: int = Field(3, ge=1, le=20, description="Agents per swarm.")
    task: str = Field("benchmark task", min_length=1)
    code: str = Field(
        "import os\nprint('agent', os.getpid())",
        min_length=1,
        description="Program each selected agent runs in its sandbox.",
    )
    language: Literal["python", "javascript", "bash"] = "python"
    timeout_seconds: float = Field(300, gt=0, le=3600)


class StreamingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    streams: int = Field(5, ge=1, le=5, description="Filtered subscriptions.")
    table: Literal["extended_duration_test_events"] = "extended_duration_test_events"
    events: int = Field(50, ge=1, le=100_000, description="Rows to insert.")


class MonitoringParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str = Field(min_length=1)
    event: Literal["INSERT", "UPDATE", "DELETE", "*"] = "*"
    filter: str | None = None
    wait_ms: int = Field(1000, ge=0, le=60_000)
    limit: int = Field(100, ge=1, le=1000)


class CrossSystemParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    systems: list[
        Literal["sandbox", "swarm", "neural", "realtime", "storage", "workflows"]
    ] = Field(min_length=1)


class PerformanceOptimizationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    collect_garbage: bool = Field(
        True, description="Run the garbage collector in the worker and measure it."
    )


class ScalabilityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operations: int = Field(4, ge=1, le=10_000)
    concurrency: int = Field(2, ge=1, le=100)
    multiplier: int = Field(2, ge=1, le=100)


for _step_type in (
    StepType(
        "sandbox_execution",
        "step_sandbox_execution",
        ORCHESTRATION,
        SandboxExecutionParams,
        # So a dead worker's attempt is retried within this many seconds,
        # not after the step's whole timeout.
        heartbeat_timeout=30,
    ),
    StepType(
        "neural_computation",
        "step_neural_computation",
        ORCHESTRATION,
        NeuralComputationParams,
        heartbeat_timeout=120,
    ),
    StepType(
        "swarm_orchestration",
        "step_swarm_orchestration",
        ORCHESTRATION,
        SwarmOrchestrationParams,
        heartbeat_timeout=60,
    ),
    StepType(
        "real_time_streaming",
        "step_real_time_streaming",
        ORCHESTRATION,
        StreamingParams,
    ),
    StepType(
        "real_time_monitoring",
        "step_real_time_monitoring",
        ORCHESTRATION,
        MonitoringParams,
    ),
    StepType(
        "cross_system_integration",
        "step_cross_system_integration",
        ORCHESTRATION,
        CrossSystemParams,
        wants_upstream=True,
    ),
    StepType(
        "performance_optimization",
        "step_performance_optimization",
        ORCHESTRATION,
        PerformanceOptimizationParams,
    ),
    StepType(
        "scalability_validation",
        "step_scalability_validation",
        ORCHESTRATION,
        ScalabilityParams,
    ),
):
    register_step_type(_step_type, replace=True)
