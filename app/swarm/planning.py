"""Deterministic planning of swarm work: agent selection, splitting a task into
parts, the adaptive strategy choice and the hierarchical tree.

Workflows import this module, so it uses only the standard library and the
contracts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from app.contracts.swarm import (
    MAX_STEP_PART_CHARS,
    MAX_STEPS_TEXT_BYTES,
    MAX_TASK_OUTPUT_BYTES,
    PRIORITY_RANK,
    AgentState,
    StepResult,
    TaskRecord,
    TaskSpec,
    TaskStatus,
)

# Agent types that suit each kind of execution, best first; they break ties
# after capability matches.
KIND_PREFERENCES: dict[str, tuple[str, ...]] = {
    "code": ("coder", "tester", "optimizer", "specialist"),
    "shell": ("coder", "tester", "monitor", "specialist"),
    "action": ("specialist", "coordinator", "monitor"),
    "llm": ("researcher", "analyst", "architect", "reviewer", "documenter"),
}

# Types chosen in turn when `swarm_scale` adds agents, by swarm strategy.
SCALE_TYPES: dict[str, tuple[str, ...]] = {
    "balanced": ("coder", "researcher", "analyst", "tester", "reviewer"),
    "specialized": ("specialist", "coder", "optimizer", "architect"),
    "adaptive": ("coder", "analyst", "researcher", "optimizer", "tester"),
}

_ITEM_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
# Letters of every script count, so that a capability such as "日本語" is
# matched by its words and not taken for a capability without any.
_WORD = re.compile(r"[\w+#-]+")


def split_items(text: str) -> list[str]:
    """Split a task text into its items: one per non-empty line, list markers
    removed. A text of one line is one item."""
    items = [_ITEM_MARKER.sub("", line).strip() for line in text.splitlines()]
    return [item for item in items if item] or [text.strip()]


def split_parts(spec: TaskSpec, workers: int) -> list[str]:
    """Return the parts of a task that agents work on.

    A task text with several lines or list items is split into those items.
    A one-item code or shell task becomes `workers` data-parallel parts (each
    run reads its NEXUS_PART_INDEX and NEXUS_PART_COUNT). Any other one-item
    task is one part.
    """
    items = split_items(spec.work.task)
    if len(items) > 1:
        return items
    if spec.work.kind in ("code", "shell"):
        return [items[0]] * max(1, workers)
    return items


def capability_score(agent: AgentState, spec: TaskSpec) -> int:
    """Count the agent's capabilities named in the task or required by it."""
    words = set(_WORD.findall(spec.work.task.lower()))
    required = {c.lower() for c in spec.required_capabilities}
    score = 0
    for capability in agent.capabilities:
        name = capability.lower()
        parts = _WORD.findall(name)
        if name in required:
            score += 2
        elif name in words or (parts and all(p in words for p in parts)):
            score += 1
    return score


def is_eligible(agent: AgentState, spec: TaskSpec) -> bool:
    """An agent may take a task when it has every required capability."""
    have = {c.lower() for c in agent.capabilities}
    return all(c.lower() in have for c in spec.required_capabilities)


def select_agents(
    agents: Sequence[AgentState], spec: TaskSpec, limit: int
) -> list[AgentState]:
    """Pick the idle, eligible agents for a task, best first; a task pinned to
    an agent (`spec.agent_id`) gets only that agent.

    Order: capability score (higher first), then how well the agent type fits
    the kind of execution, then load (fewer finished tasks first, which
    spreads work), then spawn order.
    """
    preferences = KIND_PREFERENCES.get(spec.work.kind, ())
    candidates = [a for a in agents if a.status == "idle" and is_eligible(a, spec)]
    if spec.agent_id is not None:
        candidates = [a for a in candidates if a.agent_id == spec.agent_id]

    def rank(agent: AgentState) -> tuple[int, int, int, int]:
        fit = (
            preferences.index(agent.type)
            if agent.type in preferences
            else len(preferences)
        )
        load = agent.tasks_completed + agent.tasks_failed
        return (-capability_score(agent, spec), fit, load, agent.seq)

    ordered = sorted(candidates, key=rank)
    return ordered[: max(1, limit)]


