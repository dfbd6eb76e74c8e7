"""Swarm, agent and task models that cross the Temporal boundary.

`SwarmState` is the whole state of one `SwarmWorkflow`; it is handed to
`continue_as_new` unchanged, so every field here survives a new run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.contracts.types import UtcDateTime

Topology = Literal["hierarchical", "mesh", "ring", "star"]
SwarmStrategy = Literal["balanced", "specialized", "adaptive"]
TaskStrategy = Literal["parallel", "sequential", "adaptive"]
Priority = Literal["low", "medium", "high", "critical"]
ExecutionKind = Literal["code", "shell", "action", "llm"]
Language = Literal["python", "javascript", "bash"]
SwarmStatus = Literal["active", "destroying", "destroyed"]
AgentStatus = Literal["idle", "busy", "removing", "removed"]
TaskStatus = Literal["queued", "running", "completed", "failed", "cancelled"]

AGENT_TYPES: tuple[str, ...] = (
    "coordinator",
    "researcher",
    "coder",
    "analyst",
    "optimizer",
    "architect",
    "tester",
    "reviewer",
    "documenter",
    "monitor",
    "specialist",
)

# Lower rank is dispatched first.
PRIORITY_RANK: dict[str, int] = {"critical": 0, "high": 1, "medium": 2, "low": 3}


class AgentState(BaseModel):
    """One agent of a swarm."""

    agent_id: str
    type: str
    name: str
    capabilities: list[str] = Field(default_factory=list)
    status: AgentStatus = "idle"
    sandbox_id: str | None = Field(
        None, description="Set once the agent first works and its sandbox exists."
    )
    current_task_id: str | None = None
    tasks_completed: int = 0
    tasks_failed: int = 0
    joined_at: UtcDateTime
    seq: int = Field(description="Spawn order inside the swarm.")
    left_reason: str | None = Field(
        None, description="Why the agent left: scaled down or swarm destroyed."
    )


class TaskWork(BaseModel):
    """What the agents of one task execute."""

    kind: ExecutionKind
    task: str
    code: str | None = None
    language: Language = "python"
    command: str | None = None
    action: str | None = None
    action_args: dict[str, object] = Field(default_factory=dict)
    timeout_seconds: float = Field(300.0, gt=0)
    groups: list[str] | None = Field(
        None,
        description="The tool groups of the key that submitted the task; an "
        "action calls only those groups' tools. None for every group.",
    )


# Limits on what one task carries. A part of the task text reaches a program
# in the NEXUS_PART environment variable, where Linux allows 128 KiB per
# variable. Text, code, command and action_args travel in the submission, the
# task workflow's input and, until the task starts, the swarm's state. Every
# status query and continue-as-new sends that state. The Temporal server's
# default configuration rejects a payload over 2 MB, and a swarm whose state
# passed that could no longer run.
MAX_TASK_TEXT_BYTES = 100_000
MAX_TASK_WORK_BYTES = 256 * 1024
# Text and code of a swarm's tasks that have not started, all together.
MAX_QUEUED_WORK_BYTES = 1024 * 1024
# An agent's capabilities and a task's required capabilities: each list, and
# each name. Both stay in the swarm's state for the swarm's lifetime.
MAX_CAPABILITIES = 32
MAX_CAPABILITY_CHARS = 100


def capability_error(field: str, capabilities: list[str]) -> str | None:
    """Return why `capabilities` (the value of `field`) is too large for the
    swarm's state, or None when it fits."""
    if len(capabilities) > MAX_CAPABILITIES:
        return (
            f"{field} has {len(capabilities)} entries; at most {MAX_CAPABILITIES} "
            "are allowed: name the capabilities that tell agents apart"
        )
    for name in capabilities:
        if len(name) > MAX_CAPABILITY_CHARS:
            return (
                f"{field} entry {name[:40]!r}... has {len(name)} characters; at "
                f"most {MAX_CAPABILITY_CHARS} are allowed: use a short name such "
                "as gpu or python"
            )
    return None


