"""`nexus workflow ...`: the workflow tools from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from app.cli_group import NexusGroup

workflow_cli = typer.Typer(
    cls=NexusGroup, help="User-defined workflows on Temporal.", no_args_is_help=True
)


def _call(name: str, arguments: dict[str, Any]) -> None:
    from app.cli import call_tool, print_json

    print_json(call_tool(name, arguments))


def _parse_problem(error: yaml.YAMLError | json.JSONDecodeError) -> str:
    """Say what is wrong and where, without the text around it, which may
    hold a secret value (an env var of a step)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno}, column {error.colno}"
    problem = getattr(error, "problem", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return str(problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def read_definition(path: Path) -> dict[str, Any]:
    """Read a definition from a .json, .yaml or .yml file."""
    if not path.is_file():
        typer.echo(f"error: {path} not found", err=True)
        raise typer.Exit(2)
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        typer.echo(
            f"error: {path} is not valid JSON or YAML: {_parse_problem(error)}",
            err=True,
        )
        raise typer.Exit(2) from None
    if not isinstance(data, dict):
        typer.echo(f"error: {path} must contain one definition object", err=True)
        raise typer.Exit(2)
    return data


@workflow_cli.command("create")
def create_command(
    file: Annotated[Path, typer.Argument(help="Definition as .json or .yaml.")],
) -> None:
    """Validate and store a definition (a new version if the name exists)."""
    _call("workflow_create", read_definition(file))


@workflow_cli.command("delete")
def delete_command(workflow_id: str) -> None:
    """Delete a definition and its schedules; its runs stay readable."""
    _call("workflow_delete", {"workflow_id": workflow_id})


@workflow_cli.command("execute")
def execute_command(
    workflow_id: str,
    input_json: Annotated[
        str, typer.Option("--input", help="input_data as a JSON object.")
    ] = "{}",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the result (async=false).")
    ] = False,
) -> None:
    """Start a run of the latest version of WORKFLOW_ID."""
    try:
        input_data = json.loads(input_json)
    except json.JSONDecodeError as error:
        typer.echo(f"error: --input is not JSON: {error}", err=True)
        raise typer.Exit(2) from None
    _call(
        "workflow_execute",
        {"workflow_id": workflow_id, "input_data": input_data, "async": not wait},
    )


@workflow_cli.command("status")
def status_command(
    execution_id: Annotated[str | None, typer.Argument()] = None,
    workflow_id: Annotated[str | None, typer.Option("--workflow")] = None,
    metrics: Annotated[bool, typer.Option("--metrics")] = False,
) -> None:
    """Show one execution's steps, or the recent executions of --workflow."""
    _call(
        "workflow_status",
        {
            "execution_id": execution_id,
            "workflow_id": workflow_id,
            "include_metrics": metrics,
        },
    )


@workflow_cli.command("list")
def list_command(
    limit: int = 10,
    offset: int = 0,
    status: Annotated[str | None, typer.Option()] = None,
) -> None:
    """List stored definitions with their latest execution."""
    _call("workflow_list", {"limit": limit, "offset": offset, "status": status})


@workflow_cli.command("audit")
def audit_command(
    workflow_id: Annotated[str | None, typer.Argument()] = None,
    limit: int = 50,
    start_time: Annotated[
        str | None, typer.Option(help="ISO 8601 time; only later transitions.")
    ] = None,
) -> None:
    """Print the ordered step transitions of a workflow's executions."""
    _call(
        "workflow_audit_trail",
        {"workflow_id": workflow_id, "limit": limit, "start_time": start_time},
    )


@workflow_cli.command("queues")
def queues_command(
    queue_name: Annotated[str | None, typer.Argument()] = None,
    messages: Annotated[bool, typer.Option("--messages")] = False,
) -> None:
    """Show backlog and pollers of the task queues."""
    _call(
        "workflow_queue_status",
        {"queue_name": queue_name, "include_messages": messages},
    )
