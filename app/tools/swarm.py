"""Swarm tools: swarms of agents whose orchestrated tasks really run."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistoryEventFilterType,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.queues import ORCHESTRATION
from app.contracts.swarm import (
    DESTROYED_WHILE_RUNNING,
    MAX_CAPABILITIES,
    SWARM_NOT_ACTIVE_ERROR,
    AgentState,
    Language,
    Priority,
    ScaleRequest,
    ScaleResult,
    SpawnAgentRequest,
    StepResult,
    SwarmEvent,
    SwarmMirror,
    SwarmState,
    SwarmStrategy,
    SwarmWorkflowInput,
    TaskClose,
    TaskProgress,
    TaskRecord,
    TaskSpec,
    TaskStrategy,
    TaskWork,
    Topology,
    capability_error,
    task_workflow_id,
)
from app.contracts.types import UtcDateTime
from app.sandbox.secrets import load_key
from app.swarm import planning, service
from app.swarm.actions import (
    BUILTIN_ACTIONS,
    ActionNotAvailableError,
    BuiltinAction,
    check_action,
    seal_action_args,
)
from app.swarm.executor import agent_sandbox_id, build_executor
from app.temporal.search_attributes import SWARM_ID
from app.tools.registry import (
    ToolContext,
    ToolError,
    arguments_error,
    describe_validation_error,
    get_tool,
    secret_fields,
    tool,
)

AgentType = Literal[
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
]

T = TypeVar("T")


def _check_swarm_id(value: str | None) -> str | None:
    # An empty id must not fall back to the newest active swarm, because a
    # script whose swarm id variable is unset would then act on another swarm.
    if value is not None and not value.strip():
        raise ValueError(
            "swarm_id is empty; give the swarm_id that swarm_init returned, or "
            "leave swarm_id out for the newest active swarm"
        )
    return value


SwarmIdArgument = Annotated[
    str | None,
    AfterValidator(_check_swarm_id),
    Field(description="Default: newest active swarm."),
]


def _check_capability(value: str) -> str:
    # A blank capability names nothing, so no task could require it on purpose.
    if not value.strip():
        raise ValueError(
            f"capability {value!r} is empty; name a capability such as gpu, or "
            "leave the empty entry out"
        )
    too_large = capability_error("capability", [value])
    if too_large is not None:
        raise ValueError(too_large)
    return value


def _check_capability_count(value: Any) -> Any:
    # Before the entries are validated, so that a long list of bad entries
    # gets one short error rather than one per entry.
    if isinstance(value, list) and len(value) > MAX_CAPABILITIES:
        too_large = capability_error("the list", value)
        assert too_large is not None
        raise ValueError(too_large)
    return value


Capability = Annotated[str, AfterValidator(_check_capability)]
Capabilities = Annotated[list[Capability], BeforeValidator(_check_capability_count)]

UPDATE_RETRY_SECONDS = 60.0
# How often a wait for a queued task checks that its swarm's workflow runs.
SWARM_CHECK_SECONDS = 2.0

logger = logging.getLogger(__name__)


def swarm_workflow_id(swarm_id: str) -> str:
    return f"swarm-{swarm_id}"


async def _resolve_swarm(ctx: ToolContext, swarm_id: str | None) -> str:
    if swarm_id:
        return swarm_id
    found = await asyncio.to_thread(service.newest_active_swarm_id, ctx.database_url)
    if found is None:
        raise ToolError(
            "no active swarm exists; start one with swarm_init or pass swarm_id",
            kind="not_found",
        )
    return found


async def _update(
    ctx: ToolContext,
    swarm_id: str,
    call: Callable[[], Awaitable[T]],
    what: str,
    check: str | None = None,
) -> T:
    """Run an update of a swarm workflow and turn its failures into tool errors.

    The server limits in-flight updates per workflow (10 by default), so a
    busy swarm returns RESOURCE_EXHAUSTED; the update is retried with backoff
    for up to UPDATE_RETRY_SECONDS.

    Args:
        check: the call that shows whether the update took effect, for the
            error after a lost connection (default: swarm_status on the swarm).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPDATE_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return await call()
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            message = (
                cause.message if isinstance(cause, ApplicationError) else str(cause)
            )
            not_active = (
                isinstance(cause, ApplicationError)
                and cause.type == SWARM_NOT_ACTIVE_ERROR
            )
            raise ToolError(
                f"{what} rejected: {message}",
                kind="conflict" if not_active else "invalid_argument",
            ) from None
        except RPCError as error:
            busy = error.status == RPCStatusCode.RESOURCE_EXHAUSTED
            if busy and loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            tool_error = _swarm_rpc_error(swarm_id, error)
            if tool_error.kind == "unavailable":
                raise _update_unavailable(swarm_id, error, what, check) from None
            if tool_error.kind == "conflict":
                ended = await _ended_workflow(await ctx.client(), swarm_id)
                if ended is not None:
                    raise SwarmEndedError(swarm_id, ended[0]) from None
            raise tool_error from None


def _update_unavailable(
    swarm_id: str, error: RPCError, what: str, check: str | None
) -> ToolError:
    """Build the error of an update whose Temporal call failed in transport.

    The server may have accepted the update before the connection failed, and
    then it takes effect, so a caller that sends it again may apply it twice.
    """
    logger.warning("%s: the Temporal call failed: %s", what, error.message)
    check = check or f"swarm_status with swarm_id {swarm_id}"
    return ToolError(
        f"{what} failed: the Temporal call failed ({error.message}), and the "
        "server may have accepted the change before that, in which case it "
        f"takes effect. Check with {check} before you send it again",
        kind="unavailable",
    )


class SwarmEndedError(ToolError):
    """A swarm whose workflow closed without swarm_destroy (terminated,
    failed, timed out or cancelled), so that it takes no more updates."""

    def __init__(self, swarm_id: str, workflow_status: str) -> None:
        super().__init__(
            f"swarm {swarm_id} ended without swarm_destroy, since its workflow "
            f"is {workflow_status}, and takes no more changes; call "
            "swarm_destroy to stop its agents' sandboxes, and start a new "
            "swarm with swarm_init",
            kind="conflict",
        )
        self.workflow_status = workflow_status


