"""`nexus keys ...` and `nexus mcp`."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.cli_group import NexusGroup

if TYPE_CHECKING:
    from app.api.keys import KeyInfo
    from app.settings import Settings

keys_cli = typer.Typer(
    cls=NexusGroup, help="API keys of the HTTP API.", no_args_is_help=True
)


def json_text(value: Any, encoding: str | None = None) -> str:
    """Return `value` as indented JSON that the output's `encoding` (default:
    stdout's) can write, with text such as "Grüße" as is. Characters that
    the encoding lacks, and lone surrogates, are escaped (`\\u00fc`). A NaN
    or infinite float is written as null, as the HTTP API does, because JSON
    has no such number."""
    value = _replace_non_finite(value)
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    try:
        text.encode(encoding or getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return json.dumps(value, indent=2, default=str)
    return text


def _replace_non_finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _replace_non_finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_non_finite(item) for item in value]
    return value


def _print(value: Any) -> None:
    typer.echo(json_text(value))


def _key_document(info: KeyInfo) -> dict[str, Any]:
    from pydantic import TypeAdapter

    from app.api.keys import KeyInfo

    # Through pydantic, so that dates read `2026-01-02T03:04:05.123456Z` as
    # in tool results.
    return TypeAdapter(KeyInfo).dump_python(info, mode="json")


def _keys_settings() -> Settings:
    """Read the settings, and raise the log level INFO to WARNING. The levels
    DEBUG, WARNING and ERROR of NEXUS_LOG_LEVEL apply as set.

    Each command migrates the database first, which logs one INFO line per
    realtime table. Those lines belong in the logs of `nexus up` and the
    workers, not around the one result a `nexus keys` command prints.
    """
    from app.cli import load_settings
    from app.logs import configure_logging

    settings = load_settings()
    if settings.log_level == "INFO":
        configure_logging("WARNING")
    return settings


def _database_url() -> str:
    from app.db.migrate import upgrade

    settings = _keys_settings()
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
                # repr, so that an empty or padded value can be seen.
                f"error: unknown tool group(s) {', '.join(map(repr, unknown))}; "
                f"the groups are {', '.join(sorted(known))}",
                err=True,
            )
            raise typer.Exit(2)
    try:
        token, info = create_key(_database_url(), name, group or None)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    _print({"key": token, **_key_document(info)})
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
    _print([_key_document(info) for info in keys])


@keys_cli.command("revoke")
def revoke_command(
    key_id: Annotated[str, typer.Argument(help="Key id, as `nexus keys list` shows.")],
) -> None:
    """Revoke an API key; requests with it are rejected from then on."""
    from app.api.keys import (
        KeyNotFoundError,
        default_key_file_id,
        default_key_path,
        revoke_key,
    )

    try:
        info = revoke_key(_database_url(), key_id)
    except KeyNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    _print(_key_document(info))
    settings = _keys_settings()
    if default_key_file_id(settings) == key_id:
        typer.echo(
            f"warning: {default_key_path(settings)} holds this key's token, which "
            "no longer works; write the token of an active key into it (`nexus "
            "keys create NAME` prints a new one), or delete the file",
            err=True,
        )


@keys_cli.command("rotate")
def rotate_command(
    key_id: Annotated[str, typer.Argument(help="Key id, as `nexus keys list` shows.")],
) -> None:
    """Replace an API key by a new one with the same name and groups, and
    revoke the old one."""
    from app.api.keys import (
        KeyNotFoundError,
        default_key_file_id,
        default_key_path,
        rotate_key,
        write_default_key_file,
    )

    try:
        token, info = rotate_key(_database_url(), key_id)
    except KeyNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    _print({"key": token, "replaces": key_id, **_key_document(info)})
    settings = _keys_settings()
    if default_key_file_id(settings) == key_id:
        # The README's requests read the token from this file.
        path = default_key_path(settings)
        write_default_key_file(path, token)
        typer.echo(f"The new token replaces the old one in {path}.", err=True)
    else:
        typer.echo("Store the key now: it cannot be shown again.", err=True)


def mcp_command() -> None:
    """Serve every tool over MCP on stdin/stdout, as the local user (for
    Claude Code and Claude Desktop). Logs go to stderr."""
    from app.api.stdio import serve_stdio
    from app.cli import load_settings

    # Python sets these to None when it started with fd 0 or 1 closed. A
    # file opened later could take that number and be read or written as the
    # protocol stream.
    for stream, name, use in (
        (sys.stdin, "stdin", "reads JSON-RPC requests from"),
        (sys.stdout, "stdout", "writes JSON-RPC responses to"),
    ):
        if stream is None:
            typer.echo(
                f"error: {name} is closed; nexus mcp {use} {name}, so start it "
                "from an MCP client (or a shell) with both stdin and stdout open",
                err=True,
            )
            raise typer.Exit(2)
    asyncio.run(serve_stdio(load_settings()))


def tool_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Tool name, as `nexus tools` lists it.")],
) -> None:
    """Call a tool with one `--FIELD VALUE` option per argument, for example
    `nexus tool audit_log --limit 10`. `nexus tool NAME --help` lists the
    fields. A value that parses as JSON (numbers, true, lists, objects) is
    sent as JSON, any other value as a string."""
    from app.cli import call_tool, print_json
    from app.tools import ToolError, get_tool, load_tools

    if name in ("--help", "-h"):
        # The command takes its options from the tool, so click's own help
        # option is off; without a tool name, show the command's help.
        typer.echo(ctx.get_help())
        return
    load_tools()
    try:
        spec = get_tool(name)
    except ToolError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None
    extra = list(ctx.args)
    if "--help" in extra or "-h" in extra:
        typer.echo(describe_tool_fields(spec.input_model))
        return
    try:
        arguments = parse_field_options(extra, spec.input_model)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    print_json(call_tool(name, arguments))


def parse_field_options(tokens: list[str], model: Any) -> dict[str, Any]:
    """Turn `--field value` and `--flag` tokens into arguments for `model`.

    Dashes in a field name become underscores, so `--user-id` sets
    `user_id`, and a field with an alias takes either spelling
    (`--max-agents` or `--maxAgents`). A bare `--flag` sets true, for a
    boolean field only. A value of
    a string-only field stays a string, so `--user-id 42` sends "42". A list
    field takes one item per option, repeated, or a JSON list.

    Raises:
        ValueError: a token is not an option or not valid UTF-8, a non-list
            option is repeated, a list or non-boolean option has no value,
            or a list or object field gets a value of another form.
    """
    schema = model.model_json_schema(by_alias=True)
    properties = {
        key: _resolve(details, schema)
        for key, details in schema.get("properties", {}).items()
    }
    keys = _field_keys(model)
    arguments: dict[str, Any] = {}
    # The option spelling and raw value that first set each field.
    first_given: dict[str, tuple[str, str | None]] = {}
    index = 0
    for token in tokens:
        _reject_invalid_utf8(token)
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"{token!r} is not a --FIELD option")
        option, sep, inline = token.partition("=")
        field = option[2:].replace("-", "_")
        key = keys.get(field, field)
        if sep:
            raw: str | None = inline
        elif index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            index += 1
            raw = tokens[index]
        else:
            raw = None
        details = properties.get(key, {})
        types = _field_types(details)
        if "array" in types and raw is not None:
            arguments[key] = arguments.get(key, []) + _list_items(option, raw, details)
        elif "array" in types:
            raise ValueError(
                f"{option} has no value; give one item per {option}, or a JSON list"
            )
        elif key in arguments:
            raise ValueError(_repeated_field(key, first_given[key], (option, raw)))
        elif raw is None and not types & {"boolean", "any"}:
            kinds = " or ".join(sorted(types - {"null"}))
            raise ValueError(
                f"{option} has no value; give {option} VALUE, where VALUE is "
                f"a JSON {kinds}"
            )
        elif raw is None:
            arguments[key] = True
        elif types <= {"string", "null"}:
            arguments[key] = raw
        elif "object" in types and "any" not in types:
            arguments[key] = _json_object(option, raw)
        else:
            arguments[key] = _parse_value(raw)
        first_given.setdefault(key, (option, raw))
        index += 1
    return arguments


def _reject_invalid_utf8(token: str) -> None:
    """Raise ValueError for a command-line argument that is not valid UTF-8,
    which Python decodes from argv with a lone surrogate per invalid byte."""
    raw = os.fsencode(token)
    try:
        raw.decode()
    except UnicodeDecodeError as error:
        shown = raw.decode(errors="replace")
        raise ValueError(
            f"the argument {shown!r} is not valid UTF-8 (byte {error.start}); "
            "pass text encoded as UTF-8"
        ) from None


def _repeated_field(
    key: str, first: tuple[str, str | None], second: tuple[str, str | None]
) -> str:
    """Build the error for a field that takes one value and is given twice."""
    values = " and ".join(
        "a bare flag" if raw is None else repr(raw) for _, raw in (first, second)
    )
    if first[0] == second[0]:
        problem = f"{second[0]} is given twice"
    else:
        problem = f"{first[0]} and {second[0]} both set {key}"
    return f"{problem}, as {values}, but it takes one value; give it once"


def _field_keys(model: Any) -> dict[str, str]:
    """Map each field name and alias to the key of the JSON schema."""
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        keys[name] = key
        keys[key] = key
    return keys


def _resolve(details: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Return the definition that a field's `$ref` points to, with the
    field's own keys (description, default) kept; other fields as they are.
    Pydantic writes a field typed with a model as such a reference."""
    reference = details.get("$ref")
    if not isinstance(reference, str) or not reference.startswith("#/$defs/"):
        return details
    target = schema.get("$defs", {}).get(reference.removeprefix("#/$defs/"), {})
    own = {key: value for key, value in details.items() if key != "$ref"}
    return {**target, **own}


