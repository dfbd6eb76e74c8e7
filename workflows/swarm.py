"""`SwarmWorkflow`, one long-lived entity per swarm, and `SwarmTaskWorkflow`,
one child per orchestrated task that runs the task through the swarm's
topology."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
)

with workflow.unsafe.imports_passed_through():
    from app.contracts.queues import ORCHESTRATION, SANDBOX
    from app.contracts.swarm import (
        AGENT_TYPES,
        DESTROYED_WHILE_RUNNING,
        MAX_QUEUED_WORK_BYTES,
        MAX_TASK_TEXT_BYTES,
        MAX_TASK_WORK_BYTES,
        SWARM_NOT_ACTIVE_ERROR,
        AgentState,
        AgentStepRequest,
        Assignment,
        FlowEdge,
        LastStepResult,
        ScaleRequest,
        ScaleResult,
        SpawnAgentRequest,
        StepResult,
        StopSandboxesRequest,
        StopSandboxesResult,
        SwarmEvent,
        SwarmMirror,
        SwarmState,
        SwarmTaskInput,
        SwarmWorkflowInput,
        TaskCancelRequest,
        TaskClose,
        TaskFinished,
        TaskProgress,
        TaskRecord,
        TaskSpec,
        TaskWatchRequest,
        TaskWatchResult,
        capability_error,
        task_workflow_id,
        work_bytes,
    )
    from app.swarm import planning
    from app.temporal.endings import workflow_ending
    from app.temporal.search_attributes import SWARM_ID


# Characters of a started task's text that the swarm's record keeps.
_TRIMMED_TEXT_CHARS = 200


def _spec_digest(spec: TaskSpec) -> str:
    # A spec without groups hashes as it did before the field existed, so
    # the digests that a running swarm recorded still match.
    exclude = {"work": {"groups"}} if spec.work.groups is None else None
    return hashlib.sha256(spec.model_dump_json(exclude=exclude).encode()).hexdigest()


def _trim_work(task: TaskRecord) -> None:
    """Drop a started task's text and code from the swarm's state.

    The task workflow's input contains them. The state is sent with every
    status query and continue-as-new, where a few large tasks would pass the
    2 MB payload limit of the Temporal server's default configuration."""
    work = task.spec.work
    trimmed = work.model_copy(
        update={
            "task": work.task[:_TRIMMED_TEXT_CHARS],
            "code": None,
            "command": None,
            "action_args": {},
        }
    )
    task.spec = task.spec.model_copy(update={"work": trimmed})
    task.work_trimmed = True


def swarm_workflow_id(swarm_id: str) -> str:
    return f"swarm-{swarm_id}"


def agent_sandbox_id(agent_id: str) -> str:
    """Return an agent's fixed sandbox id (as `app.swarm.executor` does)."""
    return f"sbx_{agent_id.removeprefix('agent_')}"


MIRROR_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)

# Patch ids of changes to the commands SwarmWorkflow issues, so runs started by
# older code replay unchanged.
_PATCH_START_ON_ASSIGNMENT = "swarm-start-child-on-assignment"
_PATCH_TASK_EVENT_BATCH = "swarm-task-event-batch"
_PATCH_LOCAL_MIRROR = "swarm-local-mirror-write"
# Patch id of the change that takes the two mirror decisions above once, as
# the mirror loop starts. The older call of `swarm-task-event-batch` came right
# after a local activity, and a replay whose loop was cancelled before that
# activity's result (destroy, continue-as-new) never reached it where the
# original run had: a nondeterminism error. The loop's first step runs in the
# run's first workflow task, which the original and every replay share.
_PATCH_MIRROR_DECIDED_AT_START = "swarm-mirror-decided-at-start"
# Patch id of the SwarmTaskWorkflow change that runs a task's only step as
# `run_last_agent_step`, which reports the task's end to the swarm.
_PATCH_LAST_STEP_REPORTS = "swarm-last-step-reports-task"
# Patch id of the change that stops a removed agent's sandbox even when the
# agent is still in its first task, whose sandbox the swarm has not seen yet.
_PATCH_STOP_FIRST_TASK_SANDBOX = "swarm-stop-first-task-sandbox"
# Patch id of the change that ends a task cancelled before its first workflow
# task ran with a "cancelled" result, where older code ended it as cancelled.
_PATCH_CANCEL_BEFORE_START = "swarm-task-cancel-before-start"

# Patch id of the change that makes a scale-up keep agents that are still
# draining from an earlier scale-down, before it adds new agents.
_PATCH_SCALE_KEEPS_DRAINING = "swarm-scale-keeps-draining-agents"

# Patch id of the change that gives a destroy's cancel of a running task its
# reason, and makes a task cancelled from outside its swarm report its end.
_PATCH_CANCEL_REASON = "swarm-task-cancel-reason"

# Patch id of the change that gives an agent its fixed sandbox id when its
# first program task ends without reporting one (cancelled or failed).
_PATCH_UNREPORTED_SANDBOX = "swarm-unreported-first-sandbox"

# Patch id of the change that ends the record of a task whose workflow
# closed without reporting to the swarm (terminated, timed out), freeing its
# agents.
_PATCH_WATCH_CHILD_CLOSE = "swarm-watch-task-close"

# Patch id of the change that makes a run also watch, through the
# `watch_task_close` activity, the task workflows that an earlier run of the
# swarm started and that still run.
_PATCH_WATCH_CARRIED_TASKS = "swarm-watch-carried-tasks"

# Patch id of the change that makes `adaptive` count only the agents that run
# parts, not a star's hub or a hierarchy's root, so that a hub and one worker
# run a task's parts in sequence.
_PATCH_STRATEGY_WORKING_AGENTS = "swarm-strategy-counts-working-agents"

# Heartbeat timeout of `watch_task_close`: a worker that dies during the
# wait is noticed after this long, and the retry waits on.
WATCH_HEARTBEAT_TIMEOUT = timedelta(seconds=30)

# Event kinds that each task produces; their mirror writes are batched.
_TASK_EVENTS = frozenset(
    (
        "task_submitted",
        "task_assigned",
        "task_completed",
        "task_failed",
        "task_cancelled",
    )
)


