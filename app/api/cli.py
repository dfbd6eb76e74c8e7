"""`nexus keys ...` and `nexus mcp`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Annotated, Any

import typer

keys_cli = typer.Typer(help="API keys of the HTTP API.", no_args_is_help=True)


def _print(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _database_url() -> str:
    from app.cli import load_settings
    from app.db.migrate import upgrade

    settings = load_settings()
    upgrade(settings.effective_database_url)
    return settings.effective_database_url


@keys_cli.command("create")
def create_command(
    name: Annotated[str, typer.Argument(help="Who or what uses the key.")],
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group",
            help="Tool group the key may call; repeatable. Default: every group.",
        ),
    ] = None,
) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from app.api.keys import create_key
    from app.tools import all_tools, load_tools

    if group:
        load_tools()
        known = {spec.group for spec in all_tools()}
        unknown = sorted(set(group) - known)
        if unknown:
            typer.echo(
                f"error: unknown tool group(s) {', '.join(unknown)}; the groups are "
                f"{', '.join(sorted(known))}",
                err=True,
            )
            raise typer.Exit(2)
    token, info = create_key(_database_url(), name, group or None)
    _print({"key": token, **dataclasses.asdict(info)})
    typer.echo("Store the key now: it cannot be shown again.", err=True)


@keys_cli.command("list")
def list_command(
    all_keys: Annotated[
        bool, typer.Option("--all", help="Include revoked keys.")
    ] = False,
) -> None:
    """List API keys (ids, names, groups, dates; never the secrets)."""
    from app.api.keys import list_keys

    keys = list_keys(_database_url(), include_revoked=all_keys)
    _print([dataclasses.asdict(info) for info in keys])


@keys_cli.command("revoke")
def revoke_command(
    key_id: Annotated[str, typer.Argument(help="Key id, as `nexus keys list` shows.")],
) -> None:
    """Revoke an API key; requests with it are rejected from then on."""
    from app.api.keys import KeyNotFoundError, revoke_key

    try:
        info = revoke_key(_database_url(), key_id)
    except KeyNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    _print(dataclasses.asdict(info))


@keys_cli.command("rotate")
def rotate_command(
    key_id: Annotated[str, typer.Argument(help="Key id, as `nexus keys list` shows.")],
) -> None:
    """Replace an API key by a new one with the same name and groups, and
    revoke the old one."""
    from app.api.keys import KeyNotFoundError, rotate_key

    try:
        token, info = rotate_key(_database_url(), key_id)
    except KeyNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    _print({"key": token, "replaces": key_id, **dataclasses.asdict(info)})
    typer.echo("Store the key now: it cannot be shown again.", err=True)


def mcp_command() -> None:
    """Serve every tool over MCP on stdin/stdout, as the local user (for
    Claude Code and Claude Desktop). Logs go to stderr."""
    from app.api.stdio import serve_stdio
    from app.cli import load_settings

    asyncio.run(serve_stdio(load_settings()))
