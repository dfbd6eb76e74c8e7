"""The FastAPI application: one typed operation per tool, streamable MCP at
`/mcp`, API keys, rate limits and body size limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from mcp.server.streamable_http import check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import app
from app.api.calls import ErrorBody, ToolRunner, error_body, error_status
from app.api.keys import Principal, VerifiedKeys, parse_token
from app.api.mcp_server import (
    PRINCIPAL_SCOPE_KEY,
    build_mcp_server,
    jsonrpc_shape_problem,
    readable_request_id,
)
from app.api.ratelimit import RateLimiter, retry_after_header
from app.db.engine import BackgroundCheckpoints
from app.jsonsafe import InvalidJSONError, dumps, json_type, load_strict
from app.processes import freeze_startup_objects
from app.services.audit import is_secret_name
from app.services.audit_writer import AuditWriter
from app.services.health_cache import HealthSnapshots
from app.settings import Settings
from app.tools import ToolError, ToolSpec, all_tools, load_tools
from app.tools.registry import brief_value, masked_input, secret_fields

logger = logging.getLogger(__name__)

# Routers of other capabilities, mounted when their modules exist: module,
# builder, and the tool group whose data the routes serve (a key must be
# allowed that group), or None for routes without a key. Signed storage URLs
# carry their own HMAC, so they need no key.
OPTIONAL_ROUTERS: tuple[tuple[str, str, str | None], ...] = (
    ("app.realtime.http", "build_realtime_router", "realtime"),
    ("app.storage.http", "build_storage_router", None),
)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The same hosts as a Host or Origin header writes them.
_LOOPBACK_HEADER_HOSTS = ("127.0.0.1", "localhost", "[::1]")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "The API key is missing, malformed, wrong or revoked.",
        403: "The API key may not call this tool's group.",
        404: "A record that the arguments name does not exist.",
        409: "The request conflicts with the current state.",
        413: "The request body is larger than NEXUS_API_MAX_BODY_BYTES.",
        422: "The arguments do not match the tool's input schema.",
        429: "The API key's rate limit is used up; retry after Retry-After.",
        500: "The tool failed; the message says what failed.",
        503: "A service that the tool needs (Temporal, the database) is down.",
    }.items()
}


def _json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Build a JSON response that cannot fail to encode: JSONResponse raises
    on a lone surrogate or a non-finite float (see `app.jsonsafe.dumps`)."""
    return Response(
        dumps(content), status, headers=headers, media_type="application/json"
    )


def _error_response(
    status: int,
    kind: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    errors: list[dict[str, Any]] | None = None,
) -> Response:
    info: dict[str, Any] = {"kind": kind, "message": message}
    if errors is not None:
        info["errors"] = errors
    return _json_response({"error": info}, status, headers=headers)


# Error kind of every 413 response, whichever check rejects the body.
PAYLOAD_TOO_LARGE = "payload_too_large"


class BodyTooLargeError(Exception):
    """The request body grew past the limit while it was read."""


# Key under which `Gate.admit` stores the audited target and the caller of
# an admitted request in the ASGI scope, for BodyLimitMiddleware's audit event.
ADMITTED_SCOPE_KEY = "nexus.admitted"


class BodyLimitMiddleware:
    """Reject with 413 a request whose body exceeds `limit` bytes, by its
    Content-Length header or by the bytes actually received, when the route
    reads the body: the routes check the key first. Each rejection is in the
    audit log."""

    def __init__(self, app: ASGIApp, limit: int, gate: Gate) -> None:
        self.app = app
        self.limit = limit
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared_too_large = any(
            name == b"content-length" and value.isdigit() and int(value) > self.limit
            for name, value in scope["headers"]
        )
        received = 0
        started = False
        arrived = time.perf_counter()

        async def counting_receive() -> Message:
            nonlocal received
            # A body declared too large is refused when the route first reads
            # it, which is after the route checked the key, so a request
            # without a key gets 401 whatever its size. Nothing is read.
            if declared_too_large:
                raise BodyTooLargeError
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            message = (
                f"the request body is larger than {self.limit} bytes; send less, "
                "or raise NEXUS_API_MAX_BODY_BYTES on the server"
            )
            # A route that needs no key, or that read the body before it
            # checked the key, stored no caller, so the event names the path.
            target, principal = scope.get(
                ADMITTED_SCOPE_KEY, (scope["path"][:100], None)
            )
            self.gate.audit_rejection(
                target, arrived, 413, message, principal=principal
            )
            await _error_response(413, PAYLOAD_TOO_LARGE, message)(scope, receive, send)


# Caller recorded in the audit log for a request without a valid key.
ANONYMOUS_USER = "anonymous"


