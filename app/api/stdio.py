"""MCP over stdio: stdout carries protocol messages only.

The transport is this module's, in place of the SDK's `stdio_server`, which
differs in two ways. The SDK's reader passes a line that does not parse (not
JSON, a lone surrogate escape) to the session as an exception, which the
session only logs, so the client waits for a response forever. And when stdin
ends, the session cancels the calls in flight, so a call whose write had
committed was reported, and audited, as cancelled. Here such a line gets a
JSON-RPC error and an audit event, and at the end of stdin every request
already read runs to its end and gets its response before the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from pydantic import ValidationError

from app.api.calls import ToolRunner
from app.api.mcp_server import (
    JSONRPC_SHAPE,
    build_mcp_server,
    jsonrpc_shape_problem,
    local_user_name,
    readable_request_id,
)
from app.db.migrate import ensure_current
from app.jsonsafe import InvalidJSONError, load_strict
from app.services.audit import is_secret_name, record_call
from app.settings import Settings
from app.tools import all_tools, load_tools

logger = logging.getLogger(__name__)

# JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600

# Metadata of the transport's own error responses, which belong to no
# request that the server is running.
_TRANSPORT_REPLY = ServerMessageMetadata()


async def serve_stdio(settings: Settings) -> None:
    """Serve MCP on this process's stdin and stdout until stdin closes and
    every request read from it has its response."""
    ensure_current(settings.effective_database_url)
    load_tools()
    server = build_mcp_server(ToolRunner(settings), require_principal=False)
    audit = _RejectionAudit(settings.effective_database_url, local_user_name())
    logger.info("MCP server on stdio with %d tools", len(all_tools()))
    with _claim_standard_streams() as (wire_in, wire_out):
        async with stdio_transport(wire_in, wire_out, audit) as (read, write):
            await server.run(read, write, server.create_initialization_options())
    logger.info("MCP server on stdio stopped: stdin closed")


@dataclass(frozen=True)
class _RejectionAudit:
    """Writes the audit event of a line rejected before any tool ran."""

    database_url: str
    user_id: str

    async def record(self, started: float, code: int, message: str) -> None:
        try:
            await asyncio.to_thread(
                record_call,
                self.database_url,
                user_id=self.user_id,
                tool="mcp",
                arguments={},
                outcome="error",
                duration_ms=(time.perf_counter() - started) * 1000,
                error=f"rejected with {code}: {message}",
            )
        except Exception:
            logger.exception("failed to write the audit event of a rejected message")


@contextlib.contextmanager
def _claim_standard_streams() -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Yield the wire as private duplicates of fds 0 and 1.

    Meanwhile fd 0 is the null device and fd 1 is stderr, so code or a child
    process that prints cannot corrupt the protocol, and one that reads stdin
    reads EOF.
    """
    sys.stdout.flush()
    wire_in, wire_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
    finally:
        os.close(null)
    # closefd=False, and wire_in is never closed: an abandoned reader thread
    # can still block on it, and a recycled number would then read another
    # file.
    reader = os.fdopen(wire_in, "rb", closefd=False)
    writer = os.fdopen(wire_out, "wb", closefd=False)
    try:
        yield reader, writer
    finally:
        # A write that failed on a closed pipe leaves its bytes in the
        # buffer, and closing tries them again.
        with contextlib.suppress(OSError):
            writer.close()
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        os.close(wire_out)


# How long the server goes on after stdin closed, for the requests already
# read. A client that has gone away must not keep the process alive forever.
EOF_DRAIN_SECONDS = 900


class _OpenRequests:
    """Ids of the requests handed to the server and not yet responded to."""

    def __init__(self) -> None:
        # A count per id, because a client may reuse the id of a request
        # still in flight and then gets a response for each.
        self._counts: Counter[str | int] = Counter()
        self._idle = anyio.Event()
        self._idle.set()

    def opened(self, request_id: str | int) -> None:
        self._counts[request_id] += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def settled(self, request_id: str | int) -> None:
        if self._counts[request_id] <= 0:
            return
        self._counts[request_id] -= 1
        if self._counts[request_id] == 0:
            del self._counts[request_id]
        if not self._counts:
            self._idle.set()

    def __len__(self) -> int:
        return sum(self._counts.values())

    async def wait_idle(self) -> None:
        await self._idle.wait()


@contextlib.asynccontextmanager
async def stdio_transport(
    wire_in: BinaryIO, wire_out: BinaryIO, audit: _RejectionAudit
) -> AsyncIterator[
    tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]
]:
    """Yield the read and write streams of an MCP server on newline-delimited
    JSON-RPC over `wire_in` and `wire_out`.

    The read stream ends only when `wire_in` ended and the server responded
    to every request read from it (or settled it without a response, as for
    a request the client cancelled). A line that is not a JSON-RPC message
    gets its error response here and never reaches the server.
    """
    read_send, read_receive = anyio.create_memory_object_stream[
        SessionMessage | Exception
    ](0)
    write_send, write_receive = anyio.create_memory_object_stream[SessionMessage](0)
    requests = _OpenRequests()
    reply_send = write_send.clone()
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(
            _read_lines, wire_in, read_send, reply_send, requests, audit
        )
        task_group.start_soon(_write_lines, wire_out, write_receive, requests)
        try:
            yield read_receive, write_send
        finally:
            # Normally the reader has ended already. When the server stopped
            # early, the reader may still wait for a line that never comes.
            task_group.cancel_scope.cancel()


