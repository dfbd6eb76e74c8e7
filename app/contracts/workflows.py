"""Models of user-defined Flow Nexus workflows that cross a Temporal boundary.

`FlowInput` is the whole input of `FlowNexusWorkflow`: a definition snapshot
and the execution's input data, so a run can be started from any client
(`temporal workflow start`, a plain SDK client, a schedule) without the
database.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.contracts.types import UtcDateTime

StepStatus = Literal[
    "pending", "running", "completed", "failed", "skipped", "cancelled"
]
# terminated and timed_out are recorded by the tools, not by the workflow,
# because Temporal ends such a run without running its code again.
ExecutionStatus = Literal[
    "running", "completed", "failed", "cancelled", "terminated", "timed_out"
]

DEFAULT_STEP_TIMEOUT_SECONDS = 300.0
DEFAULT_RETRY_ATTEMPTS = 2
MAX_STEP_TIMEOUT_SECONDS = 7 * 24 * 3600.0
MAX_RETRY_ATTEMPTS = 100
# Step params whose mapping values are secrets, in every step type: stored
# sealed, masked in the audit log and never shown in an error message.
SECRET_PARAMS = ("env_vars",)


class StepSpec(BaseModel):
    """One step of a definition.

    `timeout` is the start-to-close limit of one attempt in seconds, and
    `retry_attempts` the number of retries after the first attempt. Their
    ranges are checked by `validate_definition`, so that an error names the
    step.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    type: str
    agent: str | None = Field(None, description="A specific agent id or name.")
    agent_type: str | None = Field(None, description="A kind of agent, e.g. coder.")
    depends_on: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    # Strict: "7" or true is an error, not a number.
    timeout: float = Field(DEFAULT_STEP_TIMEOUT_SECONDS, strict=True)
    retry_attempts: int = Field(DEFAULT_RETRY_ATTEMPTS, strict=True)
    continue_on_failure: bool = Field(
        False,
        strict=True,
        description="A failure of this step neither skips its dependents nor "
        "fails the run.",
    )


class TriggerSpec(BaseModel):
    """How runs start besides `workflow_execute`.

    `schedule` creates a Temporal Schedule that starts a run at every `cron`
    time with `input_data`; `manual` only documents that runs start on demand.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["schedule", "manual"]
    cron: str | None = None
    input_data: dict[str, Any] = Field(default_factory=dict)


class WorkflowDefinition(BaseModel):
    """A user-defined workflow, as `workflow_create` receives it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    priority: int = Field(
        5, ge=0, le=10, strict=True, description="10 is the most urgent."
    )
    steps: list[StepSpec] = Field(min_length=1)
    triggers: list[TriggerSpec] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class FlowInput(BaseModel):
    """Input of `FlowNexusWorkflow`.

    `workflow_id` and `version` name the stored definition. When a run is
    started from outside without them, the run stores the snapshot as a new
    definition or version of the definition with the same name.
    """

    definition: WorkflowDefinition
    workflow_id: str | None = None
    version: int | None = None
    input_data: dict[str, Any] = Field(default_factory=dict)
    groups: list[str] | None = Field(
        None,
        description="The tool groups of the key that started the run (or "
        "created its schedule); its steps call only those groups' tools. "
        "None for every group.",
    )


class StepState(BaseModel):
    name: str
    type: str
    status: StepStatus = "pending"
    depends_on: list[str] = Field(default_factory=list)
    task_queue: str | None = None
    agent: str | None = None
    agent_type: str | None = None
    agent_id: str | None = Field(None, description="The resolved swarm agent.")
    attempts: int = 0
    started_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None
    output: dict[str, Any] | None = None
    error: str | None = None


class ExecutionState(BaseModel):
    """One execution with every step's state; the query and the run's result."""

    execution_id: str
    run_id: str | None = None
    workflow_id: str | None = None
    version: int | None = None
    name: str
    status: ExecutionStatus = "running"
    priority: int = 5
    input_data: dict[str, Any] = Field(default_factory=dict)
    started_at: UtcDateTime | None = None
    closed_at: UtcDateTime | None = None
    error: str | None = None
    steps: list[StepState] = Field(default_factory=list)
    omitted: list[str] = Field(
        default_factory=list,
        description="What the run's Temporal result leaves out to stay under "
        "Temporal's payload limit (`input_data`, `steps.NAME.output`); the "
        "database keeps it, and workflow_status shows it.",
    )


class AuditEntry(BaseModel):
    """One transition of an execution or a step."""

    execution_id: str
    workflow_id: str | None = None
    step: str | None = None
    event: str = Field(description="e.g. execution.started, step.completed")
    status: str
    at: UtcDateTime
    attempt: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class RegisterExecution(BaseModel):
    state: ExecutionState
    input: FlowInput


class RegisteredExecution(BaseModel):
    workflow_id: str
    version: int
    agents: dict[str, str | None] = Field(
        default_factory=dict, description="Step name to its resolved agent id."
    )


class ProgressRecord(BaseModel):
    """Changed steps and new audit entries to persist in one transaction."""

    state: ExecutionState
    changed_steps: list[str] = Field(default_factory=list)
    events: list[AuditEntry] = Field(default_factory=list)


class StepRequest(BaseModel):
    """Input of every step activity: the rendered params of one step."""

    execution_id: str
    workflow_id: str | None = None
    step: str
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    agent_id: str | None = None
    groups: list[str] | None = Field(
        None, description="The tool groups that the step's tool calls may use."
    )
    upstream: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Outputs of every upstream step, for step types that ask "
        "for them (reporting).",
    )
    references: dict[str, str] = Field(
        default_factory=dict,
        description="For each params path whose whole value was one reference, "
        "that reference, so that an invalid value can name its source.",
    )


class StepOutcome(BaseModel):
    """Result of every step activity."""

    output: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 1


class AgentAssignment(BaseModel):
    """Update input of a running execution: a pending step's new agent."""

    step: str
    agent_type: str | None = None
    agent: str | None = None
    agent_id: str | None = None