class Gate:
    """Authentication and rate limiting of one application.

    Every rejected request is written to the audit log with outcome `error`
    and the status in the message. The token is never written: a key id
    appears only as the id part of a well-formed token.
    """

    def __init__(self, settings: Settings, audit_writer: AuditWriter) -> None:
        self.settings = settings
        self.audit_writer = audit_writer
        self.keys = VerifiedKeys(
            settings.effective_database_url, settings.api_key_cache_seconds
        )
        self.limiter = RateLimiter(settings.api_rate_limit, settings.api_rate_burst)

    async def admit(self, request: Request, target: str) -> Principal | Response:
        """Return the caller of a valid key with a free token, or the 401 or
        429 response to send instead.

        Args:
            request: the incoming request.
            target: the tool name, or the path, that the audit log records.
        """
        started = time.perf_counter()
        token = _bearer_token(request.headers.getlist("authorization"))
        if isinstance(token, _Unauthorized):
            self.audit_rejection(target, started, 401, token.message)
            return _error_response(
                401,
                "unauthorized",
                token.message,
                {"WWW-Authenticate": token.challenge},
            )
        principal = await self.keys.verify(token)
        if principal is None:
            logger.warning("rejected an unknown, wrong or revoked API key")
            message = (
                "the API key is unknown, wrong or revoked; check it with "
                "`nexus keys list` or create a new one"
            )
            parsed = parse_token(token)
            # The id part is not secret, but a malformed token may be a
            # secret pasted whole, so only a short id-shaped part is kept.
            key_id = parsed[0][:32] if parsed is not None else None
            self.audit_rejection(target, started, 401, message, key_id=key_id)
            return _error_response(
                401,
                "unauthorized",
                message,
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        wait = self.limiter.acquire(principal.key_id)
        if wait > 0:
            retry = retry_after_header(wait)
            message = (
                f"API key {principal.key_id} exceeded "
                f"{self.settings.api_rate_limit:g} requests per second (burst "
                f"{self.settings.api_rate_burst}); retry after {retry} s"
            )
            self.audit_rejection(target, started, 429, message, principal=principal)
            return _error_response(429, "rate_limited", message, {"Retry-After": retry})
        request.scope[ADMITTED_SCOPE_KEY] = (target, principal)
        return principal

    async def key_is_active(self, request: Request) -> bool:
        """Return whether the request's key is still valid: a revocation or
        rotation in this process applies at once, and one made by another
        process within `NEXUS_API_KEY_CACHE_SECONDS`."""
        token = _bearer_token(request.headers.getlist("authorization"))
        if isinstance(token, _Unauthorized):
            return False
        return await self.keys.verify(token) is not None

    def audit_rejection(
        self,
        target: str,
        started: float,
        status: int,
        message: str,
        *,
        key_id: str | None = None,
        principal: Principal | None = None,
        jsonrpc_code: int | None = None,
    ) -> None:
        """Queue the audit event of a request rejected before a tool ran.

        Args:
            target: the tool name, or the path, that the audit log records.
            started: `time.perf_counter()` when the request arrived.
            status: the HTTP status sent.
            message: the message sent.
            key_id: the id part of a well-formed but rejected token.
            principal: the caller, when the key was valid.
            jsonrpc_code: the JSON-RPC error code sent in the body, if any.
        """
        code = (
            f"{status}"
            if jsonrpc_code is None
            else f"{status}, JSON-RPC {jsonrpc_code}"
        )
        # NOTE: every rejected request adds a row, so a client without a key
        # can grow the audit log as fast as the server responds.
        try:
            self.audit_writer.submit(
                user_id=principal.user_id if principal else ANONYMOUS_USER,
                key_id=principal.key_id if principal else key_id,
                tool=target,
                arguments={},
                outcome="error",
                duration_ms=(time.perf_counter() - started) * 1000,
                error=f"rejected with {code}: {message}",
            )
        except Exception:
            logger.exception("could not queue the audit event of a rejected call")


@dataclass(frozen=True)
class _Unauthorized:
    """The reason that a request's Authorization headers carry no bearer token."""

    message: str
    challenge: str = "Bearer"


_BEARER_FIX = (
    "send `Authorization: Bearer <key>` (create a key with `nexus keys create NAME`)"
)
# An authentication scheme as RFC 9110 writes one, short enough to be no key.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^`|~-]{0,19}")


def _bearer_token(headers: list[str]) -> str | _Unauthorized:
    """Return the token of the one `Authorization: Bearer <token>` header,
    or why there is none. A message never shows the header's value, which
    may be a key sent with another scheme."""
    if len(headers) > 1:
        # Authorization is not a list header (RFC 9110), and a proxy that
        # reads another of the headers would disagree with this server.
        return _Unauthorized(
            f"the request has {len(headers)} Authorization headers, and the "
            "server does not pick one; send one `Authorization: Bearer <key>` "
            "header",
            'Bearer error="invalid_request"',
        )
    header = headers[0].strip() if headers else ""
    if not header:
        return _Unauthorized(f"missing API key; {_BEARER_FIX}")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer":
        if token:
            return token
        return _Unauthorized(
            f"the Authorization header has the Bearer scheme but no key; {_BEARER_FIX}"
        )
    if token and _SCHEME.fullmatch(scheme) and parse_token(scheme) is None:
        return _Unauthorized(
            f"the Authorization header uses the scheme {scheme!r}, which this "
            f"server does not accept; {_BEARER_FIX}"
        )
    return _Unauthorized(
        "the Authorization header does not start with a scheme (a bare key?); "
        f"{_BEARER_FIX}"
    )


def _tool_response(result: dict[str, Any]) -> Response:
    # `dumps` tries orjson first, which encoded a 1.3 KB health report in
    # 3-8 us against 70-96 us for the json module that JSONResponse uses
    # (2-core machine), with the same bytes. Unlike JSONResponse it writes
    # NaN as null, as pydantic's JSON does, and it does not fail on a lone
    # surrogate that a stored row may hold.
    return _json_response(result)


def _tool_error_response(error: ToolError) -> Response:
    return _json_response(error_body(error), error_status(error))


def _invalid_json_response(error: InvalidJSONError) -> Response:
    # A syntax error that no value explains is an error of the whole body.
    if error.field is not None:
        detail = {"field": error.field, "value": error.value, "message": error.problem}
    else:
        detail = {"field": "body", "value": None, "message": error.message}
    return _error_response(422, "invalid_argument", error.message, errors=[detail])


async def _read_json_object(
    request: Request,
    gate: Gate,
    target: str,
    principal: Principal,
    marked: frozenset[str] = frozenset(),
) -> dict[str, Any] | Response:
    """Read the body as a JSON object of tool arguments, or return the 422
    response for a body that is not one. The rejection is audited here,
    because no tool call will audit it.

    Args:
        marked: the tool's secret fields, whose values a message must not show.
    """
    started = time.perf_counter()
    if request.query_params:
        # Read nowhere, so a call with `?limit=3` would run with defaults.
        names = ", ".join(sorted({name[:100] for name in request.query_params}))
        message = (
            f"the query string ({names}) is not read on tool routes; send the "
            'arguments as a JSON object in the body, as in {"limit": 3}'
        )
        gate.audit_rejection(target, started, 422, message, principal=principal)
        detail = {"field": "query", "value": None, "message": message}
        return _error_response(422, "invalid_argument", message, errors=[detail])
    body = await request.body()
    if not body.strip():
        return {}
    try:
        parsed = load_strict(
            body, is_secret=lambda name: name in marked or is_secret_name(name)
        )
    except InvalidJSONError as error:
        response = _invalid_json_response(error)
        gate.audit_rejection(target, started, 422, error.message, principal=principal)
        return response
    if not isinstance(parsed, dict):
        message = (
            f"the request body must be a JSON object of arguments, not a JSON "
            f"{json_type(parsed)}"
        )
        gate.audit_rejection(target, started, 422, message, principal=principal)
        detail = {"field": "body", "value": json_type(parsed), "message": message}
        return _error_response(422, "invalid_argument", message, errors=[detail])
    return parsed


def _tool_endpoint(
    spec: ToolSpec, gate: Gate, runner: ToolRunner
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        admitted = await gate.admit(request, spec.name)
        if isinstance(admitted, Response):
            return admitted
        arguments = await _read_json_object(
            request, gate, spec.name, admitted, secret_fields(spec.input_model)
        )
        if isinstance(arguments, Response):
            return arguments
        try:
            result = await runner.call(spec.name, arguments, principal=admitted)
        except ToolError as error:
            return _tool_error_response(error)
        return _tool_response(result)

    endpoint.__name__ = f"call_{spec.name}"
    return endpoint


class McpEndpoint:
    """`/mcp`: JSON-RPC goes to the streamable HTTP transport; a body of the
    form `{"tool": NAME, "args": {...}}` is a plain tool call.

    On a loopback address every request, JSON-RPC or plain, must carry a
    loopback `Host` and, when it has one, a loopback `Origin`. This check
    comes before the key's.
    """

    def __init__(
        self,
        gate: Gate,
        runner: ToolRunner,
        manager: StreamableHTTPSessionManager,
        *,
        check_host: bool,
    ) -> None:
        self.gate = gate
        self.runner = runner
        self.manager = manager
        self.check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if self.check_host:
            rejected = self._check_host_and_origin(request)
            if rejected is not None:
                await rejected(scope, receive, send)
                return
        admitted = await self.gate.admit(request, "mcp")
        if isinstance(admitted, Response):
            await admitted(scope, receive, send)
            return
        scope[PRINCIPAL_SCOPE_KEY] = admitted
        # Read here, whatever the method, so that BodyLimitMiddleware rejects
        # a body over the limit with the API's error body before a 405.
        body = await request.body()
        if scope["method"] != "POST":
            # In stateless mode a GET stream would never carry a message,
            # and there is no session for DELETE to end. The MCP streamable
            # HTTP transport lets a server without an SSE stream respond 405.
            message = (
                f"method {scope['method'][:20]} is not allowed on '/mcp': this "
                "server is stateless and offers no SSE stream or session; send "
                "each JSON-RPC message or plain call with POST"
            )
            response = _error_response(
                405, "method_not_allowed", message, {"Allow": "POST"}
            )
            await response(scope, receive, send)
            return
        started = time.perf_counter()
        invalid: InvalidJSONError | None = None
        try:
            parsed = load_strict(body, is_secret=is_secret_name)
        except InvalidJSONError as error:
            # The json module's reading of the body still shows whether it is
            # a plain call or JSON-RPC, so the error comes in the form the
            # client reads.
            invalid = error
            parsed = error.document if error.lenient else _NOT_JSON
        if _is_plain_call(parsed):
            if invalid is not None:
                self.gate.audit_rejection(
                    "mcp", started, 422, invalid.message, principal=admitted
                )
                response = _invalid_json_response(invalid)
            else:
                response = await self._plain_call(admitted, parsed, started)
            await response(scope, receive, send)
            return
        rejection = self._jsonrpc_rejection(request, parsed, invalid)
        if rejection is not None:
            status, code, label, message = rejection
            self.gate.audit_rejection(
                "mcp", started, status, message, principal=admitted, jsonrpc_code=code
            )
            # A parse error keeps the id null, as JSON-RPC 2.0 requires,
            # because the client's JSON was not read as it meant it.
            request_id = None if code == PARSE_ERROR else readable_request_id(parsed)
            response = _jsonrpc_error(label + message, code, status, request_id)
            await response(scope, receive, send)
            return
        await self.manager.handle_request(scope, _replay(body, receive), send)

    def _jsonrpc_rejection(
        self, request: Request, parsed: Any, invalid: InvalidJSONError | None
    ) -> tuple[int, int, str, str] | None:
        """Return the HTTP status, JSON-RPC code, label and message of a
        JSON-RPC body that this endpoint rejects, or None to pass it to the
        MCP transport. The response's message is the label and the message,
        the audit log's the message alone.

        The transport's own rejections are checked here first, because they
        would not reach the audit log, and their messages are pydantic's
        raw errors or plain text.
        """
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith("application/json"):
            return (
                400,
                INVALID_REQUEST,
                "",
                f"Content-Type {content_type[:100]!r} is not application/json; "
                "send JSON-RPC with Content-Type: application/json",
            )
        if isinstance(parsed, list):
            message = "JSON-RPC batches are not supported; send one request per POST"
            return 400, INVALID_REQUEST, "", message
        if invalid is not None:
            # The transport's parser accepts NaN and lone surrogates.
            return 400, PARSE_ERROR, "Parse error: ", invalid.message
        shape = jsonrpc_shape_problem(parsed)
        if shape is not None:
            return 400, INVALID_REQUEST, "Invalid request: ", shape
        accepts_json, _ = check_accept_headers(request)
        if not accepts_json:
            accept = request.headers.get("accept", "")
            # 406, as the transport responds: its responses are JSON only.
            return (
                406,
                INVALID_REQUEST,
                "Not Acceptable: ",
                f"Accept {accept[:100]!r} does not include "
                "application/json; send Accept: application/json",
            )
        return None

    def _check_host_and_origin(self, request: Request) -> Response | None:
        started = time.perf_counter()
        host = request.headers.get("host", "")
        origin = request.headers.get("origin")
        if not _is_loopback_host(host):
            status, kind = 421, "misdirected_request"
            message = (
                f"Host header {host[:100]!r} is not a loopback address; this "
                "server listens on a loopback address, so send Host 127.0.0.1, "
                "localhost or [::1] (with the port), or set NEXUS_HTTP_HOST to "
                "the address the clients use"
            )
        elif origin is not None and not _is_loopback_origin(origin):
            status, kind = 403, "forbidden"
            message = (
                f"Origin header {origin[:100]!r} is not a loopback origin; this "
                "server listens on a loopback address and accepts requests only "
                "from pages served by 127.0.0.1, localhost or [::1]"
            )
        else:
            return None
        self.gate.audit_rejection("mcp", started, status, message)
        return _error_response(status, kind, message)

    async def _plain_call(
        self, principal: Principal, parsed: Any, started: float
    ) -> Response:
        shape_error = _plain_call_shape_error(parsed)
        if shape_error is not None:
            field, invalid = shape_error
            self.gate.audit_rejection("mcp", started, 422, invalid, principal=principal)
            detail = {"field": field, "value": None, "message": invalid}
            return _error_response(422, "invalid_argument", invalid, errors=[detail])
        name = parsed["tool"]
        arguments = parsed.get("args" if "args" in parsed else "arguments")
        try:
            result = await self.runner.call(name, arguments, principal=principal)
        except ToolError as error:
            return _tool_error_response(error)
        return _tool_response(result)


# Top-level fields of a plain `/mcp` call; "arguments" is accepted as an
# alias of "args", the name MCP's tools/call uses.
_PLAIN_CALL_FIELDS = frozenset({"tool", "args", "arguments"})
_PLAIN_CALL_SHAPE = '{"tool": NAME, "args": {...}}'
# A body that not even the json module parses. The MCP transport replies to
# it with a JSON-RPC parse error.
_NOT_JSON = object()
# JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600


def _plain_call_shape_error(parsed: Any) -> tuple[str, str] | None:
    """Return the field and the reason why a plain `/mcp` call does not have
    the shape `{"tool": NAME, "args": {...}}`, or None when it does.

    The messages show a value only where it cannot be a secret (a tool
    name that is a number, for example), because they reach the audit log.
    """
    if not isinstance(parsed, dict):
        return "body", (
            f"the body must be a JSON object, not a JSON {json_type(parsed)}: a "
            f"plain call is {_PLAIN_CALL_SHAPE}, and a JSON-RPC message has "
            '"jsonrpc": "2.0"'
        )
    if "tool" not in parsed:
        return "tool", (
            f"tool: missing; a plain call is {_PLAIN_CALL_SHAPE}, and a "
            'JSON-RPC message has "jsonrpc": "2.0"'
        )
    name = parsed["tool"]
    if not isinstance(name, str):
        shown_value = repr(name) if _is_scalar(name) else f"a JSON {json_type(name)}"
        return "tool", (
            f"tool: {shown_value} is not a tool name; send the name as a string"
        )
    unknown = sorted(set(parsed) - _PLAIN_CALL_FIELDS)
    if unknown:
        return unknown[0], (
            f"{', '.join(unknown)}: not a field of a plain call; a plain call "
            f'is {_PLAIN_CALL_SHAPE}, so put tool arguments inside "args"'
        )
    if "args" in parsed and "arguments" in parsed:
        return "arguments", (
            "args, arguments: both are given; send the tool arguments once, "
            'in "args" (or "arguments")'
        )
    field = "args" if "args" in parsed else "arguments"
    arguments = parsed.get(field)
    if arguments is not None and not isinstance(arguments, dict):
        return field, (
            f"{field}: a JSON {json_type(arguments)} is invalid: the arguments "
            "must be a JSON object"
        )
    return None


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float)


def _is_plain_call(parsed: Any) -> bool:
    """Return whether a parsed `/mcp` body is a plain call: JSON without
    `jsonrpc`, except a list, which is a JSON-RPC batch."""
    if parsed is _NOT_JSON or isinstance(parsed, list):
        return False
    return not (isinstance(parsed, dict) and "jsonrpc" in parsed)


def _jsonrpc_error(
    message: str,
    code: int = INVALID_REQUEST,
    status: int = 400,
    request_id: str | int | None = None,
) -> Response:
    """Build a response with a JSON-RPC error (by default "invalid request"
    with status 400), the shape of the MCP transport's own rejections."""
    error = {"code": code, "message": message}
    return _json_response({"jsonrpc": "2.0", "id": request_id, "error": error}, status)


def _is_loopback_host(value: str) -> bool:
    """True for `HOST` or `HOST:PORT` where HOST is a loopback host as a Host
    header writes it (`[::1]` with brackets)."""
    value = value.strip().lower()
    for host in _LOOPBACK_HEADER_HOSTS:
        if value == host:
            return True
        port = value.removeprefix(host + ":")
        if port != value:
            return port.isdigit()
    return False


def _is_loopback_origin(value: str) -> bool:
    """True for `http://HOST[:PORT]` or `https://...` on a loopback host."""
    scheme, sep, rest = value.strip().lower().partition("://")
    return bool(sep) and scheme in ("http", "https") and _is_loopback_host(rest)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that first returns the body already read, then the client's
    later messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _key_dependency(gate: Gate, group: str) -> Any:
    """Build a dependency that admits a request as a tool call of `group`
    is admitted, so it needs a valid key with a free token that may call the
    group. The dependency audits the request like a tool call, with the path
    as the tool, the path and query parameters as the arguments, and the
    route's outcome."""

    async def require_key(request: Request) -> AsyncIterator[None]:
        started = time.perf_counter()
        target = request.url.path[:100]
        admitted = await gate.admit(request, target)
        if isinstance(admitted, Response):
            headers = {
                name: value
                for name, value in admitted.headers.items()
                if name.lower() in ("www-authenticate", "retry-after")
            }
            detail = json.loads(bytes(admitted.body)).get("error", "rejected")
            raise HTTPException(admitted.status_code, detail=detail, headers=headers)
        if not admitted.may_call(group):
            message = _forbidden_message(admitted, target, group)
            gate.audit_rejection(target, started, 403, message, principal=admitted)
            raise HTTPException(403, detail={"kind": "forbidden", "message": message})
        unknown = sorted(set(request.query_params) - _declared_query(request))
        if unknown:
            # Their values are neither read nor stored, since a client may put
            # anything there, a key included.
            names = ", ".join(name[:100] for name in unknown)
            message = (
                f"unknown query parameter(s) {names} on {target}; remove them "
                "(the route's parameters are listed in /openapi.json)"
            )
            gate.audit_rejection(target, started, 422, message, principal=admitted)
            raise HTTPException(
                422, detail={"kind": "invalid_argument", "message": message}
            )
        # Routes that serve a caller's own records (subscriptions) read it.
        request.state.principal = admitted
        # A stream outlives this check, so it checks the key again while it runs.
        request.state.key_is_active = functools.partial(gate.key_is_active, request)
        arguments = {**request.path_params, **request.query_params}
        outcome, error = "success", None
        audited_elsewhere = False
        try:
            yield
        except BodyTooLargeError:
            # BodyLimitMiddleware responds with 413 and writes the event.
            audited_elsewhere = True
            raise
        except HTTPException as rejected:
            outcome, error = "error", f"{rejected.status_code}: {rejected.detail}"
            raise
        except RequestValidationError as invalid:
            outcome, error = "error", f"422: {_validation_message(invalid)}"
            raise
        except Exception as failed:
            outcome, error = "error", f"{type(failed).__name__}: the route failed"
            raise
        finally:
            if not audited_elsewhere:
                gate.audit_writer.submit(
                    user_id=admitted.user_id,
                    key_id=admitted.key_id,
                    tool=target,
                    arguments=arguments,
                    outcome=outcome,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    error=error,
                )

    # Scope "function": the audit row is written once the route has accepted
    # or rejected the request, not when a long-lived stream ends.
    return Depends(require_key, scope="function")


def _declared_query(request: Request) -> set[str]:
    """Names of the query parameters the matched route declares."""
    pending = [getattr(request.scope.get("route"), "dependant", None)]
    names: set[str] = set()
    while pending:
        dependant = pending.pop()
        if dependant is not None:
            names.update(field.alias for field in dependant.query_params)
            pending.extend(dependant.dependencies)
    return names


def _forbidden_message(principal: Principal, target: str, group: str) -> str:
    allowed = ", ".join(principal.groups or ())
    return (
        f"API key {principal.key_id} may not read {target} (group {group}); it "
        f"is limited to the groups: {allowed}. Use a key created with `nexus "
        f"keys create NAME --group {group}`"
    )


def _include_optional_routers(
    application: FastAPI, settings: Settings, gate: Gate
) -> list[str]:
    mounted = []
    for module_name, builder, group in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue
            raise
        router = getattr(module, builder)(settings)
        dependencies = [_key_dependency(gate, group)] if group is not None else []
        application.include_router(router, dependencies=dependencies)
        mounted.append(module_name)
        logger.info("mounted the router of %s", module_name)
    return mounted


_STATUS_KINDS = {
    400: "invalid_argument",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: PAYLOAD_TOO_LARGE,
    422: "invalid_argument",
    429: "rate_limited",
}


def _install_error_handlers(application: FastAPI) -> None:
    """Give the mounted routers' errors the same body as the tool routes."""

    # Starlette's class, a base of FastAPI's, so that the router's own 404
    # for an unknown path and 405 for a wrong method get this body too.
    @application.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        detail = error.detail
        headers = dict(error.headers) if error.headers else None
        if isinstance(detail, dict):
            return _json_response({"error": detail}, error.status_code, headers)
        kind = _STATUS_KINDS.get(error.status_code, "failed")
        message = str(detail)
        if error.status_code in (404, 405) and detail == _phrase(error.status_code):
            message = _routing_message(request, error.status_code, headers)
        return _error_response(error.status_code, kind, message, headers)

    @application.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> Response:
        errors = _validation_errors(error)
        body = {
            "kind": "invalid_argument",
            "message": _validation_message(error),
            "errors": errors,
        }
        return _json_response({"error": jsonable_encoder(body)}, 422)


def _phrase(status: int) -> str:
    return HTTPStatus(status).phrase


def _routing_message(
    request: Request, status: int, headers: dict[str, str] | None
) -> str:
    """Describe the router's 404 for an unknown path or 405 for a method the
    route does not take, which carry only the status phrase."""
    # The decoded path of the request: `request.url` drops line breaks and
    # tabs, as urllib's parser does.
    path = request.scope["path"]
    if status == 404:
        return (
            f"no route matches {request.method} {path!r}; tools are called with "
            "POST /api/tools/TOOL, and GET /openapi.json lists every route"
        )
    allowed = {name.lower(): value for name, value in (headers or {}).items()}
    return (
        f"method {request.method} is not allowed on {path!r}; use "
        f"{allowed.get('allow') or 'another method'}"
    )


def _validation_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "field": ".".join(str(part) for part in item["loc"]),
            "value": brief_value(masked_input(tuple(item["loc"]), item.get("input"))),
            "message": item["msg"],
        }
        for item in error.errors()
    ]