def order_for_topology(agents: Sequence[AgentState], topology: str) -> list[AgentState]:
    """Put a coordinator first for hierarchical and star swarms, since node 0
    splits and aggregates there."""
    ordered = list(agents)
    if topology in ("hierarchical", "star"):
        for index, agent in enumerate(ordered):
            if agent.type == "coordinator":
                ordered.insert(0, ordered.pop(index))
                break
    return ordered


def dispatch_order(tasks: Sequence[TaskRecord]) -> list[TaskRecord]:
    """Queued tasks in the order they get agents: critical, high, medium, low,
    then submission order."""
    queued = [t for t in tasks if t.status == "queued"]
    return sorted(queued, key=lambda t: (PRIORITY_RANK[t.spec.priority], t.seq))


def choose_strategy(
    spec: TaskSpec, parts: Sequence[str], agent_count: int
) -> tuple[str, str]:
    """Resolve `adaptive` into `parallel` or `sequential`, with the reason.

    `agent_count` counts the agents that run parts (`working_agent_count`).
    Parts that build on each other (the text says "then" or "after", or each
    step needs the previous output) run in sequence. Independent parts run in
    parallel when more than one agent works on them; with one part, or one
    working agent, they run one after another anyway.
    """
    if spec.strategy != "adaptive":
        return spec.strategy, f"requested {spec.strategy}"
    text = spec.work.task.lower()
    chained = re.search(r"\b(then|after that|afterwards|pipeline|step by step)\b", text)
    if chained:
        word = chained.group(1)
        return "sequential", f"task text says {word!r}: parts build on each other"
    if len(parts) <= 1:
        return "sequential", "the task has 1 part"
    if agent_count <= 1:
        return "sequential", f"{len(parts)} parts and only 1 working agent"
    return (
        "parallel",
        f"{len(parts)} independent parts and {agent_count} working agents",
    )


def working_agent_count(topology: str, agent_count: int) -> int:
    """Return how many of a task's agents run parts: all of them, less the hub
    or root of a star or hierarchical swarm unless it is the only agent."""
    if topology in ("hierarchical", "star") and agent_count > 1:
        return agent_count - 1
    return agent_count


def part_owners(topology: str, agent_count: int, part_count: int) -> list[int]:
    """Return the index of the agent that each part goes to, in part order.

    Star and hierarchical swarms keep agent 0 as hub or root and give the
    parts in turn to the others, unless it is the only agent. Ring and mesh
    give part k to agent k mod n.

    NOTE: a parallel mesh task has no fixed owners, because each agent claims
    the next part when it is free, so there the result is only the order in
    which a first round of claims goes.
    """
    workers = list(range(agent_count))
    if topology in ("hierarchical", "star") and agent_count > 1:
        workers = workers[1:]
    return [workers[j % len(workers)] for j in range(part_count)]


def tree_parent(index: int) -> int | None:
    """Parent of node `index` in the hierarchical tree; the root has none."""
    return None if index == 0 else (index - 1) // 2


def tree_path(index: int) -> list[int]:
    """Nodes from the root down to `index`, both included."""
    path = [index]
    while path[-1] != 0:
        parent = tree_parent(path[-1])
        assert parent is not None
        path.append(parent)
    return list(reversed(path))


def default_agent_count(spec: TaskSpec, topology: str) -> int:
    """Agents a task asks for when `maxAgents` is not given: one per item of
    the task text, plus the hub or coordinator in star and hierarchical
    swarms when there is more than one item; at most 10."""
    if spec.max_agents is not None:
        return spec.max_agents
    items = len(split_items(spec.work.task))
    extra = 1 if items > 1 and topology in ("hierarchical", "star") else 0
    return min(10, items + extra)


