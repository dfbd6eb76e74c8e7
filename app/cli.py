"""The `nexus` command line."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import sys
from typing import Annotated, Any

import typer
from sqlalchemy.exc import DBAPIError

from app.api.cli import json_text, keys_cli, mcp_command, tool_command
from app.cli_group import NexusGroup
from app.jsonsafe import InvalidJSONError, load_strict
from app.logs import configure_logging
from app.neural.cli import neural_cli
from app.realtime.cli import realtime_cli
from app.sandbox.cli import sandbox_cli
from app.settings import Settings, settings_or_exit
from app.storage.cli import storage_cli
from app.swarm.cli import swarm_cli
from app.workflows.cli import workflow_cli

cli = typer.Typer(
    name="nexus",
    cls=NexusGroup,
    help="flow-nexus: swarms, sandboxes, neural clusters and workflows on Temporal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(cls=NexusGroup, help="Application database.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(workflow_cli, name="workflow")
cli.add_typer(sandbox_cli, name="sandbox")
cli.add_typer(swarm_cli, name="swarm")
cli.add_typer(keys_cli, name="keys")
cli.command("mcp")(mcp_command)
cli.command(
    "tool",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)(tool_command)


def _add_capability_commands() -> None:
    from app.benchmark.cli import benchmark_cli

    cli.add_typer(benchmark_cli, name="benchmark")


cli.add_typer(neural_cli, name="neural")
cli.add_typer(realtime_cli, name="realtime")
cli.add_typer(storage_cli, name="storage")


def load_settings() -> Settings:
    """Read the settings, or exit with the validation message and code 2."""
    settings = settings_or_exit()
    configure_logging(settings.log_level)
    return settings


def print_json(value: Any) -> None:
    typer.echo(json_text(value))


def call_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run a registered tool as the local user and return its result, or exit 1
    with the tool's error message."""
    from app.db.migrate import ensure_current
    from app.tools import (
        ToolContext,
        ToolError,
        invoke_tool,
        known_tool,
        load_tools,
    )

    settings = load_settings()
    if name != "system_health":
        # A health check reports a database that is not migrated, with the
        # fix, rather than change what it checks.
        ensure_current(settings.effective_database_url)
    load_tools()

    async def run() -> dict[str, Any]:
        ctx = ToolContext(settings, user_id=f"cli:{getpass.getuser()}")
        return await invoke_tool(ctx, name, arguments)

    try:
        return asyncio.run(run())
    except ToolError as error:
        typer.echo(f"error: {error.message}", err=True)
        # An unknown tool name is a usage error, as in `nexus tool NAME`.
        raise typer.Exit(2 if known_tool(name) is None else 1) from None


@cli.command("config")
def config_command() -> None:
    """Print the effective settings, with secrets masked."""
    print_json(load_settings().masked())


@db_cli.command("upgrade")
def db_upgrade_command() -> None:
    """Apply every database migration."""
    from app.db.migrate import upgrade

    settings = load_settings()
    heads = upgrade(settings.effective_database_url)
    print_json({"database": settings.masked()["database_url"], "heads": heads})


@cli.command("up")
def up_command() -> None:
    """Run the embedded Temporal server (unless NEXUS_TEMPORAL_ADDRESS is set),
    every typed worker and the HTTP server until Ctrl-C or SIGTERM.

    Environment variables set where it listens and stores:
    NEXUS_DATA_DIR (default .nexus), NEXUS_TEMPORAL_PORT (7233),
    NEXUS_TEMPORAL_UI_PORT (8233) and NEXUS_HTTP_PORT (3000). `nexus config`
    prints the effective settings.
    """
    from app.supervisor import run_up
    from app.temporal.devserver import EmbeddedServerError

    settings = load_settings()
    try:
        raise typer.Exit(run_up(settings))
    except EmbeddedServerError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@cli.command("server")
def server_command() -> None:
    """Run only the embedded Temporal dev server until Ctrl-C."""
    import signal
    import threading

    from app.temporal.devserver import EmbeddedServerError, EmbeddedTemporal

    settings = load_settings()
    server = EmbeddedTemporal(settings)
    try:
        address = asyncio.run(server.start())
    except EmbeddedServerError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Temporal at {address}, web UI {server.ui_url}", err=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if server.process is not None and server.process.poll() is not None:
                typer.echo("error: the Temporal server exited", err=True)
                raise typer.Exit(1)
    finally:
        server.stop()


@cli.command("worker")
def worker_command(
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", help="Task queue to poll; repeatable."),
    ] = None,
    neural_node: Annotated[
        list[str] | None,
        typer.Option(
            "--neural-node",
            help="Neural cluster node id whose queue nexus-neural-NODE_ID to "
            "poll; repeatable.",
        ),
    ] = None,
) -> None:
    """Run the typed worker of task queues, or of neural cluster nodes, in
    this process."""
    if not queue and not neural_node:
        typer.echo("error: give at least one --queue or --neural-node", err=True)
        raise typer.Exit(2)
    argv = [sys.executable, "-m", "workers"]
    for name in queue or []:
        argv += ["--queue", name]
    for node_id in neural_node or []:
        argv += ["--neural-node", node_id]
    # The worker package is imported only by its own process (the layering
    # keeps app/ free of workers/), so this command becomes that process.
    os.execv(sys.executable, argv)