# The error of a task that a destroy cancelled while it ran. The swarm records
# it and sends it as the cancel's reason, so the task's own result gives the
# same error. A task cancelled for any other reason reports to its swarm.
DESTROYED_WHILE_RUNNING = "the swarm was destroyed while the task ran"

# Error type of an update that a swarm rejects because it is destroying or
# destroyed, which the tools report as a conflict, not as a bad argument.
SWARM_NOT_ACTIVE_ERROR = "SwarmNotActive"


# Limits on what a task's record keeps, for the same 2 MB payload limit: the
# record is the task workflow's state, its status query and its result. A
# step's activity result in the task workflow's history keeps all of it.
# Stdout, stderr and LLM text of all steps together:
MAX_STEPS_TEXT_BYTES = 768 * 1024
# The task's aggregated output, which dependent tasks receive:
MAX_TASK_OUTPUT_BYTES = 256 * 1024
# The part text shown with each step (the task's input contains all of it):
MAX_STEP_PART_CHARS = 2_000
# A step's previous output and dependency outputs together. They travel in
# the sandbox call's arguments, beside the program and its environment.
MAX_STEP_INPUT_BYTES = 1024 * 1024


def work_bytes(work: TaskWork) -> int:
    """Bytes that a task's work takes as JSON, as it travels in payloads."""
    return len(work.model_dump_json().encode())


def task_workflow_id(task_id: str) -> str:
    """Return the id of the `SwarmTaskWorkflow` that runs a task."""
    return f"swarm-task-{task_id}"


class TaskSpec(BaseModel):
    """A task as submitted to a swarm."""

    task_id: str
    work: TaskWork
    priority: Priority = "medium"
    strategy: TaskStrategy = "adaptive"
    max_agents: int | None = Field(None, ge=1, le=10)
    dependencies: list[str] = Field(default_factory=list)
    required_capabilities: list[str] = Field(default_factory=list)
    agent_id: str | None = Field(
        None,
        description=(
            "Run on this agent only, once it is idle (a workflow step assigned "
            "to the agent); the task fails if the agent leaves first."
        ),
    )


class TaskRecord(BaseModel):
    """The swarm's record of one task; the task workflow stores the output."""

    spec: TaskSpec
    status: TaskStatus = "queued"
    workflow_id: str
    assigned_agents: list[str] = Field(default_factory=list)
    submitted_at: UtcDateTime
    assigned_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None
    error: str | None = None
    child_started: bool = False
    seq: int
    work_digest: str | None = Field(
        None,
        description=(
            "sha256 of the submitted spec, which tells a retried submission "
            "apart from another task once the text is trimmed."
        ),
    )
    work_trimmed: bool = Field(
        False,
        description=(
            "The task's child has started with the whole spec, so this record "
            "keeps only the start of the text and no code, command or "
            "action_args."
        ),
    )


class SwarmEvent(BaseModel):
    """A change of a swarm, mirrored as a `swarm_events` row."""

    event_id: str = Field(description="swarm_id:seq, so a retried write is a no-op.")
    swarm_id: str
    seq: int
    kind: Literal[
        "swarm_started",
        "agent_joined",
        "agent_left",
        "task_submitted",
        "task_assigned",
        "task_completed",
        "task_failed",
        "task_cancelled",
        "swarm_destroyed",
    ]
    agent_id: str | None = None
    task_id: str | None = None
    detail: dict[str, object] = Field(default_factory=dict)
    at: UtcDateTime


class Assignment(BaseModel):
    """Signal from the swarm to a task workflow: these agents run it now, or,
    with `abort` set, the task ends without running (a failed dependency, a
    destroyed swarm)."""

    agents: list[AgentState] = Field(default_factory=list)
    topology: Topology
    abort: str | None = None
    abort_status: Literal["failed", "cancelled"] = "failed"
    aborted_at: UtcDateTime | None = Field(
        None, description="When the swarm ended the task without running it."
    )