async def _ended_workflow(
    client: Client, swarm_id: str
) -> tuple[str, datetime | None] | None:
    """Return how a swarm's workflow closed, such as "terminated", and when,
    if it closed without swarm_destroy. Return None while it runs, after a
    destroy, or when it cannot be described."""
    try:
        description = await client.get_workflow_handle(
            swarm_workflow_id(swarm_id)
        ).describe()
    except RPCError:
        return None
    status = description.status
    # A destroyed swarm's workflow completes, and a run that continued as new
    # is followed by the running one, which describe returns.
    if status is None or status in (
        WorkflowExecutionStatus.RUNNING,
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.CONTINUED_AS_NEW,
    ):
        return None
    return status.name.lower().replace("_", " "), description.close_time


def _swarm_rpc_error(swarm_id: str, error: RPCError) -> ToolError:
    if error.status == RPCStatusCode.NOT_FOUND:
        if "completed" in error.message.lower():
            return ToolError(
                f"swarm {swarm_id} is destroyed; start a new one with swarm_init",
                kind="conflict",
            )
        return ToolError(
            f"swarm {swarm_id} not found; list swarms with swarm_list",
            kind="not_found",
        )
    return ToolError(
        f"Temporal call for swarm {swarm_id} failed: {error.message}",
        kind="unavailable",
    )


async def _swarm_state(client: Client, swarm_id: str) -> SwarmState:
    handle = client.get_workflow_handle(swarm_workflow_id(swarm_id))
    try:
        return await handle.query("status", result_type=SwarmState)
    except RPCError as error:
        raise _swarm_rpc_error(swarm_id, error) from None
    except WorkflowQueryFailedError as error:
        raise ToolError(f"could not read swarm {swarm_id}: {error}") from None


# swarm_init


class SwarmInitInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    topology: Topology = Field(description="How work flows between agents.")
    max_agents: int = Field(
        8, ge=1, le=100, alias="maxAgents", description="Most agents at once."
    )
    strategy: SwarmStrategy = Field(
        "balanced", description="Which agent types swarm_scale adds."
    )


class SwarmInitResult(BaseModel):
    swarm_id: str
    workflow_id: str
    topology: Topology
    max_agents: int
    strategy: SwarmStrategy
    status: str
    agents: list[AgentState]
    created_at: UtcDateTime


@tool("swarm_init", group="swarm")
async def swarm_init(ctx: ToolContext, args: SwarmInitInput) -> SwarmInitResult:
    """Start a swarm: a durable Temporal workflow that owns its agents and task
    queue. Topology decides how tasks flow (hierarchical tree, mesh shared
    queue, ring pass-along, star hub). Spawn agents next with agent_spawn."""
    client = await ctx.client()
    swarm_id = uuid.uuid4().hex[:12]
    now = datetime.now(UTC)
    state = SwarmState(
        swarm_id=swarm_id,
        topology=args.topology,
        max_agents=args.max_agents,
        strategy=args.strategy,
        created_at=now,
    )
    workflow_id = swarm_workflow_id(swarm_id)
    await client.start_workflow(
        "SwarmWorkflow",
        SwarmWorkflowInput(state=state),
        id=workflow_id,
        task_queue=ORCHESTRATION,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(SWARM_ID, swarm_id)]
        ),
    )
    # The workflow mirrors itself too; writing the row here lets swarm_list and
    # the default swarm of agent_spawn see it at once.
    await asyncio.to_thread(
        service.write_mirror,
        ctx.database_url,
        SwarmMirror(
            swarm_id=swarm_id,
            workflow_id=workflow_id,
            topology=args.topology,
            strategy=args.strategy,
            max_agents=args.max_agents,
            status="active",
            task_count=0,
            created_at=now,
            updated_at=now,
            agents=[],
            events=[],
        ),
    )
    return SwarmInitResult(
        swarm_id=swarm_id,
        workflow_id=workflow_id,
        topology=args.topology,
        max_agents=args.max_agents,
        strategy=args.strategy,
        status="active",
        agents=[],
        created_at=now,
    )


# agent_spawn


class AgentSpawnInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: AgentType
    capabilities: Capabilities = Field(default_factory=list)
    name: str | None = Field(None, max_length=200)
    swarm_id: SwarmIdArgument = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "name is empty; give the agent a name, or leave name out for "
                "one such as coder-1"
            )
        if value is not None and "\0" in value:
            # The agent's programs get the name in NEXUS_AGENT_NAME, so every
            # code and shell step of the agent would fail to start.
            raise ValueError(
                f"name {value!r} contains a NUL byte, which the environment "
                "variable NEXUS_AGENT_NAME cannot hold; remove it"
            )
        return value


class AgentSpawnResult(BaseModel):
    agent_id: str
    swarm_id: str
    type: str
    name: str
    capabilities: list[str]
    status: str
    sandbox_id: str | None = Field(
        description="None until the agent first works; then its sandbox."
    )


@tool("agent_spawn", group="swarm")
async def agent_spawn(ctx: ToolContext, args: AgentSpawnInput) -> AgentSpawnResult:
    """Add an agent to a swarm. Its sandbox is created when it first works.
    Rejected once the swarm has maxAgents agents."""
    client = await ctx.client()
    swarm_id = await _resolve_swarm(ctx, args.swarm_id)
    handle = client.get_workflow_handle(swarm_workflow_id(swarm_id))
    request = SpawnAgentRequest(
        type=args.type, name=args.name, capabilities=args.capabilities
    )
    # One update id for every retry, so the server deduplicates retried spawns
    # (within one run of the swarm workflow).
    update_id = f"spawn-{uuid.uuid4().hex}"
    agent = await _update(
        ctx,
        swarm_id,
        lambda: handle.execute_update(
            "spawn_agent", request, id=update_id, result_type=AgentState
        ),
        f"agent_spawn on swarm {swarm_id}",
    )
    return AgentSpawnResult(
        agent_id=agent.agent_id,
        swarm_id=swarm_id,
        type=agent.type,
        name=agent.name,
        capabilities=agent.capabilities,
        status=agent.status,
        sandbox_id=agent.sandbox_id,
    )