@cli.command("health")
def health_command() -> None:
    """Print system health as JSON; exit 1 when the platform is unhealthy."""
    result = call_tool("system_health", {})
    print_json(result)
    if result["status"] == "unhealthy":
        raise typer.Exit(1)


@cli.command("audit")
def audit_command(
    limit: Annotated[int, typer.Option(help="Events to show, newest first.")] = 100,
    user_id: Annotated[str | None, typer.Option(help="Only this caller.")] = None,
    tool: Annotated[str | None, typer.Option(help="Only this tool.")] = None,
) -> None:
    """Print recent tool calls from the audit log."""
    arguments: dict[str, Any] = {"limit": limit}
    if user_id:
        arguments["user_id"] = user_id
    if tool:
        arguments["tool"] = tool
    print_json(call_tool("audit_log", arguments))


@cli.command("tools")
def tools_command() -> None:
    """List every tool with its group and description."""
    from app.tools import all_tools, load_tools

    load_tools()
    for spec in all_tools():
        typer.echo(f"{spec.group:10} {spec.name:28} {first_sentence(spec.description)}")


def first_sentence(description: str) -> str:
    """Return the first sentence of a tool description's first paragraph, on
    one line. A sentence ends at `.`, `!` or `?` before a space and a capital
    letter, so `e.g. x` and `1.5` do not end one."""
    paragraph = " ".join(description.split("\n\n")[0].split())
    return _SENTENCE_END.split(paragraph, maxsplit=1)[0]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`])")


@cli.command("call")
def call_command(
    name: Annotated[str, typer.Argument(help="Tool name, as `nexus tools` lists it.")],
    arguments: Annotated[
        str, typer.Argument(help="The tool's arguments as a JSON object.")
    ] = "{}",
) -> None:
    """Call any tool with JSON arguments and print its JSON result."""
    from app.services.audit import is_secret_name

    problem = None
    try:
        # Back to the bytes given, because Python decodes invalid UTF-8 in
        # argv to lone surrogates, and the error should name the byte.
        parsed = load_strict(os.fsencode(arguments), is_secret=is_secret_name)
    except InvalidJSONError as error:
        # The same strict parser as the HTTP API's, so NaN, 1e400 and
        # repeated keys get the same message, naming the field as written.
        problem = error.message.replace("the request body is", "the arguments are", 1)
    else:
        if not isinstance(parsed, dict):
            problem = "the arguments must be a JSON object"
    if problem is not None:
        _audit_rejected(name, problem)
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    print_json(call_tool(name, parsed))


def _audit_rejected(name: str, problem: str) -> None:
    """Record a call that no tool saw, as the HTTP API records a body it
    cannot read."""
    from app.db.migrate import ensure_current
    from app.services.audit import record_call

    settings = load_settings()
    ensure_current(settings.effective_database_url)
    record_call(
        settings.effective_database_url,
        user_id=f"cli:{getpass.getuser()}",
        tool=name,
        arguments={},
        outcome="error",
        duration_ms=0.0,
        error=f"rejected: {problem}",
    )


_add_capability_commands()


def _database_error_message(error: DBAPIError) -> str | None:
    """Return the one-line error of a database that cannot be reached, or
    None when the database accepts connections and `error` has another cause."""
    from app.db.engine import unreachable_database_message

    settings = settings_or_exit()
    message = unreachable_database_message(settings.effective_database_url)
    if message is not None:
        # The traceback only with NEXUS_LOG_LEVEL=DEBUG: the message has the cause.
        logging.getLogger(__name__).debug("database error", exc_info=error)
    return message


def main() -> None:
    """Run the command line, then leave without the interpreter's teardown.

    The Temporal client's Rust threads may still be running when Python
    finalizes, and then a short command that used a client can abort with
    "Fatal Python error: PyGILState_Release" after its work is done (seen in
    5 of 13 `nexus benchmark schedule` runs). Every command has finished its
    own cleanup when `cli()` returns, so the process exits at once instead.
    """
    code = 0
    try:
        cli()
    except SystemExit as done:
        if isinstance(done.code, int):
            code = done.code
        elif done.code is not None:
            print(done.code, file=sys.stderr)
            code = 1
    except DBAPIError as error:
        message = _database_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        code = 1
    # Either is None when the process started with that fd closed.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    logging.shutdown()
    os._exit(code)


# `python -m app.cli` runs the command line too, as `python -m app` does.
if __name__ == "__main__":
    main()
