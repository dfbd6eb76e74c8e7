"""`nexus swarm ...`: swarm commands, each one tool call."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from app.cli_group import NexusGroup
from app.contracts.swarm import (
    AGENT_TYPES,
    Language,
    Priority,
    SwarmStrategy,
    TaskStrategy,
    Topology,
)

swarm_cli = typer.Typer(
    cls=NexusGroup, help="Swarms of agents that run tasks.", no_args_is_help=True
)

# Exit codes of `swarm task --wait` and `swarm results`, after 1 (a tool call
# failed) and 2 (invalid usage).
EXIT_TASK_FAILED = 3
EXIT_TASK_NOT_ENDED = 4

SwarmOption = Annotated[
    str | None, typer.Option("--swarm", help="Swarm id; default: newest active swarm.")
]


def _one_of(values: Any) -> Callable[[str | None], str | None]:
    """Check a value against the tool's own Literal type (or tuple of
    values), so that a typo is a usage error (exit 2) that lists the allowed
    values."""
    allowed = values if isinstance(values, tuple) else typing.get_args(values)

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _call(name: str, arguments: dict[str, Any]) -> None:
    from app.cli import call_tool, print_json

    print_json(call_tool(name, {k: v for k, v in arguments.items() if v is not None}))


@swarm_cli.command("init")
def init_command(
    topology: Annotated[
        str,
        typer.Argument(
            help="hierarchical, mesh, ring or star.", callback=_one_of(Topology)
        ),
    ],
    max_agents: Annotated[
        int, typer.Option(min=1, max=100, help="Maximum agents, 1-100.")
    ] = 8,
    strategy: Annotated[
        str,
        typer.Option(
            help="balanced, specialized or adaptive.", callback=_one_of(SwarmStrategy)
        ),
    ] = "balanced",
) -> None:
    """Start a swarm."""
    _call(
        "swarm_init",
        {"topology": topology, "maxAgents": max_agents, "strategy": strategy},
    )


@swarm_cli.command("spawn")
def spawn_command(
    agent_type: Annotated[
        str,
        typer.Argument(help="Agent type, e.g. coder.", callback=_one_of(AGENT_TYPES)),
    ],
    name: Annotated[str | None, typer.Option(help="Agent name.")] = None,
    capability: Annotated[
        list[str] | None, typer.Option("--capability", help="Repeatable.")
    ] = None,
    swarm: SwarmOption = None,
) -> None:
    """Add an agent to a swarm."""
    _call(
        "agent_spawn",
        {
            "type": agent_type,
            "name": name,
            "capabilities": capability or [],
            "swarm_id": swarm,
        },
    )


def parse_action_args(value: str | None) -> dict[str, Any] | None:
    """Parse `--action-args` as a JSON object, or raise a usage error."""
    if value is None:
        return None
    expected = """use a JSON object, e.g. '{"limit": 10}'"""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(
            f"{value!r} is not valid JSON ({error.msg}); {expected}"
        ) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter(f"{value!r} is not a JSON object; {expected}")
    return parsed


def _seconds(value: str | float, *, above_zero: bool, maximum: float) -> float:
    """Parse a number of seconds, naming the value and the range when it is
    not one, not finite or out of range."""
    lowest = "above 0" if above_zero else "from 0"
    expected = f"use a number of seconds {lowest} and at most {maximum:g}"
    try:
        seconds = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number; {expected}") from None
    in_range = (seconds > 0 if above_zero else seconds >= 0) and seconds <= maximum
    if not in_range:  # NaN compares false, so it lands here too
        raise typer.BadParameter(f"{value} is out of range; {expected}")
    return seconds


def parse_timeout(value: str | float) -> float:
    """Parse `--timeout`: seconds each step may run."""
    return _seconds(value, above_zero=True, maximum=86400)


def parse_wait(value: str | float) -> float:
    """Parse `--wait`: seconds to wait for a task's end."""
    return _seconds(value, above_zero=False, maximum=3600)


def exit_for_outcome(result: dict[str, Any], waited: float) -> None:
    """Exit with the code for a task's status, as the docs list them: return
    for completed, exit 3 for failed or cancelled, exit 4 when it has not
    ended, each after a line on stderr."""
    status = result["status"]
    task_id = result["task_id"]
    if status == "completed":
        return
    if status in ("failed", "cancelled"):
        typer.echo(f"error: task {task_id} {status}: {result.get('error')}", err=True)
        raise typer.Exit(EXIT_TASK_FAILED)
    if waited > 0:
        ending = f"is still {status} after waiting {waited:g} s"
    else:
        ending = f"has not ended (status {status})"
    typer.echo(
        f"error: task {task_id} {ending}; wait longer with --wait SECONDS or run "
        f"`nexus swarm results {task_id} --wait SECONDS`",
        err=True,
    )
    raise typer.Exit(EXIT_TASK_NOT_ENDED)