# task_orchestrate


class TaskOrchestrateInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    task: str = Field(
        description="What to do; several lines or list items become parts."
    )
    priority: Priority = "medium"
    strategy: TaskStrategy = "adaptive"
    max_agents: int | None = Field(None, ge=1, le=10, alias="maxAgents")
    dependencies: list[str] = Field(
        default_factory=list, description="Task ids that must complete first."
    )
    swarm_id: SwarmIdArgument = None
    code: str | None = Field(None, description="Program each agent runs.")
    language: Language = "python"
    command: str | None = Field(None, description="Shell command each agent runs.")
    action: str | None = Field(None, description="Built-in action, e.g. system_health.")
    action_args: dict[str, Any] = Field(default_factory=dict)
    required_capabilities: Capabilities = Field(default_factory=list)
    timeout: float = Field(300.0, gt=0, le=86400, description="Seconds per step.")

    @field_validator("task")
    @classmethod
    def _task_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("task is empty; describe what the agents should do")
        return value

    @field_validator("dependencies")
    @classmethod
    def _dependencies_once(cls, value: list[str]) -> list[str]:
        repeated = sorted({d for d in value if value.count(d) > 1})
        if repeated:
            raise ValueError(
                f"dependencies name {repeated} more than once; list each task once"
            )
        return value

    @field_validator("code", "command", "action")
    @classmethod
    def _work_not_blank(cls, value: str | None, info: ValidationInfo) -> str | None:
        # An empty value must not fall through to a natural-language task,
        # which would send the task text to the Messages API.
        if value is not None and not value.strip():
            fix = {
                "code": "give the program to run",
                "command": "give the shell command to run",
                "action": f"name a built-in action ({', '.join(BUILTIN_ACTIONS)})",
            }[info.field_name or ""]
            raise ValueError(
                f"{info.field_name} is empty ({value!r}); {fix}, or leave "
                f"{info.field_name} out for a natural-language task"
            )
        if value is not None and "\0" in value:
            # Neither Python's compiler nor a shell command line can hold one,
            # so the task would be accepted and every step would fail.
            raise ValueError(
                f"{info.field_name} contains a NUL byte at character "
                f"{value.index(chr(0))}, which no program text can hold; remove it"
            )
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> TaskOrchestrateInput:
        given = [
            n for n in ("code", "command", "action") if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise arguments_error(
                f"give at most one of code, command and action, not {given}", *given
            )
        if "\0" in self.task and (self.code is not None or self.command is not None):
            # Each part of the text reaches the program as NEXUS_PART, so the
            # program could never start.
            raise arguments_error(
                f"task {self.task[:80]!r} contains a NUL byte, which the "
                "environment variable NEXUS_PART cannot hold; remove it, or pass "
                "such data in a file",
                "task",
            )
        if "action_args" in self.model_fields_set and not self.action:
            raise arguments_error(
                "action_args are given without action; name the built-in action "
                "they are for, or leave action_args out",
                "action_args",
            )
        if "language" in self.model_fields_set and self.code is None:
            raise arguments_error(
                f"language {self.language!r} is given without code; it is the "
                "language of code, so give code or leave language out",
                "language",
            )
        return self


class TaskOrchestrateResult(BaseModel):
    task_id: str
    swarm_id: str
    workflow_id: str
    status: str
    kind: str
    priority: Priority
    strategy: TaskStrategy
    assigned_agents: list[str]
    dependencies: list[str]


def _work(args: TaskOrchestrateInput) -> TaskWork:
    if args.code is not None:
        kind = "code"
    elif args.command is not None:
        kind = "shell"
    elif args.action is not None:
        kind = "action"
    else:
        kind = "llm"
    return TaskWork(
        kind=kind,
        task=args.task,
        code=args.code,
        language=args.language,
        command=args.command,
        action=args.action,
        action_args=args.action_args,
        timeout_seconds=args.timeout,
    )


def _check_action_args(action: BuiltinAction, arguments: dict[str, Any]) -> None:
    """Validate `action_args` against the input model of the action's tool, so
    that bad arguments fail the submission, not the task when it runs.

    Raises:
        ToolInputError: an argument does not match that model.
    """
    model = get_tool(action.tool).input_model
    try:
        model.model_validate(arguments)
    except ValidationError as error:
        raise describe_validation_error(
            "task_orchestrate",
            error,
            secret_fields(model),
            prefix=("action_args",),
            model=model,
        ) from None


@tool("task_orchestrate", group="swarm")
async def task_orchestrate(
    ctx: ToolContext, args: TaskOrchestrateInput
) -> TaskOrchestrateResult:
    """Run a task on a swarm's agents. With `code` (and `language`) or
    `command` each selected agent runs it in its sandbox; with `action` a
    built-in platform action runs; otherwise the task text goes to an LLM
    (needs ANTHROPIC_API_KEY). Agents are chosen by capability and load,
    critical tasks first, after `dependencies` complete. Read the outcome
    with task_status and task_results."""
    if args.action is not None:
        try:
            action = check_action(args.action)
        except ActionNotAvailableError as error:
            raise ToolError(str(error), kind="invalid_argument") from None
        _check_action_args(action, args.action_args)
        group = get_tool(action.tool).group
        if ctx.groups is not None and group not in ctx.groups:
            raise ToolError(
                f"action {args.action!r} calls {action.tool}, a tool of the group "
                f"{group}, and this key is limited to the groups: "
                f"{', '.join(ctx.groups) or 'none'}; submit it with a key that "
                f"may call {group} tools",
                kind="forbidden",
            )
    client = await ctx.client()
    swarm_id = await _resolve_swarm(ctx, args.swarm_id)
    task_id = service.new_task_id(swarm_id)
    work = _work(args)
    work.groups = None if ctx.groups is None else list(ctx.groups)
    if args.action is not None:
        work.action_args = seal_action_args(
            load_key(ctx.settings), task_id, work.action_args
        )
    spec = TaskSpec(
        task_id=task_id,
        work=work,
        priority=args.priority,
        strategy=args.strategy,
        max_agents=args.max_agents,
        dependencies=args.dependencies,
        required_capabilities=args.required_capabilities,
    )
    handle = client.get_workflow_handle(swarm_workflow_id(swarm_id))
    record = await _update(
        ctx,
        swarm_id,
        lambda: handle.execute_update(
            "submit_task", spec, id=f"submit-{spec.task_id}", result_type=TaskRecord
        ),
        f"task_orchestrate on swarm {swarm_id}",
        # Each call submits a new task, so a retry would run the work twice.
        check=f"task_status with task_id {task_id}",
    )
    return TaskOrchestrateResult(
        task_id=spec.task_id,
        swarm_id=swarm_id,
        workflow_id=record.workflow_id,
        status=record.status,
        kind=spec.work.kind,
        priority=spec.priority,
        strategy=spec.strategy,
        assigned_agents=record.assigned_agents,
        dependencies=spec.dependencies,
    )


# task_status and task_results


class TaskIdInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task_id: str
    wait_seconds: float = Field(
        0.0, ge=0, le=3600, description="Wait this long for the task to finish."
    )

    @field_validator("task_id")
    @classmethod
    def _task_id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "task_id is empty; give the task_id that task_orchestrate returned"
            )
        return value