class SwarmState(BaseModel):
    """All state of a `SwarmWorkflow`, which is the source of truth for its swarm."""

    swarm_id: str
    topology: Topology
    max_agents: int = Field(ge=1, le=100)
    strategy: SwarmStrategy = "balanced"
    status: SwarmStatus = "active"
    created_at: UtcDateTime
    destroyed_at: UtcDateTime | None = None
    agents: list[AgentState] = Field(default_factory=list)
    tasks: list[TaskRecord] = Field(default_factory=list)
    next_agent_seq: int = 0
    next_task_seq: int = 0
    next_event_seq: int = 0
    runs: int = Field(1, description="Workflow runs so far, 1 + continue-as-new count.")
    unflushed_events: list[SwarmEvent] = Field(default_factory=list)
    pending_assignments: list[str] = Field(
        default_factory=list, description="Task ids whose Assignment is not sent yet."
    )
    pending_cancels: list[str] = Field(default_factory=list)
    sandboxes_to_stop: list[str] = Field(default_factory=list)
    mirror_dirty: bool = True
    task_event_batch_seconds: float = Field(
        0.2,
        ge=0,
        description=(
            "Longest wait of task events (submitted, assigned, finished) for a "
            "shared mirror write while the swarm is active; 0 writes each change "
            "at once."
        ),
    )


class SwarmWorkflowInput(BaseModel):
    state: SwarmState
    continue_as_new_after_events: int | None = Field(
        None,
        description=(
            "Continue as new once history has this many events, besides the "
            "server's own suggestion; lets tests and small servers cut runs short."
        ),
    )


class SpawnAgentRequest(BaseModel):
    # A str rather than a Literal, so the validator can reject an unknown type
    # with a message instead of failing payload conversion.
    type: str
    name: str | None = None
    capabilities: list[str] = Field(default_factory=list)


class ScaleRequest(BaseModel):
    target_agents: int = Field(ge=1, le=100)


class ScaleResult(BaseModel):
    added: list[AgentState] = Field(default_factory=list)
    removed: list[AgentState] = Field(default_factory=list)
    draining: list[str] = Field(
        default_factory=list,
        description="Busy agents that leave as soon as their current task ends.",
    )
    agents: int


class TaskFinished(BaseModel):
    """Signal from a task workflow to its swarm when the task ends."""

    task_id: str
    status: TaskStatus
    error: str | None = None
    sandboxes: dict[str, str] = Field(
        default_factory=dict, description="agent_id to the sandbox it worked in."
    )


class TaskCancelRequest(BaseModel):
    """A request to the swarm's `cancel_task` update, from a caller that no
    longer waits for a task it submitted (a cancelled workflow step)."""

    task_id: str
    reason: str = Field(description="The error that the cancelled task reports.")


class TaskClose(BaseModel):
    """The close of a task workflow that ended without a result (terminated,
    timed out), which the tool layer passes to the `closed_progress` query."""

    status: TaskStatus
    error: str
    closed_at: UtcDateTime


class TaskWatchRequest(BaseModel):
    """A task workflow that the `watch_task_close` activity waits on."""

    task_id: str
    workflow_id: str


class TaskWatchResult(BaseModel):
    ending: str | None = Field(
        None,
        description=(
            'How the task workflow closed without a result: "terminated", '
            '"timed out", "cancelled", "not found" or "failed: <cause>". '
            "None when it completed."
        ),
    )


class SwarmTaskInput(BaseModel):
    swarm_id: str
    spec: TaskSpec
    assignment: Assignment | None = None
    submitted_at: UtcDateTime | None = Field(
        None,
        description=(
            "When the swarm accepted the task; the child starts later, once "
            "the task has agents."
        ),
    )


class AgentStepRequest(BaseModel):
    """One agent's piece of a task, executed by the `run_agent_step` activity."""

    swarm_id: str
    task_id: str
    step: int
    agent: AgentState
    work: TaskWork
    part_index: int
    part_count: int
    part: str
    previous_output: str | None = None
    dependencies: list[str] = Field(
        default_factory=list,
        description="Task ids whose outputs the step receives; all completed.",
    )