async def _read_lines(
    wire_in: BinaryIO,
    read_send: MemoryObjectSendStream[SessionMessage | Exception],
    reply_send: MemoryObjectSendStream[SessionMessage],
    requests: _OpenRequests,
    audit: _RejectionAudit,
) -> None:
    async with read_send, reply_send:
        while True:
            # abandon_on_cancel: a blocked readline would otherwise hold up
            # the server's exit until the client sends another line.
            line = await anyio.to_thread.run_sync(
                wire_in.readline, abandon_on_cancel=True
            )
            if not line:
                break
            started = time.perf_counter()
            parsed = parse_line(line)
            if parsed is None:
                continue
            if isinstance(parsed, Rejection):
                await audit.record(started, parsed.code, parsed.message)
                await reply_send.send(
                    SessionMessage(parsed.response(), metadata=_TRANSPORT_REPLY)
                )
                continue
            await read_send.send(_session_message(parsed, requests))
        if len(requests):
            logger.info(
                "stdin closed; finishing %d request(s) in flight", len(requests)
            )
        with anyio.move_on_after(EOF_DRAIN_SECONDS):
            await requests.wait_idle()
        if len(requests):
            logger.warning(
                "stdin closed %d s ago and %d request(s) are still running; "
                "stopping the server, which cancels them",
                EOF_DRAIN_SECONDS,
                len(requests),
            )


def _session_message(
    message: types.JSONRPCMessage, requests: _OpenRequests
) -> SessionMessage:
    if not isinstance(message, types.JSONRPCRequest):
        return SessionMessage(message)
    request_id = message.id
    requests.opened(request_id)

    async def settle_unanswered() -> None:
        requests.settled(request_id)

    # The server calls this hook for a request it settles without a
    # response, such as one the client cancelled.
    return SessionMessage(
        message,
        metadata=ServerMessageMetadata(on_request_unanswered=settle_unanswered),
    )


async def _write_lines(
    wire_out: BinaryIO,
    write_receive: MemoryObjectReceiveStream[SessionMessage],
    requests: _OpenRequests,
) -> None:
    output_open = True
    async with write_receive:
        async for session_message in write_receive:
            message = session_message.message
            if output_open:
                line = message.model_dump_json(by_alias=True, exclude_unset=True)
                try:
                    await anyio.to_thread.run_sync(_write_line, wire_out, line)
                except (OSError, ValueError) as error:
                    # The client closed its end; the requests still finish,
                    # so their writes and audit events are not cut short.
                    logger.warning(
                        "stdout is closed (%s); later responses are dropped", error
                    )
                    output_open = False
            if (
                session_message.metadata is not _TRANSPORT_REPLY
                and isinstance(message, types.JSONRPCResponse | types.JSONRPCError)
                and message.id is not None
            ):
                requests.settled(message.id)


def _write_line(wire_out: BinaryIO, line: str) -> None:
    wire_out.write(line.encode() + b"\n")
    wire_out.flush()


@dataclass(frozen=True)
class Rejection:
    """A line rejected with a JSON-RPC error instead of reaching the server.

    Attributes:
        request_id: the id of the request, when the line shows one, else None.
        code: the JSON-RPC error code.
        message: what is wrong and where.
        errors: the offending field, its value and the problem, when known.
    """

    request_id: str | int | None
    code: int
    message: str
    errors: list[dict[str, Any]] | None = None

    def response(self) -> types.JSONRPCError:
        label = "Parse error" if self.code == PARSE_ERROR else "Invalid request"
        data = {"errors": self.errors} if self.errors is not None else None
        return types.JSONRPCError(
            jsonrpc="2.0",
            id=self.request_id,
            error=types.ErrorData(
                code=self.code, message=f"{label}: {self.message}", data=data
            ),
        )


def parse_line(line: bytes) -> types.JSONRPCMessage | Rejection | None:
    """Parse one line of stdin as a JSON-RPC message.

    Returns:
        The message; a `Rejection` for a line that is not strict JSON
        (`PARSE_ERROR`) or not a JSON-RPC message (`INVALID_REQUEST`); None
        for a blank line.
    """
    if not line.strip():
        return None
    # The line is checked as the HTTP API checks a body first: the SDK's
    # parser keeps the last of repeated keys, and names neither the field nor
    # the position of a lone surrogate escape or invalid UTF-8.
    try:
        document = load_strict(line, is_secret=is_secret_name)
    except InvalidJSONError as error:
        errors = None
        if error.field is not None:
            errors = [
                {"field": error.field, "value": error.value, "message": error.problem}
            ]
        request_id = readable_request_id(error.document) if error.lenient else None
        return Rejection(request_id, PARSE_ERROR, error.message, errors)
    # Checked before the SDK's validation, which accepts a request whose id
    # is null, a fraction, a boolean, an object or an array as a
    # notification, so it would get no response at all.
    problem = jsonrpc_shape_problem(document)
    if problem is not None:
        return Rejection(readable_request_id(document), INVALID_REQUEST, problem)
    try:
        return types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError:
        message = f"the line is not a JSON-RPC 2.0 message; {JSONRPC_SHAPE}"
        return Rejection(readable_request_id(document), INVALID_REQUEST, message)