async def _queued_progress(client: Client, task_id: str) -> TaskProgress | None:
    """Progress of a task that waits for agents, read from its swarm, since
    its child workflow starts only when agents are assigned; None when the
    swarm does not know the task or it has a child already."""
    swarm_id = service.swarm_of_task(task_id)
    if swarm_id is None:
        return None
    try:
        state = await _swarm_state(client, swarm_id)
    except ToolError:
        return None
    record = next((t for t in state.tasks if t.spec.task_id == task_id), None)
    if record is None or record.child_started:
        return None
    if record.status == "queued":
        ended = await _ended_workflow(client, swarm_id)
        if ended is not None:
            state = _settle_queued(state, *ended)
            record = next(t for t in state.tasks if t.spec.task_id == task_id)
    done = {t.spec.task_id for t in state.tasks if t.status == "completed"}
    waiting_for = [d for d in record.spec.dependencies if d not in done]
    return TaskProgress(
        task_id=task_id,
        swarm_id=swarm_id,
        status=record.status,
        priority=record.spec.priority,
        strategy=record.spec.strategy,
        kind=record.spec.work.kind,
        waiting_for=waiting_for,
        waiting_reason=(
            _waiting_reason(state, record, waiting_for)
            if record.status == "queued"
            else None
        ),
        submitted_at=record.submitted_at,
        finished_at=record.finished_at,
        error=record.error,
        topology=state.topology,
    )


def _settle_queued(
    state: SwarmState, workflow_status: str, closed_at: datetime | None
) -> SwarmState:
    """Return the state of a swarm whose workflow ended without swarm_destroy
    (`workflow_status`, such as "terminated"), with its queued tasks
    cancelled. That workflow's last state still lists them as queued, and
    nothing will run them."""
    tasks = [
        task.model_copy(
            update={
                "status": "cancelled",
                "error": (
                    f"the task never ran: its swarm's workflow is {workflow_status}"
                ),
                "finished_at": closed_at,
            }
        )
        if task.status == "queued"
        else task
        for task in state.tasks
    ]
    return state.model_copy(update={"tasks": tasks})


async def _settle_ended(
    ctx: ToolContext,
    client: Client,
    state: SwarmState,
    workflow_status: str,
    closed_at: datetime | None,
) -> tuple[SwarmState, bool]:
    """Return the current state of a swarm whose workflow ended without
    swarm_destroy, and whether swarm_destroy has run since.

    That workflow's last state stopped when it ended. In the state returned,
    queued tasks are cancelled, and running tasks have the outcome of their
    own workflows, which outlive the swarm's. Agents are idle once their
    task has ended, and removed once swarm_destroy has run."""
    state = _settle_queued(state, workflow_status, closed_at)

    running = [t for t in state.tasks if t.status == "running"]
    outcomes = await asyncio.gather(*(_task_outcome(client, t) for t in running))
    ended = {
        task.spec.task_id: outcome
        for task, outcome in zip(running, outcomes, strict=True)
        if outcome is not None
    }
    tasks = [
        task.model_copy(
            update={
                "status": ended[task.spec.task_id].status,
                "error": ended[task.spec.task_id].error,
                "finished_at": ended[task.spec.task_id].finished_at,
            }
        )
        if task.spec.task_id in ended
        else task
        for task in state.tasks
    ]

    rows = await asyncio.to_thread(service.list_swarm_rows, ctx.database_url, "all")
    destroyed = any(
        r.swarm_id == state.swarm_id and r.status == "destroyed" for r in rows
    )
    agents = []
    for agent in state.agents:
        if agent.status == "removed":
            agents.append(agent)
        elif destroyed:
            agents.append(_removed_by_destroy(agent))
        elif agent.current_task_id in ended:
            outcome = ended[agent.current_task_id]
            completed = outcome.status == "completed"
            # The task's steps name the sandbox an agent in its first task got.
            sandbox_id = agent.sandbox_id or next(
                (
                    step.sandbox_id
                    for step in outcome.steps
                    if step.agent_id == agent.agent_id and step.sandbox_id
                ),
                None,
            )
            agents.append(
                agent.model_copy(
                    update={
                        "status": "idle",
                        "current_task_id": None,
                        "sandbox_id": sandbox_id,
                        "tasks_completed": agent.tasks_completed + completed,
                        "tasks_failed": agent.tasks_failed + (not completed),
                    }
                )
            )
        else:
            agents.append(agent)
    return state.model_copy(update={"tasks": tasks, "agents": agents}), destroyed