def _validation_message(error: RequestValidationError) -> str:
    return "; ".join(f"{e['field']}: {e['message']}" for e in _validation_errors(error))


# How long a call may still run after the server got SIGTERM or SIGINT. The
# workers stop at the same time and drain their activities for 10 s, and the
# supervisor kills what still runs after 20 s. A call still waiting after
# this gets a 503 response, so its caller does not see a dropped connection.
STOP_GRACE_SECONDS = 10.0


def create_app(settings: Settings) -> FastAPI:
    """Build the HTTP application for every tool registered now."""
    load_tools()
    # Pinned once, because resolving the data folder on every call costs a
    # filesystem walk (Path.resolve) per call.
    settings = settings.model_copy(
        update={"database_url": settings.effective_database_url}
    )
    audit_writer = AuditWriter(settings.effective_database_url)
    runner = ToolRunner(
        settings,
        audit_writer=audit_writer,
        health_snapshots=HealthSnapshots(settings.api_health_max_age_seconds),
        stop_grace_seconds=STOP_GRACE_SECONDS,
    )
    gate = Gate(settings, audit_writer)
    mcp_server = build_mcp_server(runner, require_principal=True)
    manager = StreamableHTTPSessionManager(
        app=mcp_server,
        json_response=True,
        stateless=True,
        # McpEndpoint checks Host and Origin itself, so that plain calls get
        # the same check and every rejection the API's error body.
        security_settings=None,
        max_request_body_size=settings.api_max_body_bytes,
    )

    checkpoints = BackgroundCheckpoints(settings.effective_database_url)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        checkpoints.start()
        try:
            async with manager.run():
                # Full collections over the app's objects took up to 0.26 s
                # on a loaded 2-core machine and stalled every request.
                freeze_startup_objects()
                logger.info("HTTP API serving %d tools", len(all_tools()))
                yield
        finally:
            # Every call that got a response before shutdown has its audit row.
            await audit_writer.close()
            await asyncio.to_thread(checkpoints.stop)

    application = FastAPI(
        title="flow-nexus",
        version=app.__version__,
        description=(
            "Every flow-nexus tool as one POST operation. Send the tool's "
            "arguments as the JSON body and `Authorization: Bearer <key>`."
        ),
        lifespan=lifespan,
        # Off by default, and served from installed files when on: FastAPI's
        # pages load their scripts from a CDN.
        docs_url=None,
        redoc_url=None,
        # Starlette responds to `/mcp/` with a 307 to `/mcp` before the Host, key
        # and audit checks, with a Location built from the Host header, so a
        # trailing slash gets the 404 of any unknown path instead.
        redirect_slashes=False,
    )
    application.state.gate = gate
    application.state.runner = runner
    application.state.audit_writer = audit_writer

    @application.get("/health", tags=["health"], openapi_extra={"security": []})
    async def health() -> dict[str, Any]:
        """Liveness of this HTTP process only; call the `system_health` tool
        for the platform's health."""
        return {"status": "ok", "version": app.__version__, "tools": len(all_tools())}

    # HEAD, for monitors that check liveness without a body: uvicorn sends
    # the headers of the GET response and drops its body.
    application.add_api_route(
        "/health", health, methods=["HEAD"], include_in_schema=False
    )

    endpoints = {spec.name: _tool_endpoint(spec, gate, runner) for spec in all_tools()}
    for spec in all_tools():
        application.add_api_route(
            f"/api/tools/{spec.name}",
            endpoints[spec.name],
            methods=["POST"],
            name=spec.name,
            operation_id=spec.name,
            summary=_summary(spec.description),
            description=spec.description,
            tags=[spec.group],
            responses={200: {"model": spec.result_model}, **ERROR_RESPONSES},
            openapi_extra={"requestBody": _request_body(spec)},
        )

    @application.post("/api/tools/{tool}", include_in_schema=False)
    async def unknown_tool(tool: str, request: Request) -> Response:
        admitted = await gate.admit(request, tool[:100])
        if isinstance(admitted, Response):
            return admitted
        # Reached for unknown tools, which get_tool turns into a 404, and for
        # a tool registered after the app was built, which runs normally.
        arguments = await _read_json_object(request, gate, tool[:100], admitted)
        if isinstance(arguments, Response):
            return arguments
        try:
            result = await runner.call(tool, arguments, principal=admitted)
        except ToolError as error:
            return _tool_error_response(error)
        return _tool_response(result)

    async def dispatch(request: Request) -> Response:
        name = request.path_params["tool"]
        endpoint = endpoints.get(name)
        if endpoint is None:
            return await unknown_tool(name, request)
        return await endpoint(request)

    # The per-tool routes above describe the operations in /openapi.json.
    # This route serves the calls with one dictionary lookup, because
    # Starlette would otherwise try every tool's route in turn on each call.
    application.router.routes.insert(
        0,
        Route(
            "/api/tools/{tool}",
            endpoint=dispatch,
            methods=["POST"],
            include_in_schema=False,
        ),
    )
    application.router.routes.append(
        Route(
            "/mcp",
            endpoint=McpEndpoint(
                gate,
                runner,
                manager,
                check_host=settings.http_host in _LOOPBACK_HOSTS,
            ),
            # Every method reaches the endpoint, which rejects all but POST
            # with 405 after the key and body checks.
            methods=None,
            include_in_schema=False,
        )
    )
    _include_optional_routers(application, settings, gate)
    if settings.api_docs:
        _add_doc_pages(application)
    _install_error_handlers(application)
    application.openapi = lambda: _openapi(application)  # type: ignore[method-assign]
    application.add_middleware(
        BodyLimitMiddleware, limit=settings.api_max_body_bytes, gate=gate
    )
    return application