@workflow.defn(sandboxed=False)
class SwarmWorkflow:
    """A swarm: its agents, its task queue and its dispatcher.

    Agent spawn and removal, task submission and task cancel are updates
    with validators; `status` is a query. Tasks run in child workflows
    (abandoned on close, so they outlive continue-as-new) that report back
    with the `task_finished` signal. All state is in `SwarmState`, handed to
    the next run when the history grows past the server's suggestion.
    """

    @workflow.init
    def __init__(self, input: SwarmWorkflowInput) -> None:
        self.state: SwarmState = input.state
        self.continue_as_new_after = input.continue_as_new_after_events
        self.mirror_busy = False
        # Tasks whose child workflow is being started now.
        self.starting: set[str] = set()
        # Waits on the task workflows that an earlier run started, kept here
        # because the event loop holds only weak references to tasks.
        self.watches: list[asyncio.Task[None]] = []
        # Here, not in run: an update that arrives with the first workflow task
        # is handled before run starts, and the start must be event 0.
        if self.state.runs == 1 and self.state.next_event_seq == 0:
            self._event(
                "swarm_started",
                detail={
                    "topology": self.state.topology,
                    "max_agents": self.state.max_agents,
                },
            )

    # Queries and signals

    @workflow.query
    def status(self) -> SwarmState:
        return self.state

    @workflow.signal
    def task_finished(self, finished: TaskFinished) -> None:
        task = self._find_task(finished.task_id)
        if task is None or task.status not in ("running", "queued"):
            return
        task.status = finished.status
        task.error = finished.error
        task.finished_at = workflow.now()
        for agent_id in task.assigned_agents:
            agent = self._find_agent(agent_id)
            if agent is None or agent.current_task_id != task.spec.task_id:
                continue
            agent.current_task_id = None
            agent.sandbox_id = finished.sandboxes.get(agent_id, agent.sandbox_id)
            if (
                agent.sandbox_id is None
                and finished.status != "completed"
                and task.spec.work.kind in ("code", "shell")
                and workflow.patched(_PATCH_UNREPORTED_SANDBOX)
            ):
                # A step cut short or failed reports no sandbox, though it
                # may have created one. With the fixed id recorded, a later
                # scale-down or destroy stops that sandbox.
                agent.sandbox_id = agent_sandbox_id(agent_id)
            if finished.status == "completed":
                agent.tasks_completed += 1
            else:
                agent.tasks_failed += 1
            if agent.status == "removing":
                self._remove_agent(agent, reason="scaled down")
            elif agent.status == "busy":
                agent.status = "idle"
        kind = {
            "completed": "task_completed",
            "failed": "task_failed",
        }.get(finished.status, "task_cancelled")
        self._event(
            kind,
            task_id=task.spec.task_id,
            detail={"error": finished.error, "agents": task.assigned_agents},
        )
        self._dispatch()

    # Updates

    @workflow.update
    async def spawn_agent(self, request: SpawnAgentRequest) -> AgentState:
        agent = self._add_agent(request.type, request.name, request.capabilities)
        self._dispatch()
        return agent

    @spawn_agent.validator
    def _validate_spawn(self, request: SpawnAgentRequest) -> None:
        self._require_active()
        if request.type not in AGENT_TYPES:
            raise ValueError(
                f"unknown agent type {request.type!r}; choose one of "
                f"{', '.join(AGENT_TYPES)}"
            )
        if request.name is not None:
            holder = [a for a in self._active_agents() if a.name == request.name]
            if holder:
                raise ValueError(
                    f"agent name {request.name!r} is taken by {holder[0].agent_id} "
                    f"in swarm {self.state.swarm_id}; choose another name"
                )
        too_large = capability_error("capabilities", request.capabilities)
        if too_large is not None:
            raise ValueError(too_large)
        present = len(self._active_agents())
        if present >= self.state.max_agents:
            raise ValueError(
                f"swarm {self.state.swarm_id} already has {present} agents, its "
                f"maxAgents is {self.state.max_agents}; remove agents with "
                "swarm_scale or start a larger swarm"
            )

    def _check_work_size(self, spec: TaskSpec) -> None:
        too_large = capability_error(
            "required_capabilities", spec.required_capabilities
        )
        if too_large is not None:
            raise ValueError(too_large)
        text = len(spec.work.task.encode())
        if text > MAX_TASK_TEXT_BYTES:
            raise ValueError(
                f"task is {text} bytes; at most {MAX_TASK_TEXT_BYTES} are "
                "allowed: put large inputs in a file (sandbox_upload or "
                "storage_upload) and name it in the task"
            )
        size = work_bytes(spec.work)
        if size > MAX_TASK_WORK_BYTES:
            raise ValueError(
                f"task, code, command and action_args take {size} bytes as "
                f"JSON; at most {MAX_TASK_WORK_BYTES} are allowed: put large "
                "inputs in a file (sandbox_upload or storage_upload) and read "
                "it from the program"
            )
        queued = sum(
            work_bytes(t.spec.work)
            for t in self.state.tasks
            if not t.child_started and not t.work_trimmed
        )
        if queued + size > MAX_QUEUED_WORK_BYTES:
            raise ValueError(
                f"swarm {self.state.swarm_id} already contains {queued} bytes of "
                "tasks that have not started, and this one would pass the "
                f"{MAX_QUEUED_WORK_BYTES} bytes allowed; wait for queued tasks "
                "to start, or add agents with swarm_scale"
            )

    @workflow.update
    async def submit_task(self, spec: TaskSpec) -> TaskRecord:
        existing = self._find_task(spec.task_id)
        if existing is not None:
            # A retried submission of the same task returns the first record.
            if self._starts_child_on_assignment():
                await workflow.wait_condition(
                    lambda: existing.spec.task_id not in self.starting
                )
            else:
                await workflow.wait_condition(lambda: existing.child_started)
            return existing
        record = TaskRecord(
            spec=spec,
            workflow_id=task_workflow_id(spec.task_id),
            submitted_at=workflow.now(),
            seq=self.state.next_task_seq,
            work_digest=_spec_digest(spec),
        )
        self.state.next_task_seq += 1
        self.state.tasks.append(record)
        self._event(
            "task_submitted",
            task_id=spec.task_id,
            detail={"priority": spec.priority, "kind": spec.work.kind},
        )
        if self._starts_child_on_assignment():
            # The child starts once the task has agents (or is aborted), with
            # the assignment in its input: no assign signal and no workflow
            # task of a child that only waits.
            self._dispatch()
            if spec.task_id in self.state.pending_assignments:
                self.state.pending_assignments.remove(spec.task_id)
                await self._start_child(record)
            return record
        await self._start_child(record, with_assignment=False)
        self._dispatch()
        return record

    @submit_task.validator
    def _validate_submit(self, spec: TaskSpec) -> None:
        self._require_active()
        work = spec.work
        if not work.task.strip():
            raise ValueError("task is empty; describe what the agents should do")
        if work.kind == "code" and not (work.code or "").strip():
            raise ValueError("code is empty; give the program to run")
        if work.kind == "shell" and not (work.command or "").strip():
            raise ValueError("command is empty; give the shell command to run")
        if work.kind == "action" and not (work.action or "").strip():
            raise ValueError("action is empty; name the built-in action to run")
        self._check_work_size(spec)
        existing = self._find_task(spec.task_id)
        if existing is not None:
            if existing.spec == spec or existing.work_digest == _spec_digest(spec):
                return
            raise ValueError(
                f"task id {spec.task_id} is already used by another task; "
                "submit with a new task id"
            )
        if spec.agent_id is not None:
            agent = self._find_agent(spec.agent_id)
            if agent is None or agent.status in ("removed", "removing"):
                raise ValueError(
                    f"agent {spec.agent_id} is not an active agent of swarm "
                    f"{self.state.swarm_id}; choose an agent from swarm_status"
                )
        active = [a for a in self._active_agents() if a.status != "removing"]
        if (
            spec.required_capabilities
            and len(active) >= self.state.max_agents
            and not any(planning.is_eligible(a, spec) for a in active)
        ):
            raise ValueError(
                f"no agent of swarm {self.state.swarm_id} has the "
                f"required_capabilities {spec.required_capabilities}, and it has "
                f"maxAgents {self.state.max_agents} agents already; remove one "
                "with swarm_scale and spawn one with those capabilities"
            )
        unknown = [d for d in spec.dependencies if self._find_task(d) is None]
        if unknown:
            raise ValueError(
                f"unknown dependencies {unknown} in swarm {self.state.swarm_id}; "
                "depend only on task ids that task_orchestrate returned for it"
            )

    @workflow.update
    async def cancel_task(self, request: TaskCancelRequest) -> TaskRecord:
        """Cancel a queued task, so that it never runs, and return its record.

        A running task is left to the caller, which cancels the task's
        workflow as a cancel from outside the swarm. The update returns once
        that workflow has started, so that the cancel finds it. A task that
        has ended is returned unchanged."""
        task = self._find_task(request.task_id)
        assert task is not None  # checked by the validator
        if task.status == "queued":
            self._cancel_unstarted(task, request.reason)
            # Tasks that depend on this one fail now, without running.
            self._dispatch()
        elif task.status == "running":
            await workflow.wait_condition(lambda: task.child_started)
        return task

    @cancel_task.validator
    def _validate_cancel(self, request: TaskCancelRequest) -> None:
        if self._find_task(request.task_id) is None:
            raise ValueError(
                f"task {request.task_id} is not a task of swarm "
                f"{self.state.swarm_id}; give a task id that task_orchestrate "
                "returned for this swarm"
            )

    @workflow.update
    async def scale(self, request: ScaleRequest) -> ScaleResult:
        result = ScaleResult(agents=0)
        active = [a for a in self._active_agents() if a.status != "removing"]
        if request.target_agents > len(active):
            missing = request.target_agents - len(active)
            draining = [a for a in self._active_agents() if a.status == "removing"]
            if draining and workflow.patched(_PATCH_SCALE_KEEPS_DRAINING):
                # Agents that a scale-down marked are still present and busy,
                # so keep them before adding new agents next to them, which
                # would pass maxAgents once counted with them.
                for agent in draining[:missing]:
                    agent.status = "busy" if agent.current_task_id else "idle"
                missing -= min(missing, len(draining))
            types = planning.SCALE_TYPES[self.state.strategy]
            for _ in range(missing):
                agent_type = types[self.state.next_agent_seq % len(types)]
                result.added.append(self._add_agent(agent_type, None, []))
        else:
            excess = len(active) - request.target_agents
            idle = [a for a in reversed(active) if a.status == "idle"]
            busy = [a for a in reversed(active) if a.status == "busy"]
            for agent in idle[:excess]:
                self._remove_agent(agent, reason="scaled down")
                result.removed.append(agent)
            for agent in busy[: max(0, excess - len(idle))]:
                agent.status = "removing"
                result.draining.append(agent.agent_id)
        result.agents = len(
            [a for a in self._active_agents() if a.status != "removing"]
        )
        self._dispatch()
        # Return once the removed agents' sandboxes are really stopped.
        stopping = {a.sandbox_id for a in result.removed if a.sandbox_id}
        await workflow.wait_condition(
            lambda: not stopping.intersection(self.state.sandboxes_to_stop)
        )
        return result

    @scale.validator
    def _validate_scale(self, request: ScaleRequest) -> None:
        self._require_active()
        if request.target_agents > self.state.max_agents:
            raise ValueError(
                f"target_agents {request.target_agents} is above the swarm's "
                f"maxAgents {self.state.max_agents}; use at most "
                f"{self.state.max_agents}"
            )

    @workflow.update
    async def destroy(self) -> SwarmState:
        if self.state.status == "active":
            self.state.status = "destroying"
            for task in self.state.tasks:
                if task.status == "queued":
                    task.status = "cancelled"
                    task.error = "the swarm was destroyed before the task ran"
                    task.finished_at = workflow.now()
                    if task.child_started or self._starts_child_on_assignment():
                        self.state.pending_assignments.append(task.spec.task_id)
                elif task.status == "running":
                    task.status = "cancelled"
                    task.error = DESTROYED_WHILE_RUNNING
                    task.finished_at = workflow.now()
                    self.state.pending_cancels.append(task.spec.task_id)
                else:
                    continue
                self._event("task_cancelled", task_id=task.spec.task_id)
            for agent in self._active_agents():
                self._remove_agent(agent, reason="swarm destroyed")
        await workflow.wait_condition(lambda: self.state.status == "destroyed")
        return self.state

    # The run: deliver assignments, stop sandboxes, mirror, continue as new

    @workflow.run
    async def run(self, input: SwarmWorkflowInput) -> SwarmState:
        workflow.logger.info(
            "swarm %s running (run %d)", self.state.swarm_id, self.state.runs
        )
        mirror = asyncio.create_task(self._mirror_loop())
        self._watch_carried_tasks()
        while True:
            await workflow.wait_condition(
                lambda: bool(
                    self.state.pending_assignments
                    or self.state.pending_cancels
                    or self.state.sandboxes_to_stop
                    or self.state.status == "destroying"
                    or self._should_continue_as_new()
                )
            )
            await self._deliver()
            if self.state.status == "destroying" and not self._has_outbox():
                self.state.status = "destroyed"
                self.state.destroyed_at = workflow.now()
                self._event("swarm_destroyed")
                await workflow.wait_condition(workflow.all_handlers_finished)
                await workflow.wait_condition(self._mirror_idle)
                mirror.cancel()
                workflow.logger.info("swarm %s destroyed", self.state.swarm_id)
                return self.state
            if self._should_continue_as_new() and not self._has_outbox():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if self._has_outbox():
                    continue
                mirror.cancel()
                self.state.runs += 1
                workflow.logger.info(
                    "swarm %s continues as new (run %d)",
                    self.state.swarm_id,
                    self.state.runs,
                )
                workflow.continue_as_new(
                    SwarmWorkflowInput(
                        state=self.state,
                        continue_as_new_after_events=self.continue_as_new_after,
                    )
                )

    async def _deliver(self) -> None:
        assignments = list(self.state.pending_assignments)
        cancels = list(self.state.pending_cancels)
        stops = list(self.state.sandboxes_to_stop)
        sends: list[Awaitable[None]] = []
        for task_id in assignments:
            task = self._find_task(task_id)
            if task is not None:
                sends.append(self._send_assignment(task))
        for task_id in cancels:
            sends.append(self._cancel_task(task_id))
        await asyncio.gather(*sends)
        if stops:
            result: StopSandboxesResult = await workflow.execute_activity(
                "stop_agent_sandboxes",
                StopSandboxesRequest(sandbox_ids=stops),
                task_queue=SANDBOX,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_attempts=5),
                result_type=StopSandboxesResult,
            )
            self._forget_absent_sandboxes(result.absent)
        self._drop(self.state.pending_assignments, assignments)
        self._drop(self.state.pending_cancels, cancels)
        self._drop(self.state.sandboxes_to_stop, stops)

    def _forget_absent_sandboxes(self, absent: list[str]) -> None:
        """Clear the sandbox id of each removed agent whose sandbox the stop
        found never created, so that `swarm_destroy` and `swarm_status` do
        not report it. Such an id is the fixed one guessed for an agent
        removed in its first task (`_remove_agent`, `task_finished`), while
        the agent had no step to run: the hub of a star, the root of a
        hierarchy, or an agent whose part had not started. This changes
        only the state, not the commands."""
        for agent in self.state.agents:
            if agent.status == "removed" and agent.sandbox_id in absent:
                agent.sandbox_id = None

    def _assignment(self, task: TaskRecord) -> Assignment:
        if task.status in ("failed", "cancelled"):
            return Assignment(
                topology=self.state.topology,
                abort=task.error,
                abort_status="cancelled" if task.status == "cancelled" else "failed",
                aborted_at=task.finished_at,
            )
        agents = [a for a in self.state.agents if a.agent_id in task.assigned_agents]
        agents.sort(key=lambda a: task.assigned_agents.index(a.agent_id))
        return Assignment(agents=agents, topology=self.state.topology)

    def _starts_child_on_assignment(self) -> bool:
        # False only while replaying a run of older code, which started each
        # task's child at submission and sent the assignment by signal.
        return workflow.patched(_PATCH_START_ON_ASSIGNMENT)

    async def _start_child(
        self, task: TaskRecord, *, with_assignment: bool = True
    ) -> None:
        task_id = task.spec.task_id
        self.starting.add(task_id)
        try:
            handle = await workflow.start_child_workflow(
                SwarmTaskWorkflow.run,
                SwarmTaskInput(
                    swarm_id=self.state.swarm_id,
                    spec=task.spec,
                    assignment=self._assignment(task) if with_assignment else None,
                    submitted_at=task.submitted_at,
                ),
                id=task.workflow_id,
                task_queue=ORCHESTRATION,
                # Tasks outlive this run when the swarm continues as new;
                # destroy cancels the ones still running.
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                search_attributes=TypedSearchAttributes(
                    [SearchAttributePair(SWARM_ID, self.state.swarm_id)]
                ),
            )
            task.child_started = True
            if workflow.patched(_PATCH_WATCH_CHILD_CLOSE):
                handle.add_done_callback(functools.partial(self._task_closed, task_id))
            if with_assignment:
                # Runs of older code started the child before choosing its
                # agents, which reads the text, so they keep it.
                _trim_work(task)
        finally:
            self.starting.discard(task_id)

    def _task_closed(self, task_id: str, handle: asyncio.Task[Any]) -> None:
        """End the record of a task whose workflow, started by this run,
        closed without telling this swarm.

        A task that completes, fails or is cancelled reports first. One that
        is terminated (web UI, `temporal workflow terminate`) or timed out
        never does, and its agents would otherwise stay busy for good."""
        if handle.cancelled():
            return  # this run ended first
        error = handle.exception()
        if error is None:
            return
        cause = error.__cause__ if isinstance(error, ChildWorkflowError) else error
        self._end_unreported(task_id, workflow_ending(cause))

    def _watch_carried_tasks(self) -> None:
        """Watch the task workflows that an earlier run of this swarm started
        and that still run.

        Only the run that starts a child has the handle whose close
        `_task_closed` hears of. A later run waits on the others by workflow
        id in the `watch_task_close` activity, one per task, which completes
        when the task workflow closes."""
        carried = [
            task
            for task in self.state.tasks
            if task.child_started and task.status in ("running", "queued")
        ]
        if not carried or not workflow.patched(_PATCH_WATCH_CARRIED_TASKS):
            return
        for task in carried:
            self.watches.append(
                asyncio.create_task(
                    self._watch_task(task.spec.task_id, task.workflow_id)
                )
            )

    async def _watch_task(self, task_id: str, workflow_id: str) -> None:
        result: TaskWatchResult = await workflow.execute_activity(
            "watch_task_close",
            TaskWatchRequest(task_id=task_id, workflow_id=workflow_id),
            task_queue=ORCHESTRATION,
            # A task can run for longer than one attempt's timeout, so the
            # retry policy has no attempt limit and the retry waits on.
            start_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=WATCH_HEARTBEAT_TIMEOUT,
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
            result_type=TaskWatchResult,
        )
        if result.ending is not None:
            self._end_unreported(task_id, result.ending)

    def _end_unreported(self, task_id: str, ending: str) -> None:
        """Record a task whose workflow closed as `ending` ("terminated",
        "timed out", ...) without reporting to this swarm, and free its
        agents. A task that reported is left as it is."""
        task = self._find_task(task_id)
        if task is None or task.status not in ("running", "queued"):
            return
        workflow.logger.warning(
            "task %s of swarm %s ended without reporting: its workflow was %s",
            task_id,
            self.state.swarm_id,
            ending,
        )
        self.task_finished(
            TaskFinished(
                task_id=task_id,
                status="cancelled" if ending == "cancelled" else "failed",
                error=f"the task's workflow was {ending}",
            )
        )

    async def _send_assignment(self, task: TaskRecord) -> None:
        if not task.child_started:
            if task.spec.task_id not in self.starting:
                await self._start_child(task)
                return
            await workflow.wait_condition(lambda: task.child_started)
        # Wait only for a child that is still starting: every await yields,
        # and an extra yield would reorder the commands of older runs.
        assignment = self._assignment(task)
        handle = workflow.get_external_workflow_handle(task.workflow_id)
        try:
            await handle.signal(SwarmTaskWorkflow.assign, assignment)
        except ApplicationError as error:
            workflow.logger.warning(
                "could not signal task %s: %s", task.spec.task_id, error
            )

    async def _cancel_task(self, task_id: str) -> None:
        task = self._find_task(task_id)
        if task is not None and not task.child_started:
            # Destroyed while submit_task was still starting the child.
            await workflow.wait_condition(lambda: task.child_started)
        handle = workflow.get_external_workflow_handle(task_workflow_id(task_id))
        reason = (
            DESTROYED_WHILE_RUNNING if workflow.patched(_PATCH_CANCEL_REASON) else ""
        )
        try:
            await handle.cancel(reason=reason)
        except ApplicationError as error:
            workflow.logger.warning("could not cancel task %s: %s", task_id, error)

    async def _mirror_loop(self) -> None:
        decided_at_start = workflow.patched(_PATCH_MIRROR_DECIDED_AT_START)
        while True:
            await workflow.wait_condition(
                lambda: self.state.mirror_dirty or bool(self.state.unflushed_events)
            )
            self.mirror_busy = True
            events = list(self.state.unflushed_events)
            self.state.mirror_dirty = False
            try:
                if decided_at_start or workflow.patched(_PATCH_LOCAL_MIRROR):
                    # The write is registered on this workflow's own worker,
                    # so a local activity skips the activity task's round
                    # trip through the server.
                    await workflow.execute_local_activity(
                        "mirror_swarm",
                        self._mirror(events),
                        start_to_close_timeout=timedelta(seconds=30),
                        retry_policy=MIRROR_RETRY,
                        result_type=int,
                    )
                else:
                    await workflow.execute_activity(
                        "mirror_swarm",
                        self._mirror(events),
                        task_queue=ORCHESTRATION,
                        start_to_close_timeout=timedelta(seconds=30),
                        retry_policy=MIRROR_RETRY,
                        result_type=int,
                    )
            finally:
                self.mirror_busy = False
            del self.state.unflushed_events[: len(events)]
            interval = self.state.task_event_batch_seconds
            if interval > 0 and (
                decided_at_start or workflow.patched(_PATCH_TASK_EVENT_BATCH)
            ):
                # Each write is an activity with its own events and workflow
                # tasks, so task events wait up to `interval` to share one.
                # Other changes end the wait (see _flush_now).
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(self._flush_now, timeout=interval)

    def _flush_now(self) -> bool:
        return (
            self.state.status != "active"
            or self._should_continue_as_new()
            or any(e.kind not in _TASK_EVENTS for e in self.state.unflushed_events)
        )

    def _mirror_idle(self) -> bool:
        return not (
            self.mirror_busy or self.state.mirror_dirty or self.state.unflushed_events
        )

    def _mirror(self, events: list[SwarmEvent]) -> SwarmMirror:
        state = self.state
        return SwarmMirror(
            swarm_id=state.swarm_id,
            workflow_id=workflow.info().workflow_id,
            topology=state.topology,
            strategy=state.strategy,
            max_agents=state.max_agents,
            status=state.status,
            task_count=len(state.tasks),
            created_at=state.created_at,
            updated_at=workflow.now(),
            destroyed_at=state.destroyed_at,
            agents=state.agents,
            events=events,
        )

    # State changes, all synchronous so each is atomic

    def _fail_unstarted(self, task: TaskRecord, error: str) -> None:
        """Fail a queued task before it gets agents, and queue the outcome
        for its task workflow."""
        task.status = "failed"
        task.error = error
        task.finished_at = workflow.now()
        self.state.pending_assignments.append(task.spec.task_id)
        self._event("task_failed", task_id=task.spec.task_id, detail={"error": error})

    def _cancel_unstarted(self, task: TaskRecord, error: str) -> None:
        """Cancel a queued task before it gets agents, and queue the outcome
        for its task workflow, which then ends without running anything."""
        task.status = "cancelled"
        task.error = error
        task.finished_at = workflow.now()
        if task.child_started or self._starts_child_on_assignment():
            self.state.pending_assignments.append(task.spec.task_id)
        self._event(
            "task_cancelled", task_id=task.spec.task_id, detail={"error": error}
        )

    def _dispatch(self) -> None:
        """Give queued tasks whose dependencies are done to idle agents, in
        priority order."""
        starts_later = self._starts_child_on_assignment()
        for task in planning.dispatch_order(self.state.tasks):
            if not task.child_started and not starts_later:
                continue
            dependencies = [self._find_task(d) for d in task.spec.dependencies]
            broken = [
                d.spec.task_id
                for d in dependencies
                if d is not None and d.status in ("failed", "cancelled")
            ]
            if broken:
                self._fail_unstarted(task, f"dependencies {broken} did not complete")
                continue
            pinned = task.spec.agent_id
            if pinned is not None:
                agent = self._find_agent(pinned)
                if agent is None or agent.status in ("removed", "removing"):
                    self._fail_unstarted(
                        task, f"agent {pinned} left the swarm before the task ran"
                    )
                    continue
            if any(d is None or d.status != "completed" for d in dependencies):
                continue
            limit = planning.default_agent_count(task.spec, self.state.topology)
            chosen = planning.select_agents(self.state.agents, task.spec, limit)
            if not chosen:
                continue
            chosen = planning.order_for_topology(chosen, self.state.topology)
            for agent in chosen:
                agent.status = "busy"
                agent.current_task_id = task.spec.task_id
            task.status = "running"
            task.assigned_agents = [a.agent_id for a in chosen]
            task.assigned_at = workflow.now()
            self.state.pending_assignments.append(task.spec.task_id)
            self._event(
                "task_assigned",
                task_id=task.spec.task_id,
                detail={"agents": task.assigned_agents},
            )

    def _add_agent(
        self, agent_type: str, name: str | None, capabilities: list[str]
    ) -> AgentState:
        seq = self.state.next_agent_seq
        self.state.next_agent_seq += 1
        agent = AgentState(
            agent_id=f"agent_{workflow.uuid4().hex[:12]}",
            type=agent_type,
            name=name or self._free_name(agent_type, seq),
            capabilities=capabilities,
            joined_at=workflow.now(),
            seq=seq,
        )
        self.state.agents.append(agent)
        self._event(
            "agent_joined",
            agent_id=agent.agent_id,
            detail={"type": agent.type, "name": agent.name},
        )
        return agent

    def _free_name(self, agent_type: str, seq: int) -> str:
        """Return `<type>-<n>` for the first n from `seq` that no active agent
        is named, since a user may have chosen such a name already."""
        taken = {a.name for a in self._active_agents()}
        number = seq
        while f"{agent_type}-{number}" in taken:
            number += 1
        return f"{agent_type}-{number}"

    def _remove_agent(self, agent: AgentState, *, reason: str) -> None:
        if (
            agent.sandbox_id is None
            and agent.current_task_id is not None
            and workflow.patched(_PATCH_STOP_FIRST_TASK_SANDBOX)
        ):
            # Busy in its first task: the sandbox may run already, and the
            # task reports it only at its end, which a destroy cancels.
            agent.sandbox_id = agent_sandbox_id(agent.agent_id)
        agent.status = "removed"
        agent.left_reason = reason
        agent.current_task_id = None
        if agent.sandbox_id:
            self.state.sandboxes_to_stop.append(agent.sandbox_id)
        self._event("agent_left", agent_id=agent.agent_id, detail={"reason": reason})

    def _event(
        self,
        kind: str,
        *,
        agent_id: str | None = None,
        task_id: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        seq = self.state.next_event_seq
        self.state.next_event_seq += 1
        self.state.mirror_dirty = True
        self.state.unflushed_events.append(
            SwarmEvent(
                event_id=f"{self.state.swarm_id}:{seq}",
                swarm_id=self.state.swarm_id,
                seq=seq,
                kind=kind,
                agent_id=agent_id,
                task_id=task_id,
                detail=detail or {},
                at=workflow.now(),
            )
        )

    def _require_active(self) -> None:
        if self.state.status != "active":
            raise ApplicationError(
                f"swarm {self.state.swarm_id} is {self.state.status}; start a new "
                "one with swarm_init",
                type=SWARM_NOT_ACTIVE_ERROR,
                non_retryable=True,
            )

    def _active_agents(self) -> list[AgentState]:
        return [a for a in self.state.agents if a.status != "removed"]

    def _find_agent(self, agent_id: str) -> AgentState | None:
        return next((a for a in self.state.agents if a.agent_id == agent_id), None)

    def _find_task(self, task_id: str) -> TaskRecord | None:
        return next((t for t in self.state.tasks if t.spec.task_id == task_id), None)

    def _has_outbox(self) -> bool:
        return bool(
            self.state.pending_assignments
            or self.state.pending_cancels
            or self.state.sandboxes_to_stop
        )

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        if info.is_continue_as_new_suggested():
            return True
        limit = self.continue_as_new_after
        return limit is not None and info.get_current_history_length() >= limit

    @staticmethod
    def _drop(items: list[str], sent: list[str]) -> None:
        for item in sent:
            if item in items:
                items.remove(item)


STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
    non_retryable_error_types=["StepFailed"],
)