def _field_types(details: dict[str, Any]) -> set[str]:
    if "type" in details:
        return {str(details["type"])}
    options = details.get("anyOf", [])
    if not options:
        return {"any"}
    return {str(option.get("type", "object")) for option in options}


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _list_items(option: str, raw: str, details: dict[str, Any]) -> list[Any]:
    """Read one value of a list option: a JSON list gives its items, any
    other value is one item."""
    if raw.lstrip().startswith("["):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{option} {raw!r} is not a valid JSON list ({error.msg}); repeat "
                f"""{option} once per item, or give a JSON list like '["a", "b"]'"""
            ) from None
        if isinstance(parsed, list):
            return parsed
    item_types = _field_types(_list_item_schema(details))
    if item_types <= {"string", "null"}:
        return [raw]
    return [_parse_value(raw)]


def _list_item_schema(details: dict[str, Any]) -> dict[str, Any]:
    if "items" in details:
        return dict(details["items"])
    for option in details.get("anyOf", []):
        if "items" in option:
            return dict(option["items"])
    return {}


def _json_object(option: str, raw: str) -> dict[str, Any]:
    expected = """give a JSON object like '{"key": "value"}'"""
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{option} {raw!r} is not valid JSON ({error.msg}); {expected}"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{option} {raw!r} is not a JSON object; {expected}")
    return parsed


def describe_tool_fields(model: Any) -> str:
    """List a tool's fields with their JSON types, defaults and descriptions."""
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", []))
    properties = schema.get("properties", {})
    lines = [f"Fields of {schema.get('title', model.__name__)}:"]
    for name, info in model.model_fields.items():
        key = info.alias or name
        details = _resolve(properties.get(key, {}), schema)
        kind = details.get("type") or " | ".join(
            str(option.get("type", "object")) for option in details.get("anyOf", [])
        )
        if key in required:
            default = "required"
        else:
            default = f"default {info.get_default(call_default_factory=True)!r}"
        spelling = f"--{name.replace('_', '-')}"
        if key != name:
            spelling += f", --{key}"
        notes = [kind, default]
        if "array" in _field_types(details):
            notes.append("repeatable, or a JSON list")
        description = details.get("description", "")
        lines.append(f"  {spelling} ({', '.join(notes)}) {description}".rstrip())
    if len(lines) == 1:
        lines.append("  (none)")
    return "\n".join(lines)
