"""The MCP server, generated from the tool registry with the low-level SDK
server, so every registered tool is listed and callable without code here."""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
from mcp import MCPError
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from pydantic import ValidationError

import app
from app.api.calls import ToolRunner
from app.api.keys import Principal
from app.jsonsafe import encodable, json_type
from app.services.audit import record_call
from app.tools import ToolError, all_tools

logger = logging.getLogger(__name__)

# Key under which the HTTP layer stores the verified caller in the ASGI scope,
# where the MCP transport's request object can read it back.
PRINCIPAL_SCOPE_KEY = "nexus.principal"


def tool_definitions() -> list[types.Tool]:
    """Return every registered tool with its input and output JSON schemas."""
    return [
        types.Tool(
            name=spec.name,
            description=spec.description,
            input_schema=spec.input_model.model_json_schema(by_alias=True),
            output_schema=spec.result_model.model_json_schema(
                by_alias=True, mode="serialization"
            ),
        )
        for spec in all_tools()
    ]


def _principal(ctx: ServerRequestContext[Any, Any]) -> Principal | None:
    request = ctx.request
    if request is None:
        return None
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else None


def local_user_name() -> str:
    """Return the user id that the audit log records for calls over stdio."""
    return f"mcp:{getpass.getuser()}"


def build_mcp_server(runner: ToolRunner, *, require_principal: bool) -> Server[Any]:
    """Build a server whose tools are the registry's tools.

    Args:
        runner: runs the calls.
        require_principal: True over HTTP, where every call must carry a key
            that the HTTP layer verified; False on stdio, where the caller is
            the local user who started the process.
    """
    definitions = tool_definitions()
    local_user = local_user_name()

    async def list_tools(
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        principal = _principal(ctx)
        listed = [
            tool
            for tool, spec in zip(definitions, all_tools(), strict=True)
            if principal is None or principal.may_call(spec.group)
        ]
        return types.ListToolsResult(tools=listed)

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        principal = _principal(ctx)
        if require_principal and principal is None:
            return _error_result("this MCP endpoint requires an API key")
        try:
            result = await runner.call(
                params.name,
                dict(params.arguments or {}),
                principal=principal,
                local_user=local_user,
            )
        except ToolError as error:
            return _error_result(error.message)
        # A row stored before the audit log replaced lone surrogates would
        # otherwise fail pydantic's serialization of the whole response.
        result = encodable(result)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=json.dumps(result))],
            structured_content=result,
        )

    server: Server[Any] = Server(
        "flow-nexus",
        version=app.__version__,
        instructions=(
            "flow-nexus tools: swarms, sandboxes, neural clusters, workflows, "
            "realtime, storage, health and audit. Errors name the invalid value "
            "and the fix."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )

    async def audit_invalid_params(ctx: Any, message: str) -> None:
        principal = _principal(ctx)
        event: dict[str, Any] = {
            "user_id": principal.user_id if principal else local_user,
            "key_id": principal.key_id if principal else None,
            "tool": "mcp",
            "arguments": {},
            "outcome": "error",
            "duration_ms": 0.0,
            "error": f"rejected with -32602: {message}",
        }
        try:
            if runner.audit_writer is not None:
                runner.audit_writer.submit(**event)
            else:
                url = runner.settings.effective_database_url
                await asyncio.to_thread(record_call, url, **event)
        except Exception:
            logger.exception("could not audit a request with invalid params")

    server.middleware.append(
        functools.partial(_explain_invalid_params, audit=audit_invalid_params)
    )
    return server


JSONRPC_SHAPE = (
    'a request is {"jsonrpc": "2.0", "id": ID, "method": NAME, "params": {...}}, '
    "one message per line or POST"
)


def jsonrpc_shape_problem(document: Any) -> str | None:
    """Say why a parsed JSON document is not a JSON-RPC 2.0 message, naming
    the field, or return None when it is one. The SDK's own error is a dump
    of pydantic's errors for every kind of message at once."""
    if not isinstance(document, dict):
        return (
            f"a JSON {json_type(document)} is not a JSON-RPC message; {JSONRPC_SHAPE}"
        )
    version = document.get("jsonrpc")
    if version != "2.0":
        shown_version = (
            repr(version)
            if isinstance(version, str)
            else f"a JSON {json_type(version)}"
        )
        if "jsonrpc" not in document:
            shown_version = "missing"
        return f'jsonrpc: {shown_version[:100]} is invalid: send "2.0"; {JSONRPC_SHAPE}'
    if "method" in document and not isinstance(document["method"], str):
        kind = json_type(document["method"])
        return f"method: a JSON {kind} is invalid: send the method name as a string"
    if "id" in document:
        problem = _id_problem(document["id"], is_request="method" in document)
        if problem is not None:
            return problem
    if "params" in document and not isinstance(document["params"], dict | list):
        kind = json_type(document["params"])
        return f"params: a JSON {kind} is invalid: send an object; {JSONRPC_SHAPE}"
    try:
        types.jsonrpc_message_adapter.validate_python(document, by_name=False)
    except ValidationError:
        return (
            "the message is not a JSON-RPC 2.0 request, notification or "
            f"response; {JSONRPC_SHAPE}"
        )
    return None


def readable_request_id(document: Any) -> str | int | None:
    """Return the id of a request, so that its error response reaches the
    caller waiting for it; None where the document has no usable id."""
    if not isinstance(document, dict):
        return None
    request_id = document.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        return None
    return request_id


def _id_problem(request_id: Any, *, is_request: bool) -> str | None:
    """Say why a message's `id` is invalid, or return None for a string or
    an integer, or for null in a response.

    The SDK reads a request with any other id as a notification (its model
    allows extra fields), so it would respond 202 with no body over HTTP,
    nothing over stdio, and run nothing. A notification has no `id` member
    at all, so a request with `"id": null` is invalid too. Only an error
    response may have a null id, when the request's id was unreadable.
    """
    fix = "send the request id as a string or an integer"
    if request_id is None and not is_request:
        return None
    if request_id is None:
        return f"id: null is invalid: {fix}, or leave out id for a notification"
    if isinstance(request_id, bool):
        return f"id: a JSON boolean is invalid: {fix}"
    if isinstance(request_id, float):
        return f"id: {request_id!r} is invalid: {fix}"
    if not isinstance(request_id, str | int):
        return f"id: a JSON {json_type(request_id)} is invalid: {fix}"
    return None


# The shape of each method's params that an error repeats as the fix.
_PARAMS_SHAPES = {
    "tools/call": '{"name": TOOL, "arguments": {...}}',
    "tools/list": '{} or {"cursor": CURSOR}',
    "initialize": (
        '{"protocolVersion": VERSION, "capabilities": {...}, '
        '"clientInfo": {"name": NAME, "version": VERSION}}'
    ),
}


async def _explain_invalid_params(
    ctx: Any,
    call_next: Any,
    *,
    audit: Callable[[Any, str], Awaitable[None]],
) -> Any:
    """Reply to params that fail the SDK's validation with the field, the JSON
    type it got and the shape expected, where the SDK sends an empty
    -32602. The value itself is left out: tool arguments may hold secrets."""
    try:
        return await call_next(ctx)
    except MCPError as error:
        if not _before_initialize(ctx, error):
            raise
        method = str(getattr(ctx, "method", ""))
        message = (
            f"{method[:100]} was sent before initialize: this session is not "
            "initialized yet; send an initialize request first, then the "
            "notifications/initialized notification (only ping may come before)"
        )
        await audit(ctx, message)
        raise MCPError(code=types.INVALID_PARAMS, message=message) from None
    except ValidationError as error:
        method = str(getattr(ctx, "method", ""))
        errors = []
        for item in error.errors():
            # The SDK's first check validates the whole request, its second
            # the params alone, so a location may or may not start there.
            where = [str(part) for part in item["loc"]]
            field = ".".join(where if where[:1] == ["params"] else ["params", *where])
            got = (
                "it is missing"
                if item["type"] == "missing"
                else f"a JSON {json_type(item['input'])} is invalid"
            )
            errors.append({"field": field, "message": f"{got}: {item['msg']}"})
        shape = _PARAMS_SHAPES.get(method)
        fix = f"; {method} params are {shape}" if shape else ""
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        # Like every request rejected before a tool ran.
        await audit(ctx, f"Invalid params of {method}: {summary}")
        raise MCPError(
            code=types.INVALID_PARAMS,
            message=f"Invalid params of {method}: {summary}{fix}",
            data={"errors": errors},
        ) from None


def _before_initialize(ctx: Any, error: MCPError) -> bool:
    """Return whether `error` is the SDK's rejection of a request sent before
    `initialize` on a stateful session (stdio).

    NOTE: the SDK (mcp 2.x, `ServerRunner`) gives that rejection no type of
    its own: it is INVALID_PARAMS with an empty `data`, where every other
    INVALID_PARAMS of this server carries the errors. The stateless HTTP
    transport starts each session initialized, so only stdio meets it.
    """
    session = getattr(ctx, "session", None)
    return (
        error.error.code == types.INVALID_PARAMS
        and error.error.data == ""
        and session is not None
        and session.client_params is None
    )


def _error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)], is_error=True
    )
