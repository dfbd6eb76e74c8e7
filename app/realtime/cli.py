"""`nexus realtime ...`: enable tables, tail changes, list subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import signal
from typing import Annotated, Any

import typer

from app.cli_group import NexusGroup

realtime_cli = typer.Typer(
    cls=NexusGroup, help="Realtime change streams.", no_args_is_help=True
)


@realtime_cli.command("enable")
def enable_command(
    table: Annotated[str, typer.Argument(help="Table of the application database.")],
) -> None:
    """Install the capture triggers on TABLE, so it can be subscribed to."""
    from app.cli import load_settings, print_json
    from app.realtime.triggers import (
        RealtimeEnableError,
        RealtimeTableError,
        enable_realtime,
    )

    settings = load_settings()
    try:
        enabled = enable_realtime(settings.effective_database_url, table)
    except (RealtimeTableError, RealtimeEnableError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    print_json({"table": enabled, "realtime": "enabled"})


@realtime_cli.command("list")
def list_command() -> None:
    """List subscriptions with their cursor, delivered count and lag."""
    from app.cli import call_tool, print_json

    print_json(call_tool("realtime_list", {}))


@realtime_cli.command("prune")
def prune_command() -> None:
    """Delete changes every subscription has passed, past the retention."""
    from app.cli import load_settings, print_json
    from app.realtime.service import prune_changes

    settings = load_settings()
    deleted = prune_changes(
        settings.effective_database_url, settings.realtime_retention_seconds
    )
    print_json({"deleted": deleted})


@realtime_cli.command("tail")
def tail_command(
    table: Annotated[str, typer.Argument(help="Table to follow.")],
    filter_text: Annotated[
        str | None,
        typer.Option("--filter", help="PostgREST filter, e.g. status=eq.active."),
    ] = None,
    event: Annotated[str, typer.Option(help="INSERT, UPDATE, DELETE or *.")] = "*",
    count: Annotated[
        int | None,
        typer.Option(min=1, help="Exit after this many events (at least 1)."),
    ] = None,
) -> None:
    """Print each matching change of TABLE as one JSON line until Ctrl-C.

    The subscription is created on start and deleted on exit.
    """
    from app.cli import load_settings
    from app.processes import freeze_startup_objects
    from app.tools import ToolContext, ToolError, invoke_tool, load_tools

    settings = load_settings()
    load_tools()
    # A tail can follow a busy table for hours; see freeze_startup_objects.
    freeze_startup_objects()
    ctx = ToolContext(settings, user_id=f"cli:{getpass.getuser()}")

    async def follow() -> None:
        # SIGTERM (kill, a supervisor) cancels the tail like Ctrl-C does, at
        # an await, so the subscription is still deleted. A handler that
        # raised in the middle of the event loop's own code could skip that.
        main = asyncio.current_task()
        assert main is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        arguments: dict[str, Any] = {"table": table, "event": event}
        if filter_text:
            arguments["filter"] = filter_text
        created = await invoke_tool(ctx, "realtime_subscribe", arguments)
        subscription_id = created["subscription_id"]
        typer.echo(f"subscribed as {subscription_id}", err=True)
        printed = 0
        try:
            while count is None or printed < count:
                # Ask for no more than are still to print, so the count is
                # exact and the cursor passes only what was printed.
                limit = 100 if count is None else min(100, count - printed)
                batch = await invoke_tool(
                    ctx,
                    "realtime_events",
                    {
                        "subscription_id": subscription_id,
                        "limit": limit,
                        "wait_ms": 1000,
                    },
                )
                for item in batch["events"]:
                    typer.echo(json.dumps(item, default=str))
                    printed += 1
        finally:
            await invoke_tool(
                ctx, "realtime_unsubscribe", {"subscription_id": subscription_id}
            )

    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(follow())
    except ToolError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(1) from None