class StepResult(BaseModel):
    """What one agent really produced for one step."""

    step: int
    agent_id: str
    agent_name: str
    agent_type: str
    part_index: int
    part: str
    kind: ExecutionKind
    status: Literal["running", "completed", "failed", "cancelled", "skipped"]
    stdout: str | None = None
    stderr: str | None = None
    exit_code: int | None = None
    text: str | None = None
    output: dict[str, object] | None = Field(
        None, description="Result of a built-in action."
    )
    error: str | None = None
    sandbox_id: str | None = None
    attempt: int = 1
    trimmed_bytes: int = Field(
        0,
        description=(
            "Bytes of stdout, stderr and text, and characters of the part, "
            "left out of the task's record to keep it within Temporal's "
            "payload limit. The step's activity result in the task workflow's "
            "history has them."
        ),
    )
    program_runs: int | None = Field(
        None,
        description=(
            "Code and shell steps: how many times the sandbox started the "
            "program for the output shown. Above 1 when a worker died while "
            "the program ran and the sandbox ran it again."
        ),
    )
    started_at: UtcDateTime | None = Field(
        None,
        description=(
            "When the step began: for code and shell steps, when its program "
            "started; for other steps, when its first attempt started."
        ),
    )
    finished_at: UtcDateTime | None = None
    duration_ms: float | None = None
    waited_ms: float | None = Field(
        None,
        description=(
            "Code and shell steps: milliseconds from the start of the step's "
            "activity to the start of its program, spent creating the agent's "
            "sandbox or waiting while it ran another program. Not part of "
            "duration_ms."
        ),
    )

    def output_text(self) -> str:
        """Return the output that a next agent receives."""
        if self.text is not None:
            return self.text
        if self.stdout is not None:
            return self.stdout
        if self.output is not None:
            import json

            return json.dumps(self.output, sort_keys=True, default=str)
        return ""


class LastStepResult(BaseModel):
    """Result of `run_last_agent_step`: the step, and whether the activity has
    sent the swarm the task's `task_finished` signal already."""

    result: StepResult
    reported: bool = False


class FlowEdge(BaseModel):
    """One movement of work or results between agents, in the order it happened."""

    kind: Literal["split", "delegate", "claim", "pass", "distribute", "collect"]
    source: str = Field(description="Agent id, or `queue` for a shared mesh queue.")
    target: str
    part_index: int | None = None
    note: str | None = None


class TaskProgress(BaseModel):
    """Live view of a task workflow, read by query."""

    task_id: str
    swarm_id: str
    status: TaskStatus
    priority: Priority
    strategy: TaskStrategy
    strategy_used: Literal["parallel", "sequential"] | None = None
    strategy_reason: str | None = None
    topology: Topology | None = None
    kind: ExecutionKind
    assigned_agents: list[str] = Field(default_factory=list)
    waiting_for: list[str] = Field(
        default_factory=list, description="Dependencies not finished yet."
    )
    waiting_reason: str | None = Field(
        None, description="Why a queued task has no agents yet."
    )
    steps_total: int = 0
    steps_completed: int = 0
    steps_failed: int = 0
    steps: list[StepResult] = Field(default_factory=list)
    flow: list[FlowEdge] = Field(default_factory=list)
    output: str | None = None
    error: str | None = None
    submitted_at: UtcDateTime
    started_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None


class SwarmMirror(BaseModel):
    """What the `mirror_swarm` activity writes: the swarm row, its agents and
    the events since the last write."""

    swarm_id: str
    workflow_id: str
    topology: Topology
    strategy: SwarmStrategy
    max_agents: int
    status: SwarmStatus
    task_count: int
    created_at: UtcDateTime
    updated_at: UtcDateTime
    destroyed_at: UtcDateTime | None = None
    agents: list[AgentState]
    events: list[SwarmEvent]


class StopSandboxesRequest(BaseModel):
    sandbox_ids: list[str]


class StopSandboxesResult(BaseModel):
    stopped: list[str]
    # Sandboxes whose session had ended before the stop.
    already_stopped: list[str]
    # Sandboxes that were never created, such as the fixed sandbox id of an
    # agent that had no step to run in its first task.
    absent: list[str] = Field(default_factory=list)