def _removed_by_destroy(agent: AgentState) -> AgentState:
    """Return the agent as swarm_destroy leaves it."""
    return agent.model_copy(
        update={
            "status": "removed",
            "left_reason": "swarm destroyed",
            "current_task_id": None,
        }
    )


async def _task_outcome(client: Client, task: TaskRecord) -> TaskProgress | None:
    """Return the outcome of a task whose workflow has closed, or None while
    it runs or when it cannot be read."""
    handle: WorkflowHandle[Any, TaskProgress] = client.get_workflow_handle(
        task.workflow_id, result_type=TaskProgress
    )
    try:
        description = await handle.describe()
        if description.status == WorkflowExecutionStatus.RUNNING:
            return None
        return await _result(handle)
    except (RPCError, ToolError) as error:
        logger.warning("could not read task %s: %s", task.spec.task_id, error)
        return None


def _waiting_reason(state: SwarmState, record: TaskRecord, waiting: list[str]) -> str:
    """Return what a queued task waits for: dependencies, an agent with the
    required capabilities, the pinned agent or any idle agent."""
    if waiting:
        return f"waiting for dependencies {waiting} to complete"
    spec = record.spec
    active = [a for a in state.agents if a.status in ("idle", "busy")]
    if spec.agent_id is not None:
        return f"waiting for agent {spec.agent_id} to be idle"
    if spec.required_capabilities:
        capable = [a for a in active if planning.is_eligible(a, spec)]
        if not capable:
            full = len(active) >= state.max_agents
            return (
                f"no agent of swarm {state.swarm_id} has the required_capabilities "
                f"{spec.required_capabilities}; "
                + (
                    f"the swarm has maxAgents {state.max_agents} agents, so "
                    "remove one with swarm_scale, then spawn one with agent_spawn "
                    "and those capabilities"
                    if full
                    else "spawn one with agent_spawn and those capabilities"
                )
            )
        return (
            f"waiting for one of {len(capable)} agents with capabilities "
            f"{spec.required_capabilities} to be idle"
        )
    if not active:
        return f"swarm {state.swarm_id} has no agents; spawn one with agent_spawn"
    return f"waiting for one of {len(active)} agents to be idle"


async def _child_exists(handle: WorkflowHandle[Any, TaskProgress]) -> bool:
    try:
        await handle.describe()
    except RPCError as error:
        # Other errors surface from the calls that follow.
        return error.status != RPCStatusCode.NOT_FOUND
    return True