def _cancel_reason() -> str:
    """Return the reason of this workflow's cancel request, as its sender gave
    it. The server prefixes a reason that another workflow sent with that
    workflow's run id."""
    reason = workflow.cancellation_reason() or ""
    if reason.startswith("Cancel requested by workflow"):
        _, marker, sent = reason.partition(" with reason: ")
        if marker:
            return sent
    return reason


def _failed_attempt(cause: BaseException | None) -> int:
    """Return the attempt that a step activity's failure reports in its
    details, or 1 for failures without one (timeouts, older workers)."""
    if isinstance(cause, ApplicationError):
        for detail in cause.details:
            if isinstance(detail, dict) and isinstance(detail.get("attempt"), int):
                return detail["attempt"]
    return 1


@workflow.defn(sandboxed=False)
class SwarmTaskWorkflow:
    """One task: wait for the swarm's assignment, run the parts on the agents
    along the topology, report back to the swarm.

    Strategies: `parallel` runs parts at once, `sequential` one after another
    with each step given the previous output, `adaptive` picks one of them
    (`planning.choose_strategy`) and records why.
    """

    @workflow.init
    def __init__(self, input: SwarmTaskInput) -> None:
        self.input = input
        self.assignment: Assignment | None = input.assignment
        self.progress = TaskProgress(
            task_id=input.spec.task_id,
            swarm_id=input.swarm_id,
            status="queued",
            priority=input.spec.priority,
            strategy=input.spec.strategy,
            kind=input.spec.work.kind,
            waiting_for=list(input.spec.dependencies),
            submitted_at=input.submitted_at or workflow.now(),
        )
        self.next_step = 0
        # The task's parts once `_execute` has split it, so that a cancelled
        # task can list the parts that never ran.
        self.parts: list[str] = []
        # Whole outputs of the completed steps by part index, since the step
        # records keep trimmed copies. A cancelled task's output uses them.
        self.completed_outputs: dict[int, str] = {}
        # Set when the task has one step, which then reports the task's end.
        self.last_step_reports = False
        self.reported = False

    @workflow.signal
    def assign(self, assignment: Assignment) -> None:
        if self.assignment is None:
            self.assignment = assignment

    @workflow.query
    def status(self) -> TaskProgress:
        return self.progress

    @workflow.run
    async def run(self, input: SwarmTaskInput) -> TaskProgress:
        try:
            await workflow.wait_condition(lambda: self.assignment is not None)
        except asyncio.CancelledError:
            # A destroy can cancel a task whose child has not run yet: the
            # cancel then arrives with the start, before this wait ends.
            if not workflow.patched(_PATCH_CANCEL_BEFORE_START):
                raise
            progress = self._cancelled_before_start()
            await self._report_outside_cancel()
            return progress
        assignment = self.assignment
        assert assignment is not None
        progress = self.progress
        progress.waiting_for = []
        progress.topology = assignment.topology
        if assignment.abort is not None:
            progress.status = assignment.abort_status
            progress.error = assignment.abort
            progress.finished_at = assignment.aborted_at or workflow.now()
            return progress
        progress.status = "running"
        progress.started_at = workflow.now()
        progress.assigned_agents = [a.agent_id for a in assignment.agents]
        try:
            await self._execute(assignment)
        except asyncio.CancelledError:
            progress = self._cancelled(assignment)
            await self._report_outside_cancel()
            return progress
        progress.finished_at = workflow.now()
        failed = [s for s in progress.steps if s.status == "failed"]
        progress.steps_failed = len(failed)
        progress.status, error = planning.task_outcome(progress.steps)
        if error is not None:
            progress.error = error
        if not self.reported:
            await self._report()
        return progress

    def _cancelled(self, assignment: Assignment) -> TaskProgress:
        """End a task cancelled while it ran. Its result keeps the steps that
        completed and their aggregated output, and lists each part that never
        ran as skipped. This changes only the result, not the commands."""
        progress = self.progress
        progress.status = "cancelled"
        progress.error = progress.error or _cancel_reason() or "the task was cancelled"
        progress.finished_at = workflow.now()
        self._close_steps(
            progress,
            assignment,
            step_error="the task was cancelled while the step ran",
            skip_error="not run: the task was cancelled before this part started",
        )
        return progress

    @workflow.query
    def closed_progress(self, close: TaskClose) -> TaskProgress:
        """Return the result of a task whose workflow closed without one
        (terminated, timed out), built as a cancelled task builds its own.

        The whole outputs of the completed steps are the results of their
        activities in this workflow's history. A query of a closed workflow
        replays that history, so they are back in `completed_outputs`, where
        the `status` query's step records keep only a trimmed share, and the
        swarm keeps no output at all.
        NOTE: the replay stops at the last workflow task that completed. A
        step whose activity completed after it, just before the close, is
        reported as cut short."""
        progress = self.progress.model_copy(deep=True)
        progress.status = close.status
        progress.error = progress.error or close.error
        if progress.finished_at is not None:
            return progress  # the task had ended and only its report was left
        progress.finished_at = close.closed_at
        self._close_steps(
            progress,
            self.assignment,
            step_error="the task's workflow ended while the step ran",
            skip_error="not run: the task's workflow ended before this part started",
        )
        return progress

    def _close_steps(
        self,
        progress: TaskProgress,
        assignment: Assignment | None,
        *,
        step_error: str,
        skip_error: str,
    ) -> None:
        """End the steps of `progress` that were running at its `finished_at`,
        list each part that no step started as skipped, and set the output of
        the completed steps."""
        # Steps cut short end with the task, not stay running. Their partial
        # stdout never came back from the activity, so it stays unset.
        for index, step in enumerate(progress.steps):
            if step.status == "running":
                progress.steps[index] = step.model_copy(
                    update={
                        "status": "cancelled",
                        "error": step_error,
                        "finished_at": progress.finished_at,
                        # A program step ran in its agent's fixed sandbox.
                        "sandbox_id": step.sandbox_id
                        or (
                            agent_sandbox_id(step.agent_id)
                            if step.kind in ("code", "shell")
                            else None
                        ),
                    }
                )
        if assignment is not None:
            self._skip_unstarted(progress, assignment, skip_error)
        progress.output = self._completed_output(progress)

    def _skip_unstarted(
        self, progress: TaskProgress, assignment: Assignment, error: str
    ) -> None:
        """Record each part that no step of `progress` started as skipped."""
        started = {s.part_index for s in progress.steps}
        owners = planning.part_owners(
            assignment.topology, len(assignment.agents), len(self.parts)
        )
        step = self.next_step
        for part_index, part in enumerate(self.parts):
            if part_index in started:
                continue
            progress.steps.append(
                self._step_record(
                    step,
                    assignment.agents[owners[part_index]],
                    part_index,
                    part,
                    status="skipped",
                    error=error,
                )
            )
            step += 1

    def _completed_output(self, progress: TaskProgress) -> str | None:
        """Return the completed steps' output: the last one's for a sequential
        task, else all of them joined in part order, like a finished task's
        output. Return None when no step completed."""
        done = [s for s in progress.steps if s.status == "completed"]
        if not done:
            return None
        outputs = self.completed_outputs
        if progress.strategy_used == "sequential":
            return planning.trimmed_output(outputs[done[-1].part_index])
        return planning.trimmed_output(
            planning.join_outputs([outputs[index] for index in sorted(outputs)])
        )

    def _cancelled_before_start(self) -> TaskProgress:
        progress = self.progress
        progress.waiting_for = []
        if self.assignment is not None:
            progress.topology = self.assignment.topology
        progress.status = "cancelled"
        progress.error = _cancel_reason() or "the task was cancelled before it started"
        progress.finished_at = workflow.now()
        return progress

    async def _report_outside_cancel(self) -> None:
        """Tell the swarm about a cancel that did not come from its destroy
        (one from the web UI or `temporal workflow cancel`), which the swarm
        would otherwise never hear of, keeping the task's agents busy."""
        if self.reported or _cancel_reason() == DESTROYED_WHILE_RUNNING:
            return  # the swarm has recorded it already
        if workflow.patched(_PATCH_CANCEL_REASON):
            await self._report()

    async def _report(self) -> None:
        sandboxes = {
            s.agent_id: s.sandbox_id for s in self.progress.steps if s.sandbox_id
        }
        handle = workflow.get_external_workflow_handle(
            swarm_workflow_id(self.input.swarm_id)
        )
        try:
            await handle.signal(
                SwarmWorkflow.task_finished,
                TaskFinished(
                    task_id=self.progress.task_id,
                    status=self.progress.status,
                    error=self.progress.error,
                    sandboxes=sandboxes,
                ),
            )
        except ApplicationError as error:
            workflow.logger.warning(
                "task %s could not report to swarm %s: %s",
                self.progress.task_id,
                self.input.swarm_id,
                error,
            )

    async def _execute(self, assignment: Assignment) -> None:
        spec = self.input.spec
        agents = assignment.agents
        topology = assignment.topology
        workers = planning.working_agent_count(topology, len(agents))
        parts = planning.split_parts(spec, workers)
        self.parts = parts
        counted = len(agents)
        if workers != counted and workflow.patched(_PATCH_STRATEGY_WORKING_AGENTS):
            counted = workers
        strategy, reason = planning.choose_strategy(spec, parts, counted)
        self.progress.strategy_used = strategy  # type: ignore[assignment]
        self.progress.strategy_reason = reason
        self.progress.steps_total = len(parts)
        self.last_step_reports = len(parts) == 1 and workflow.patched(
            _PATCH_LAST_STEP_REPORTS
        )
        runner: Callable[[list[AgentState], list[str], bool], Awaitable[list[str]]]
        runner = {
            "hierarchical": self._hierarchical,
            "mesh": self._mesh,
            "ring": self._ring,
            "star": self._star,
        }[topology]
        outputs = await runner(agents, parts, strategy == "sequential")
        done = [s for s in self.progress.steps if s.status == "completed"]
        if strategy == "sequential":
            output = outputs[-1] if outputs else ""
            if len(done) < len(outputs):
                # The chain broke at its last step, so every step before it
                # completed. Take that output from `outputs`, since the
                # records in `done` keep only a trimmed share of it.
                output = outputs[len(done) - 1] if done else ""
        else:
            # The completed parts only, as for a sequential or cancelled task;
            # a failed part's output is in its step.
            completed = {s.part_index for s in done}
            output = planning.join_outputs(
                [o for index, o in enumerate(outputs) if index in completed]
            )
        # As for a cancelled task, no completed step means no output.
        self.progress.output = planning.trimmed_output(output) if done else None

    # Topologies. Each returns the outputs in part order (sequential: the
    # chain's outputs in execution order).

    async def _hierarchical(
        self, agents: list[AgentState], parts: list[str], sequential: bool
    ) -> list[str]:
        root = agents[0]
        plural = "" if len(parts) == 1 else "s"
        self._flow("split", root, root, note=f"{len(parts)} subtask{plural}")
        owners = planning.part_owners("hierarchical", len(agents), len(parts))
        if len(agents) == 1:
            # A root without children works every part itself. As a star's
            # lone hub does, it delegates each part to itself and collects it.
            for j in range(len(parts)):
                self._flow("delegate", root, root, part_index=j)
            outputs = await self._run_parts([root] * len(parts), parts, sequential)
            for j in range(len(outputs)):
                self._flow("collect", root, root, part_index=j, note="aggregate")
            return outputs
        for j, node in enumerate(owners):
            path = planning.tree_path(node)
            for upper, lower in itertools.pairwise(path):
                self._flow("delegate", agents[upper], agents[lower], part_index=j)
        outputs = await self._run_parts([agents[n] for n in owners], parts, sequential)
        # Results flow up the tree, children before parents, to the root.
        worked = set(owners)
        for node in range(len(agents) - 1, 0, -1):
            if self._subtree_worked(node, worked, len(agents)):
                parent = planning.tree_parent(node)
                assert parent is not None
                self._flow("collect", agents[node], agents[parent], note="aggregate")
        return outputs

    @staticmethod
    def _subtree_worked(node: int, worked: set[int], size: int) -> bool:
        stack = [node]
        while stack:
            current = stack.pop()
            if current in worked:
                return True
            stack += [c for c in (2 * current + 1, 2 * current + 2) if c < size]
        return False

    async def _mesh(
        self, agents: list[AgentState], parts: list[str], sequential: bool
    ) -> list[str]:
        queue = deque(enumerate(parts))
        outputs = [""] * len(parts)
        if sequential:
            previous: str | None = None
            turn = 0
            chain: list[str] = []
            while queue:
                index, part = queue.popleft()
                agent = agents[turn % len(agents)]
                turn += 1
                self._flow("claim", None, agent, part_index=index)
                step = await self._step(agent, index, len(parts), part, previous)
                previous = step.output_text()
                chain.append(previous)
                if step.status == "failed":
                    for rest, (later, text) in enumerate(queue, start=turn):
                        self._skip(agents[rest % len(agents)], later, text)
                    break
            return chain

        async def claim_loop(agent: AgentState) -> None:
            while queue:
                index, part = queue.popleft()
                self._flow("claim", None, agent, part_index=index)
                step = await self._step(agent, index, len(parts), part, None)
                outputs[index] = step.output_text()

        await asyncio.gather(*(claim_loop(a) for a in agents))
        return outputs

    async def _ring(
        self, agents: list[AgentState], parts: list[str], sequential: bool
    ) -> list[str]:
        n = len(agents)
        if sequential:
            outputs: list[str] = []
            previous: str | None = None
            for index, part in enumerate(parts):
                agent = agents[index % n]
                if index > 0:
                    self._flow("pass", agents[(index - 1) % n], agent, part_index=index)
                step = await self._step(agent, index, len(parts), part, previous)
                previous = step.output_text()
                outputs.append(previous)
                if step.status == "failed":
                    for later in range(index + 1, len(parts)):
                        self._skip(agents[later % n], later, parts[later])
                    break
            return outputs
        outputs = await self._run_parts(
            [agents[i % n] for i in range(len(parts))], parts, False
        )
        # Partial results travel once around the ring, 0 -> 1 -> ... -> 0.
        members = min(n, len(parts))
        if members > 1:
            for i in range(members):
                self._flow(
                    "pass", agents[i], agents[(i + 1) % members], note="partial result"
                )
        return outputs

    async def _star(
        self, agents: list[AgentState], parts: list[str], sequential: bool
    ) -> list[str]:
        hub = agents[0]
        owners = [
            agents[i] for i in planning.part_owners("star", len(agents), len(parts))
        ]
        if sequential:
            outputs: list[str] = []
            previous: str | None = None
            for index, (agent, part) in enumerate(zip(owners, parts, strict=True)):
                self._flow("distribute", hub, agent, part_index=index)
                step = await self._step(agent, index, len(parts), part, previous)
                self._flow("collect", agent, hub, part_index=index)
                previous = step.output_text()
                outputs.append(previous)
                if step.status == "failed":
                    for later in range(index + 1, len(parts)):
                        self._skip(owners[later], later, parts[later])
                    break
            return outputs
        for index, agent in enumerate(owners):
            self._flow("distribute", hub, agent, part_index=index)
        outputs = await self._run_parts(owners, parts, False)
        for index, agent in enumerate(owners):
            self._flow("collect", agent, hub, part_index=index)
        return outputs

    async def _run_parts(
        self, owners: list[AgentState], parts: list[str], sequential: bool
    ) -> list[str]:
        if sequential:
            outputs: list[str] = []
            previous: str | None = None
            for index, (agent, part) in enumerate(zip(owners, parts, strict=True)):
                step = await self._step(agent, index, len(parts), part, previous)
                previous = step.output_text()
                outputs.append(previous)
                if step.status == "failed":
                    for later in range(index + 1, len(parts)):
                        self._skip(owners[later], later, parts[later])
                    break
            return outputs
        steps = await asyncio.gather(
            *(
                self._step(agent, index, len(parts), part, None)
                for index, (agent, part) in enumerate(zip(owners, parts, strict=True))
            )
        )
        return [s.output_text() for s in steps]

    def _skip(self, agent: AgentState, part_index: int, part: str) -> None:
        """Record a part that a sequential chain did not run, since an
        earlier step failed."""
        failed = next(s for s in self.progress.steps if s.status == "failed")
        self.progress.steps.append(
            self._step_record(
                self.next_step,
                agent,
                part_index,
                part,
                status="skipped",
                error=(
                    f"not run: step {failed.step} (part {failed.part_index}) "
                    "failed before it"
                ),
            )
        )
        self.next_step += 1

    def _step_record(
        self,
        step: int,
        agent: AgentState,
        part_index: int,
        part: str,
        **fields: Any,
    ) -> StepResult:
        """Build the record of one step of `agent` on one part of the task."""
        return StepResult(
            step=step,
            agent_id=agent.agent_id,
            agent_name=agent.name,
            agent_type=agent.type,
            part_index=part_index,
            part=part,
            kind=self.input.spec.work.kind,
            **fields,
        )

    async def _step(
        self,
        agent: AgentState,
        part_index: int,
        part_count: int,
        part: str,
        previous: str | None,
    ) -> StepResult:
        step_number = self.next_step
        self.next_step += 1
        placeholder = self._step_record(
            step_number,
            agent,
            part_index,
            part,
            status="running",
            started_at=workflow.now(),
        )
        self.progress.steps.append(placeholder)
        request = AgentStepRequest(
            swarm_id=self.input.swarm_id,
            task_id=self.input.spec.task_id,
            step=step_number,
            agent=agent,
            work=self.input.spec.work,
            part_index=part_index,
            part_count=part_count,
            part=part,
            previous_output=previous,
            dependencies=list(self.input.spec.dependencies),
        )
        try:
            result = await self._run_step_activity(request)
        except ActivityError as error:
            cause = error.cause
            if isinstance(cause, CancelledError):
                # The task itself was cancelled (swarm destroyed): stop, not fail.
                raise asyncio.CancelledError() from error
            message = (
                cause.message
                if isinstance(cause, ApplicationError)
                else str(cause or error)
            )
            result = placeholder.model_copy(
                update={
                    "status": "failed",
                    "error": message,
                    "attempt": _failed_attempt(cause),
                    "finished_at": workflow.now(),
                }
            )
        index = self.progress.steps.index(placeholder)
        # The record keeps a bounded copy; the caller gets the whole result,
        # whose output the next step of a chain receives.
        self.progress.steps[index] = planning.trimmed_step(
            result, max(self.progress.steps_total, 1)
        )
        if result.status == "completed":
            self.completed_outputs[part_index] = result.output_text()
            self.progress.steps_completed += 1
        else:
            self.progress.steps_failed += 1
        return result

    async def _run_step_activity(self, request: AgentStepRequest) -> StepResult:
        timeout = timedelta(seconds=self.input.spec.work.timeout_seconds + 60)
        if self.last_step_reports:
            last: LastStepResult = await workflow.execute_activity(
                "run_last_agent_step",
                request,
                task_queue=SANDBOX,
                start_to_close_timeout=timeout,
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=STEP_RETRY,
                result_type=LastStepResult,
            )
            self.reported = last.reported
            return last.result
        step: StepResult = await workflow.execute_activity(
            "run_agent_step",
            request,
            task_queue=SANDBOX,
            start_to_close_timeout=timeout,
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=STEP_RETRY,
            result_type=StepResult,
        )
        return step

    def _flow(
        self,
        kind: str,
        source: AgentState | None,
        target: AgentState,
        *,
        part_index: int | None = None,
        note: str | None = None,
    ) -> None:
        self.progress.flow.append(
            FlowEdge(
                kind=kind,
                source=source.agent_id if source else "queue",
                target=target.agent_id,
                part_index=part_index,
                note=note,
            )
        )
