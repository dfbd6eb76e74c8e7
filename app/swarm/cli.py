"""`nexus swarm ...`: swarm commands, each one tool call."""

from __future__ import annotations

from typing import Annotated, Any

import typer

swarm_cli = typer.Typer(help="Swarms of agents that run tasks.", no_args_is_help=True)

SwarmOption = Annotated[
    str | None, typer.Option("--swarm", help="Swarm id; default: newest active swarm.")
]


def _call(name: str, arguments: dict[str, Any]) -> None:
    from app.cli import call_tool, print_json

    print_json(call_tool(name, {k: v for k, v in arguments.items() if v is not None}))


@swarm_cli.command("init")
def init_command(
    topology: Annotated[str, typer.Argument(help="hierarchical, mesh, ring or star.")],
    max_agents: Annotated[int, typer.Option(help="Most agents, 1-100.")] = 8,
    strategy: Annotated[
        str, typer.Option(help="balanced, specialized or adaptive.")
    ] = "balanced",
) -> None:
    """Start a swarm."""
    _call(
        "swarm_init",
        {"topology": topology, "maxAgents": max_agents, "strategy": strategy},
    )


@swarm_cli.command("spawn")
def spawn_command(
    agent_type: Annotated[str, typer.Argument(help="Agent type, e.g. coder.")],
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


@swarm_cli.command("task")
def task_command(
    task: Annotated[str, typer.Argument(help="What to do; lines become parts.")],
    code: Annotated[str | None, typer.Option(help="Program each agent runs.")] = None,
    language: Annotated[
        str | None, typer.Option(help="python (default), javascript or bash.")
    ] = None,
    command: Annotated[str | None, typer.Option(help="Shell command to run.")] = None,
    action: Annotated[str | None, typer.Option(help="Built-in action name.")] = None,
    priority: Annotated[str, typer.Option(help="low, medium, high, critical.")] = (
        "medium"
    ),
    strategy: Annotated[str, typer.Option(help="parallel, sequential, adaptive.")] = (
        "adaptive"
    ),
    max_agents: Annotated[int | None, typer.Option(help="Agents, 1-10.")] = None,
    depends_on: Annotated[
        list[str] | None, typer.Option("--depends-on", help="Task id; repeatable.")
    ] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the results; 0 returns at once.")
    ] = 0.0,
    swarm: SwarmOption = None,
) -> None:
    """Orchestrate a task; with --wait, print its results when it ends."""
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


@swarm_cli.command("results")
def results_command(
    task_id: Annotated[str, typer.Argument(help="Task id from `swarm task`.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the end.")] = 0.0,
) -> None:
    """Print a task's results: each agent's output, timings and errors."""
    _call("task_results", {"task_id": task_id, "wait_seconds": wait})


@swarm_cli.command("status")
def status_command(
    task: Annotated[
        str | None, typer.Option("--task", help="Show this task's progress instead.")
    ] = None,
    swarm: SwarmOption = None,
) -> None:
    """Print a swarm's agents, sandboxes and tasks, or one task's progress."""
    if task:
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