def task_outcome(steps: Sequence[StepResult]) -> tuple[TaskStatus, str | None]:
    """Return a task's status and error from its finished steps: failed, with
    each failed step named, when any step failed, else completed."""
    failed = [s for s in steps if s.status == "failed"]
    if not failed:
        return "completed", None
    error = "; ".join(
        f"{s.agent_name} (part {s.part_index}): {s.error}" for s in failed
    )
    return "failed", error


def join_outputs(outputs: Sequence[str]) -> str:
    """Join the outputs of a task's parts in part order.

    They are concatenated, with a newline added between two outputs only
    where the first does not end with one, so every part starts on a line of
    its own. An empty output adds nothing. The task's output ends the way
    its last part's output ends, and a task of one part has that part's
    output unchanged, whatever its strategy.
    """
    joined: list[str] = []
    for output in outputs:
        if not output:
            continue
        if joined and not joined[-1].endswith("\n"):
            joined.append("\n")
        joined.append(output)
    return "".join(joined)


# The note that the sandbox appends to output beyond its limit.
_SANDBOX_CUT = re.compile(r"\n\[output truncated: (\d+) bytes dropped\]\s*$")


def cut_text(text: str, limit: int) -> tuple[str, int]:
    """Cut `text` to at most `limit` UTF-8 bytes and append a line with the
    number of bytes left out. Return the text and that number.

    Output that the sandbox already cut ends with the sandbox's note; the
    line then counts those bytes too, since the note itself is cut away.
    """
    data = text.encode()
    if len(data) <= limit:
        return text, 0
    kept = data[:limit].decode(errors="ignore")
    dropped = len(data) - len(kept.encode())
    earlier = _SANDBOX_CUT.search(text)
    if earlier is None:
        return f"{kept}\n[{dropped} bytes left out of the task's record]\n", dropped
    before = int(earlier.group(1))
    return (
        f"{kept}\n[{dropped} bytes left out of the task's record, and "
        f"{before} bytes before that by the sandbox's output limit]\n",
        dropped,
    )


def trimmed_output(output: str) -> str:
    """Return a task's output as its record keeps it (MAX_TASK_OUTPUT_BYTES)."""
    return cut_text(output, MAX_TASK_OUTPUT_BYTES)[0]


def trimmed_step(step: StepResult, part_count: int) -> StepResult:
    """Return `step` as the task's record keeps it: its stdout, stderr and
    text within an equal share of MAX_STEPS_TEXT_BYTES, and its part within
    MAX_STEP_PART_CHARS. `trimmed_bytes` counts what was left out.

    Stdout and stderr split the share. When both are too long, stdout keeps
    3/4 and stderr 1/4. Either one may use what the other leaves unused.
    """
    share = MAX_STEPS_TEXT_BYTES // max(1, part_count)
    update: dict[str, object] = {}
    trimmed = 0
    stdout_bytes = len((step.stdout or "").encode())
    stderr_bytes = len((step.stderr or "").encode())
    stderr_limit = max(share // 4, share - stdout_bytes)
    stdout_limit = share - min(stderr_bytes, stderr_limit)
    for field, limit in (("stdout", stdout_limit), ("stderr", stderr_limit)):
        value = getattr(step, field)
        if value:
            update[field], dropped = cut_text(value, limit)
            trimmed += dropped
    if step.text:
        update["text"], dropped = cut_text(step.text, share)
        trimmed += dropped
    if len(step.part) > MAX_STEP_PART_CHARS:
        part_start = step.part[:MAX_STEP_PART_CHARS]
        trimmed += len(step.part.encode()) - len(part_start.encode())
        update["part"] = part_start + "…"
    if not trimmed:
        return step
    update["trimmed_bytes"] = step.trimmed_bytes + trimmed
    return step.model_copy(update=update)