# URL prefix of the Swagger UI and ReDoc files.
_DOC_ASSETS = "/docs-assets"


def _add_doc_pages(application: FastAPI) -> None:
    """Serve `/docs` (Swagger UI) and `/redoc` with their scripts from the
    fastapi-offline package, so the pages load nothing from other hosts.
    The pages hold no data: they read `/openapi.json`, which needs no key,
    and send the key that the reader enters."""
    assets = Path(fastapi_offline.__file__).parent / "static"
    application.mount(_DOC_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    openapi_url = application.openapi_url or "/openapi.json"

    @application.get("/docs", include_in_schema=False)
    async def swagger_page() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{application.title} API",
            swagger_js_url=f"{_DOC_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_DOC_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_DOC_ASSETS}/favicon.png",
        )

    @application.get("/redoc", include_in_schema=False)
    async def redoc_page() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{application.title} API",
            redoc_js_url=f"{_DOC_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{_DOC_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def _summary(description: str) -> str:
    """Return the first paragraph of a docstring as one line."""
    return " ".join(description.split("\n\n")[0].split())


def _component_name(spec: ToolSpec) -> str:
    return spec.input_model.__name__


def _request_body(spec: ToolSpec) -> dict[str, Any]:
    return {
        "required": False,
        "content": {
            "application/json": {
                "schema": {"$ref": f"#/components/schemas/{_component_name(spec)}"}
            }
        },
    }


def _openapi(application: FastAPI) -> dict[str, Any]:
    if application.openapi_schema:
        return application.openapi_schema
    schema = get_openapi(
        title=application.title,
        version=application.version,
        description=application.description,
        routes=application.routes,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for spec in all_tools():
        body = spec.input_model.model_json_schema(
            by_alias=True, ref_template="#/components/schemas/{model}"
        )
        schemas.update(body.pop("$defs", {}))
        schemas[_component_name(spec)] = body
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearer": []}]
    application.openapi_schema = schema
    return schema