@swarm_cli.command("task")
def task_command(
    task: Annotated[str, typer.Argument(help="What to do; lines become parts.")],
    code: Annotated[str | None, typer.Option(help="Program each agent runs.")] = None,
    language: Annotated[
        str | None,
        typer.Option(
            help="python (default), javascript or bash.", callback=_one_of(Language)
        ),
    ] = None,
    command: Annotated[str | None, typer.Option(help="Shell command to run.")] = None,
    action: Annotated[str | None, typer.Option(help="Built-in action name.")] = None,
    priority: Annotated[
        str,
        typer.Option(help="low, medium, high, critical.", callback=_one_of(Priority)),
    ] = "medium",
    strategy: Annotated[
        str,
        typer.Option(
            help="parallel, sequential, adaptive.", callback=_one_of(TaskStrategy)
        ),
    ] = "adaptive",
    max_agents: Annotated[
        int | None, typer.Option(min=1, max=10, help="Agents, 1-10.")
    ] = None,
    depends_on: Annotated[
        list[str] | None, typer.Option("--depends-on", help="Task id; repeatable.")
    ] = None,
    required_capability: Annotated[
        list[str] | None,
        typer.Option(
            "--required-capability",
            help="Capability every assigned agent must have; repeatable.",
        ),
    ] = None,
    action_args: Annotated[
        dict[str, Any] | None,
        typer.Option(
            "--action-args",
            parser=parse_action_args,
            metavar="JSON",
            help="""Arguments of --action as a JSON object, e.g. '{"limit": 10}'.""",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            parser=parse_timeout,
            metavar="SECONDS",
            help="Seconds each step may run, up to 86400.",
        ),
    ] = 300.0,
    wait: Annotated[
        float,
        typer.Option(
            parser=parse_wait,
            metavar="SECONDS",
            help="Seconds to wait for the results, up to 3600; 0 returns at once.",
        ),
    ] = 0.0,
    swarm: SwarmOption = None,
) -> None:
    """Orchestrate a task; with --wait, print its results when it ends.

    With --wait the exit code is 0 for a completed task, 3 for a failed or
    cancelled one and 4 when the wait ran out first. Without --wait it is 0
    once the task is submitted.
    """
    from app.cli import call_tool, print_json

    arguments = {
        "task": task,
        "code": code,
        "language": language,
        "command": command,
        "action": action,
        "priority": priority,
        "strategy": strategy,
        "maxAgents": max_agents,
        "dependencies": depends_on or [],
        "required_capabilities": required_capability or [],
        "action_args": action_args,
        "timeout": timeout,
        "swarm_id": swarm,
    }
    result = call_tool(
        "task_orchestrate", {k: v for k, v in arguments.items() if v is not None}
    )
    if wait > 0:
        result = call_tool(
            "task_results", {"task_id": result["task_id"], "wait_seconds": wait}
        )
    print_json(result)
    if wait > 0:
        exit_for_outcome(result, wait)


@swarm_cli.command("results")
def results_command(
    task_id: Annotated[str, typer.Argument(help="Task id from `swarm task`.")],
    wait: Annotated[
        float,
        typer.Option(
            parser=parse_wait,
            metavar="SECONDS",
            help="Seconds to wait for the end, up to 3600.",
        ),
    ] = 0.0,
) -> None:
    """Print a task's results: each agent's output, timings and errors.

    The exit code is 0 for a completed task, 3 for a failed or cancelled one
    and 4 for one that has not ended (yet, or within --wait).
    """
    from app.cli import call_tool, print_json

    result = call_tool("task_results", {"task_id": task_id, "wait_seconds": wait})
    print_json(result)
    exit_for_outcome(result, wait)


@swarm_cli.command("status")
def status_command(
    task: Annotated[
        str | None, typer.Option("--task", help="Show this task's progress instead.")
    ] = None,
    swarm: SwarmOption = None,
) -> None:
    """Print a swarm's agents, sandboxes and tasks, or one task's progress."""
    if task is not None:
        _call("task_status", {"task_id": task})
    else:
        _call("swarm_status", {"swarm_id": swarm})


@swarm_cli.command("list")
def list_command(
    status: Annotated[str, typer.Option(help="active, destroyed or all.")] = "active",
) -> None:
    """List swarms with agent counts."""
    _call("swarm_list", {"status": status})


@swarm_cli.command("scale")
def scale_command(
    target_agents: Annotated[int, typer.Argument(help="Agents to have, 1-100.")],
    swarm: SwarmOption = None,
) -> None:
    """Grow or shrink a swarm."""
    _call("swarm_scale", {"target_agents": target_agents, "swarm_id": swarm})


@swarm_cli.command("destroy")
def destroy_command(swarm: SwarmOption = None) -> None:
    """Stop every agent and sandbox of a swarm and end it."""
    _call("swarm_destroy", {"swarm_id": swarm})