async def _wait_for_child(
    client: Client,
    handle: WorkflowHandle[Any, TaskProgress],
    swarm_id: str,
    deadline: float,
) -> bool:
    """Poll until a queued task's child workflow exists. Return False at
    `deadline`, or once the swarm's workflow has ended, since no child
    starts then.

    Polls every 0.1 s for the first 10 s, when most queued tasks start, and
    every second after that."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_swarm_check = started + SWARM_CHECK_SECONDS
    while loop.time() < deadline:
        delay = 0.1 if loop.time() - started < 10 else 1.0
        await asyncio.sleep(min(delay, deadline - loop.time()))
        if await _child_exists(handle):
            return True
        if loop.time() >= next_swarm_check:
            if await _ended_workflow(client, swarm_id) is not None:
                return False
            next_swarm_check = loop.time() + SWARM_CHECK_SECONDS
    return False


async def _termination_reason(handle: WorkflowHandle[Any, TaskProgress]) -> str:
    # The failure of a terminated run names only who terminated it; the
    # reason given is on the close event.
    async for event in handle.fetch_history_events(
        event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT
    ):
        if event.HasField("workflow_execution_terminated_event_attributes"):
            reason = event.workflow_execution_terminated_event_attributes.reason
            return reason or "no reason given"
    return "no reason given"


async def _result(handle: WorkflowHandle[Any, TaskProgress]) -> TaskProgress:
    """Return the child's result. For a child that ended without one
    (cancelled before it ran, terminated, timed out), return what it had
    done, as a cancelled task reports it: its completed steps with their
    output, the steps it cut short and the parts it never started."""
    try:
        return await handle.result()
    except WorkflowFailureError as failure:
        cause = failure.cause
        if isinstance(cause, CancelledError):
            status, ending = "cancelled", "the task's workflow was cancelled"
        elif isinstance(cause, TerminatedError):
            reason = await _termination_reason(handle)
            status, ending = "failed", f"the task's workflow was terminated: {reason}"
        else:
            status, ending = "failed", f"the task's workflow failed: {cause}"
        logger.debug("task workflow %s ended without a result: %s", handle.id, ending)
        closed_at = (await handle.describe()).close_time or datetime.now(UTC)
        close = TaskClose(status=status, error=ending, closed_at=closed_at)
        try:
            # A worker replays the closed workflow's history to run the query.
            return await handle.query(
                "closed_progress", close, result_type=TaskProgress
            )
        except WorkflowQueryFailedError as query_error:
            raise ToolError(
                f"the task's workflow {handle.id} ended ({cause}) and its "
                f"progress could not be read: {query_error}; see the workflow "
                "in the Temporal web UI",
                kind="unavailable",
            ) from None


async def _wait_result(
    handle: WorkflowHandle[Any, TaskProgress], seconds: float
) -> TaskProgress | None:
    """Wait up to `seconds` for the child's result. Return None when the wait
    timed out or the task has no child workflow yet."""
    try:
        return await asyncio.wait_for(_result(handle), seconds)
    except TimeoutError:
        return None
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def _task_progress(ctx: ToolContext, args: TaskIdInput) -> TaskProgress:
    client = await ctx.client()
    handle: WorkflowHandle[Any, TaskProgress] = client.get_workflow_handle(
        task_workflow_id(args.task_id), result_type=TaskProgress
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait_seconds
    if args.wait_seconds > 0:
        # A task waited for has a child workflow in most cases, so wait on
        # its result first and look for the child only when that fails.
        try:
            progress = await _wait_result(handle, args.wait_seconds)
        except RPCError as error:
            raise _task_rpc_error(args.task_id, error) from None
        if progress is not None:
            return progress
    if not await _child_exists(handle):
        queued = await _queued_progress(client, args.task_id)
        if queued is not None and queued.status in ("completed", "failed", "cancelled"):
            # Its swarm's workflow ended, or aborted it; either way it has
            # reached its end.
            return queued
        if queued is not None and not await _wait_for_child(
            client, handle, queued.swarm_id, deadline
        ):
            # Read again, since the swarm's workflow may have ended meanwhile.
            return await _queued_progress(client, args.task_id) or queued
    try:
        remaining = deadline - loop.time()
        if remaining > 0:
            try:
                return await asyncio.wait_for(_result(handle), remaining)
            except TimeoutError:
                pass
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            return await _result(handle)
        return await handle.query("status", result_type=TaskProgress)
    except RPCError as error:
        raise _task_rpc_error(args.task_id, error) from None


def _task_rpc_error(task_id: str, error: RPCError) -> ToolError:
    if error.status == RPCStatusCode.NOT_FOUND:
        return ToolError(
            f"task {task_id} not found; use a task_id that task_orchestrate returned",
            kind="not_found",
        )
    return ToolError(
        f"could not read task {task_id}: {error.message}", kind="unavailable"
    )


class TaskStatusResult(BaseModel):
    task_id: str
    swarm_id: str
    status: str
    priority: Priority
    kind: str
    strategy: TaskStrategy
    strategy_used: str | None
    strategy_reason: str | None
    topology: str | None
    assigned_agents: list[str]
    waiting_for: list[str]
    waiting_reason: str | None = Field(
        None, description="Why a queued task has no agents yet."
    )
    steps_total: int
    steps_completed: int
    steps_failed: int
    progress: float = Field(description="Finished steps over all steps, 0 to 1.")
    running: list[str] = Field(description="Agents working on a step now.")
    error: str | None


@tool("task_status", group="swarm")
async def task_status(ctx: ToolContext, args: TaskIdInput) -> TaskStatusResult:
    """Read an orchestrated task's progress live: status, steps done, which
    agents are working now, the strategy chosen and why."""
    progress = await _task_progress(ctx, args)
    finished = progress.steps_completed + progress.steps_failed
    total = progress.steps_total
    return TaskStatusResult(
        task_id=progress.task_id,
        swarm_id=progress.swarm_id,
        status=progress.status,
        priority=progress.priority,
        kind=progress.kind,
        strategy=progress.strategy,
        strategy_used=progress.strategy_used,
        strategy_reason=progress.strategy_reason,
        topology=progress.topology,
        assigned_agents=progress.assigned_agents,
        waiting_for=progress.waiting_for,
        waiting_reason=progress.waiting_reason,
        steps_total=total,
        steps_completed=progress.steps_completed,
        steps_failed=progress.steps_failed,
        progress=round(finished / total, 4) if total else 0.0,
        running=[s.agent_id for s in progress.steps if s.status == "running"],
        error=progress.error,
    )


class TaskResultsResult(BaseModel):
    task_id: str
    swarm_id: str
    status: str
    output: str | None = Field(description="Aggregated output of the task.")
    error: str | None
    results: list[StepResult] = Field(description="Each agent's step, as it ran.")
    flow: list[Any]
    strategy_used: str | None
    strategy_reason: str | None
    topology: str | None
    submitted_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    duration_ms: float | None


@tool("task_results", group="swarm")
async def task_results(ctx: ToolContext, args: TaskIdInput) -> TaskResultsResult:
    """Return an orchestrated task's real output: per agent stdout, stderr and
    exit code (code and shell), text (LLM) or action result, with timings and
    errors, and how work flowed between agents. Set wait_seconds to wait for
    the end."""
    progress = await _task_progress(ctx, args)
    duration = None
    if progress.started_at and progress.finished_at:
        duration = (progress.finished_at - progress.started_at).total_seconds() * 1000
    return TaskResultsResult(
        task_id=progress.task_id,
        swarm_id=progress.swarm_id,
        status=progress.status,
        output=progress.output,
        error=progress.error,
        results=progress.steps,
        flow=[edge.model_dump() for edge in progress.flow],
        strategy_used=progress.strategy_used,
        strategy_reason=progress.strategy_reason,
        topology=progress.topology,
        submitted_at=progress.submitted_at,
        started_at=progress.started_at,
        finished_at=progress.finished_at,
        duration_ms=round(duration, 3) if duration is not None else None,
    )


# swarm_list and swarm_status


class SwarmListInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    status: Literal["active", "destroyed", "all"] = "active"


class SwarmSummary(BaseModel):
    swarm_id: str
    topology: str
    strategy: str
    max_agents: int
    status: str
    agent_count: int
    task_count: int
    created_at: UtcDateTime
    destroyed_at: UtcDateTime | None


class SwarmListResult(BaseModel):
    swarms: list[SwarmSummary]
    count: int


@tool("swarm_list", group="swarm")
async def swarm_list(ctx: ToolContext, args: SwarmListInput) -> SwarmListResult:
    """List swarms, newest first, with agent and task counts (from the
    database mirror that each swarm workflow keeps)."""
    rows = await asyncio.to_thread(
        service.list_swarm_rows, ctx.database_url, args.status
    )
    swarms = [
        SwarmSummary(
            swarm_id=row.swarm_id,
            topology=row.topology,
            strategy=row.strategy,
            max_agents=row.max_agents,
            status=row.status,
            agent_count=row.agent_count,
            task_count=row.task_count,
            created_at=row.created_at,
            destroyed_at=row.destroyed_at,
        )
        for row in rows
    ]
    return SwarmListResult(swarms=swarms, count=len(swarms))


class SwarmIdInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    swarm_id: SwarmIdArgument = None


class AgentView(BaseModel):
    agent_id: str
    type: str
    name: str
    capabilities: list[str]
    status: str
    current_task_id: str | None
    tasks_completed: int
    tasks_failed: int
    sandbox_id: str | None
    sandbox_state: str = Field(description="Read live from the sandbox backend.")
    sandbox_backend: str


class TaskView(BaseModel):
    task_id: str
    status: str
    priority: str
    kind: str
    assigned_agents: list[str]
    dependencies: list[str]
    submitted_at: UtcDateTime
    finished_at: UtcDateTime | None
    error: str | None


class SwarmStatusResult(BaseModel):
    swarm_id: str
    topology: str
    strategy: str
    max_agents: int
    status: str
    agents: list[AgentView]
    tasks: list[TaskView]
    task_counts: dict[str, int]
    created_at: UtcDateTime
    runtime_seconds: float
    workflow_runs: int


@tool("swarm_status", group="swarm")
async def swarm_status(ctx: ToolContext, args: SwarmIdInput) -> SwarmStatusResult:
    """Read a swarm live from its workflow: agents (with each sandbox's state
    read from the backend now), tasks and runtime."""
    client = await ctx.client()
    swarm_id = await _resolve_swarm(ctx, args.swarm_id)
    state = await _swarm_state(client, swarm_id)
    executor = build_executor(client, ctx.settings)
    status: str = state.status
    end = state.destroyed_at or datetime.now(UTC)
    if state.status != "destroyed":
        # The state of a workflow that an operator terminated, or that failed,
        # still reads active.
        ended = await _ended_workflow(client, swarm_id)
        if ended is not None:
            end = ended[1] or end
            state, destroyed = await _settle_ended(ctx, client, state, *ended)
            status = "destroyed" if destroyed else ended[0]

    async def sandbox_of(agent: AgentState) -> tuple[str | None, str]:
        sandbox_id = agent.sandbox_id
        if sandbox_id is None and agent.current_task_id is not None:
            # The swarm learns the sandbox only when the agent's first task
            # ends; its id is fixed, so read it from the backend meanwhile.
            sandbox_id = agent_sandbox_id(agent.agent_id)
        if not sandbox_id:
            return None, "not_created"
        sandbox_state = await executor.state(sandbox_id)
        if sandbox_state == "not_created":
            return None, sandbox_state
        return sandbox_id, sandbox_state

    # All at once, because the status read of a busy agent's sandbox waits
    # 2 s for the session's query.
    sandboxes = await asyncio.gather(*(sandbox_of(a) for a in state.agents))
    agents: list[AgentView] = []
    for agent, (sandbox_id, sandbox_state) in zip(state.agents, sandboxes, strict=True):
        agents.append(
            AgentView(
                agent_id=agent.agent_id,
                type=agent.type,
                name=agent.name,
                capabilities=agent.capabilities,
                status=agent.status,
                current_task_id=agent.current_task_id,
                tasks_completed=agent.tasks_completed,
                tasks_failed=agent.tasks_failed,
                sandbox_id=sandbox_id,
                sandbox_state=sandbox_state,
                sandbox_backend=executor.backend,
            )
        )
    counts: dict[str, int] = {}
    for task in state.tasks:
        counts[task.status] = counts.get(task.status, 0) + 1
    return SwarmStatusResult(
        swarm_id=state.swarm_id,
        topology=state.topology,
        strategy=state.strategy,
        max_agents=state.max_agents,
        status=status,
        agents=agents,
        tasks=[
            TaskView(
                task_id=t.spec.task_id,
                status=t.status,
                priority=t.spec.priority,
                kind=t.spec.work.kind,
                assigned_agents=t.assigned_agents,
                dependencies=t.spec.dependencies,
                submitted_at=t.submitted_at,
                finished_at=t.finished_at,
                error=t.error,
            )
            for t in state.tasks
        ],
        task_counts=counts,
        created_at=state.created_at,
        runtime_seconds=round((end - state.created_at).total_seconds(), 3),
        workflow_runs=state.runs,
    )


# swarm_scale and swarm_destroy


class SwarmScaleInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # The lower bound is checked below, for a message that names the fix;
    # the schema still shows it.
    target_agents: int = Field(le=100, json_schema_extra={"minimum": 1})
    swarm_id: SwarmIdArgument = None

    @field_validator("target_agents")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                "a swarm keeps at least 1 agent; to stop every agent and end "
                "the swarm, call swarm_destroy"
            )
        return value


class SwarmScaleResult(BaseModel):
    swarm_id: str
    agents: int
    added: list[str]
    removed: list[str]
    draining: list[str]
    sandboxes_stopping: list[str]


@tool("swarm_scale", group="swarm")
async def swarm_scale(ctx: ToolContext, args: SwarmScaleInput) -> SwarmScaleResult:
    """Grow or shrink a swarm to target_agents. New agents' types follow the
    swarm strategy; idle agents leave first and their sandboxes are stopped,
    busy ones leave when their task ends."""
    client = await ctx.client()
    swarm_id = await _resolve_swarm(ctx, args.swarm_id)
    handle = client.get_workflow_handle(swarm_workflow_id(swarm_id))
    result = await _update(
        ctx,
        swarm_id,
        lambda: handle.execute_update(
            "scale",
            ScaleRequest(target_agents=args.target_agents),
            result_type=ScaleResult,
        ),
        f"swarm_scale on swarm {swarm_id}",
    )
    return SwarmScaleResult(
        swarm_id=swarm_id,
        agents=result.agents,
        added=[a.agent_id for a in result.added],
        removed=[a.agent_id for a in result.removed],
        draining=result.draining,
        sandboxes_stopping=[a.sandbox_id for a in result.removed if a.sandbox_id],
    )


class SwarmDestroyResult(BaseModel):
    swarm_id: str
    status: str
    agents_removed: int
    sandboxes_stopped: list[str]
    tasks_cancelled: list[str]
    destroyed_at: UtcDateTime | None


@tool("swarm_destroy", group="swarm")
async def swarm_destroy(ctx: ToolContext, args: SwarmIdInput) -> SwarmDestroyResult:
    """Destroy a swarm: cancel its queued and running tasks, stop every agent's
    sandbox and end the swarm workflow."""
    client = await ctx.client()
    swarm_id = await _resolve_swarm(ctx, args.swarm_id)
    handle = client.get_workflow_handle(swarm_workflow_id(swarm_id))
    try:
        state = await _update(
            ctx,
            swarm_id,
            lambda: handle.execute_update("destroy", result_type=SwarmState),
            f"swarm_destroy on swarm {swarm_id}",
        )
    except SwarmEndedError as ended:
        return await _destroy_ended_swarm(ctx, client, swarm_id, ended)
    # Wait for the final mirror write, so swarm_list agrees at once.
    try:
        await client.get_workflow_handle(
            swarm_workflow_id(swarm_id), result_type=SwarmState
        ).result()
    except Exception as error:
        raise ToolError(f"swarm {swarm_id} did not finish cleanly: {error}") from None
    cancelled = [
        t.spec.task_id
        for t in state.tasks
        if t.status == "cancelled" and t.error and "destroyed" in t.error
    ]
    # Agents that swarm_scale removed before are not counted again.
    removed = [a for a in state.agents if a.left_reason == "swarm destroyed"]
    return SwarmDestroyResult(
        swarm_id=swarm_id,
        status=state.status,
        agents_removed=len(removed),
        sandboxes_stopped=[a.sandbox_id for a in removed if a.sandbox_id],
        tasks_cancelled=cancelled,
        destroyed_at=state.destroyed_at,
    )


async def _destroy_ended_swarm(
    ctx: ToolContext, client: Client, swarm_id: str, ended: SwarmEndedError
) -> SwarmDestroyResult:
    """Destroy a swarm whose workflow ended without swarm_destroy, doing what
    that workflow no longer can: cancel the running tasks, stop the agents'
    sandboxes and mark the swarm destroyed in the database mirror.

    Raises:
        ToolError: the mirror shows the swarm destroyed already, or its last
            state cannot be read.
    """
    rows = await asyncio.to_thread(service.list_swarm_rows, ctx.database_url, "all")
    if any(r.swarm_id == swarm_id and r.status == "destroyed" for r in rows):
        raise ToolError(
            f"swarm {swarm_id} is destroyed; start a new one with swarm_init",
            kind="conflict",
        )
    # A query of a closed workflow replays its history, so the last state
    # is still readable.
    state = await _swarm_state(client, swarm_id)
    now = datetime.now(UTC)
    logger.info(
        "destroying swarm %s, whose workflow is %s", swarm_id, ended.workflow_status
    )
    # A task still queued without a workflow needs no cancel: the status
    # tools report it cancelled once its swarm's workflow has ended.
    never_ran = [
        task.spec.task_id
        for task in state.tasks
        if task.status == "queued" and not task.child_started
    ]
    cancelled = await asyncio.gather(
        *(
            _cancel_task_workflow(client, task)
            for task in state.tasks
            if task.status == "running"
            or (task.status == "queued" and task.child_started)
        )
    )
    leaving = [a for a in state.agents if a.status != "removed"]
    executor = build_executor(client, ctx.settings)
    # An agent in its first task has a sandbox that the state does not name
    # yet, and stopping a sandbox that was never created stops nothing.
    sandbox_ids = [a.sandbox_id or agent_sandbox_id(a.agent_id) for a in leaving]
    stopped = await asyncio.gather(*(executor.stop(s) for s in sandbox_ids))
    events = list(state.unflushed_events)
    agents = []
    for agent in state.agents:
        if agent.status == "removed":
            agents.append(agent)
            continue
        agents.append(_removed_by_destroy(agent))
        events.append(
            _mirror_event(
                state, len(events), "agent_left", now, agent_id=agent.agent_id
            )
        )
    events.append(_mirror_event(state, len(events), "swarm_destroyed", now))
    await asyncio.to_thread(
        service.write_mirror,
        ctx.database_url,
        SwarmMirror(
            swarm_id=swarm_id,
            workflow_id=swarm_workflow_id(swarm_id),
            topology=state.topology,
            strategy=state.strategy,
            max_agents=state.max_agents,
            status="destroyed",
            task_count=len(state.tasks),
            created_at=state.created_at,
            updated_at=now,
            destroyed_at=now,
            agents=agents,
            events=events,
        ),
    )
    return SwarmDestroyResult(
        swarm_id=swarm_id,
        status="destroyed",
        agents_removed=len(leaving),
        sandboxes_stopped=[
            s for s, done in zip(sandbox_ids, stopped, strict=True) if done
        ],
        tasks_cancelled=[task_id for task_id in cancelled if task_id] + never_ran,
        destroyed_at=now,
    )


def _mirror_event(
    state: SwarmState,
    offset: int,
    kind: Literal["agent_left", "swarm_destroyed"],
    at: datetime,
    *,
    agent_id: str | None = None,
) -> SwarmEvent:
    """Build the event at `offset` of a list that starts with the unflushed
    events of an ended swarm's last state, numbered on from those."""
    seq = state.next_event_seq - len(state.unflushed_events) + offset
    detail: dict[str, object] = {"reason": "swarm destroyed"} if agent_id else {}
    return SwarmEvent(
        event_id=f"{state.swarm_id}:{seq}",
        swarm_id=state.swarm_id,
        seq=seq,
        kind=kind,
        agent_id=agent_id,
        detail=detail,
        at=at,
    )


async def _cancel_task_workflow(client: Client, task: TaskRecord) -> str | None:
    """Cancel a task's workflow with the reason a destroy gives; return the
    task id, or None when the workflow has ended already."""
    handle = client.get_workflow_handle(task_workflow_id(task.spec.task_id))
    try:
        # The server accepts a cancel request of a task workflow that has
        # completed, so look first.
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            return None
        await handle.cancel(reason=DESTROYED_WHILE_RUNNING)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise ToolError(
            f"could not cancel task {task.spec.task_id}: {error.message}; call "
            "swarm_destroy again",
            kind="unavailable",
        ) from None
    return task.spec.task_id
