"""`nexus sandbox ...`: the sandbox tools from the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli_group import NexusGroup

sandbox_cli = typer.Typer(
    cls=NexusGroup, help="Durable code sandboxes.", no_args_is_help=True
)


# Exit code of `nexus sandbox exec` by execution status.
EXEC_EXIT_CODES = {"completed": 0, "failed": 3, "timed_out": 4}


def _call(name: str, arguments: dict[str, object]) -> None:
    from app.cli import call_tool, print_json

    print_json(call_tool(name, {k: v for k, v in arguments.items() if v is not None}))


def parse_env(items: list[str]) -> dict[str, str]:
    """Parse `NAME=VALUE` items; the value may contain `=` and may be empty.

    Raises:
        typer.BadParameter: an item has no `=` or an empty name.
    """
    env: dict[str, str] = {}
    for position, item in enumerate(items, start=1):
        name, equals, value = item.partition("=")
        if not equals or not name:
            # The item may be a secret value without its name, so the error
            # names the item by its place, not by its text.
            raise typer.BadParameter(
                f"item {position} ({len(item)} characters) is not NAME=VALUE; "
                "write for example --env API_URL=x",
                param_hint="'--env'",
            )
        env[name] = value
    return env


@sandbox_cli.command("create")
def create_command(
    template: Annotated[
        str,
        typer.Argument(
            help="base, python, node, claude-code, react, nextjs or vanilla."
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    env: Annotated[
        list[str] | None, typer.Option(help="NAME=VALUE, repeatable.")
    ] = None,
    timeout: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
    package: Annotated[
        list[str] | None, typer.Option(help="Package to install, repeatable.")
    ] = None,
    startup_script: Annotated[
        str | None, typer.Option(help="bash run after installs.")
    ] = None,
) -> None:
    """Create a sandbox."""
    env_vars = parse_env(env or [])
    _call(
        "sandbox_create",
        {
            "template": template,
            "name": name,
            "env_vars": env_vars or None,
            "timeout": timeout,
            "install_packages": package,
            "startup_script": startup_script,
        },
    )


@sandbox_cli.command("exec")
def exec_command(
    sandbox_id: str,
    code: Annotated[str, typer.Argument(help="Program text.")],
    language: Annotated[
        str, typer.Option(help="python, javascript or bash.")
    ] = "python",
    timeout: Annotated[
        float, typer.Option(help="Seconds before the run is killed.")
    ] = 60,
) -> None:
    """Run code in a sandbox and print the result.

    The exit code is 0 when the program completed, 3 when it failed (a
    nonzero exit code or a signal) and 4 when it timed out, as for
    `nexus swarm task --wait`; 1 when the call itself failed.
    """
    from app.cli import call_tool, print_json

    result = call_tool(
        "sandbox_execute",
        {
            "sandbox_id": sandbox_id,
            "code": code,
            "language": language,
            "timeout": timeout,
        },
    )
    print_json(result)
    raise typer.Exit(EXEC_EXIT_CODES.get(str(result.get("status")), 0))


@sandbox_cli.command("status")
def status_command(sandbox_id: str) -> None:
    """Show a sandbox's live state."""
    _call("sandbox_status", {"sandbox_id": sandbox_id})


@sandbox_cli.command("list")
def list_command(
    status: Annotated[str, typer.Option(help="running, stopped or all.")] = "all",
) -> None:
    """List sandboxes."""
    _call("sandbox_list", {"status": status})


@sandbox_cli.command("logs")
def logs_command(
    sandbox_id: str,
    lines: Annotated[int, typer.Option(help="Lines to show, 1-1000.")] = 100,
) -> None:
    """Show a sandbox's recent output."""
    _call("sandbox_logs", {"sandbox_id": sandbox_id, "lines": lines})


@sandbox_cli.command("stop")
def stop_command(sandbox_id: str) -> None:
    """Stop a sandbox and end its session."""
    _call("sandbox_stop", {"sandbox_id": sandbox_id})


@sandbox_cli.command("delete")
def delete_command(sandbox_id: str) -> None:
    """Delete a sandbox and its files."""
    _call("sandbox_delete", {"sandbox_id": sandbox_id})
