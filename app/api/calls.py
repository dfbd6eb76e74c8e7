"""One path from a caller to a tool, shared by HTTP, streamable MCP and stdio
MCP: group permission, invocation through `invoke_tool`, and error shapes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from app.api.keys import Principal
from app.services.audit import record_call
from app.services.audit_writer import AuditWriter
from app.services.health_cache import HealthSnapshots
from app.settings import Settings
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool, known_tool

# HTTP status of each ToolError kind; "invalid_argument" is pydantic's 422.
STATUS_BY_KIND: dict[str, int] = {
    "invalid_argument": 422,
    "not_found": 404,
    "forbidden": 403,
    "conflict": 409,
    "unavailable": 503,
    "failed": 500,
}


class ErrorDetail(BaseModel):
    """One invalid field: its dotted path, the value sent and the rule broken."""

    field: str
    value: Any = None
    message: str


class ErrorInfo(BaseModel):
    kind: str
    message: str
    errors: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    """Body of every error response of the HTTP API."""

    error: ErrorInfo


class ForbiddenToolError(ToolError):
    """The key may not call tools of this group."""


def error_status(error: ToolError) -> int:
    if isinstance(error, ForbiddenToolError):
        return 403
    return STATUS_BY_KIND.get(error.kind, 500)


def error_body(error: ToolError) -> dict[str, Any]:
    kind = "forbidden" if isinstance(error, ForbiddenToolError) else error.kind
    info: dict[str, Any] = {"kind": kind, "message": error.message}
    if isinstance(error, ToolInputError):
        info["errors"] = error.errors
    return {"error": info}


@dataclass
class ToolRunner:
    """Runs tools for callers, with one Temporal connection for the process.

    Attributes:
        audit_writer: the server's queue of audit events; None writes each
            event before the call returns.
        health_snapshots: the server's shared `system_health` reading; None
            reads live on every call.
        stop_grace_seconds: how long a call may still run once `begin_stop`
            was called before it gets an unavailable error; None leaves
            calls alone (stdio, which finishes its calls itself).
    """

    settings: Settings
    audit_writer: AuditWriter | None = None
    health_snapshots: HealthSnapshots | None = None
    stop_grace_seconds: float | None = None
    _base: ToolContext = field(init=False)
    _stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._base = ToolContext(self.settings)

    def begin_stop(self) -> None:
        """Start the stop grace of the calls in flight and of later ones.

        Safe to call from a signal handler: the event is set on the loop
        that runs the calls.
        """
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def _unless_stopped(
        self, name: str, call: Coroutine[Any, Any, dict[str, Any]]
    ) -> dict[str, Any]:
        """Await `call`; once a stop began and `stop_grace_seconds` passed
        without its result, cancel it and raise an unavailable ToolError.

        Without this, a call that waits on workers which stop at the same
        time (a sandbox call's update) kept the HTTP server from exiting
        until the supervisor killed it, and its caller got no reply at all.
        """
        assert self.stop_grace_seconds is not None
        running = asyncio.ensure_future(call)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                await asyncio.wait({running}, timeout=self.stop_grace_seconds)
            if running.done():
                return running.result()
            running.cancel(
                "the server is stopping; the caller got 503, and the call may "
                "still take effect"
            )
            with contextlib.suppress(asyncio.CancelledError):
                await running
            raise ToolError(
                f"the server is stopping, and {name} had not finished "
                f"{self.stop_grace_seconds:g} s after the stop began, so it was "
                "left unanswered. It may still take effect: work that runs on "
                "Temporal goes on when the workers run again. Read the current "
                "state (a status or list tool) before you call it again",
                kind="unavailable",
            )
        finally:
            stopping.cancel()
            if not running.done():
                running.cancel()

    async def call(
        self,
        name: str,
        arguments: dict[str, Any] | None,
        *,
        principal: Principal | None,
        local_user: str = "local",
    ) -> dict[str, Any]:
        """Run tool `name` for `principal` (None for the local user).

        Raises:
            ToolError: the tool is unknown, forbidden to this key, was called
                with invalid arguments, or failed.
        """
        spec = known_tool(name)
        if (
            spec is not None
            and principal is not None
            and not principal.may_call(spec.group)
        ):
            allowed = ", ".join(principal.groups or ())
            message = (
                f"API key {principal.key_id} may not call {name} (group "
                f"{spec.group}); it is limited to the groups: {allowed}. Use a "
                "key created with `nexus keys create NAME --group "
                f"{spec.group}`"
            )
            event: dict[str, Any] = {
                "user_id": principal.user_id,
                "key_id": principal.key_id,
                "tool": name,
                "arguments": dict(arguments or {}),
                "outcome": "error",
                "duration_ms": 0.0,
                "error": message,
            }
            if self.audit_writer is not None:
                self.audit_writer.submit(**event)
            else:
                await asyncio.to_thread(
                    record_call, self.settings.effective_database_url, **event
                )
            raise ForbiddenToolError(message)
        ctx = ToolContext(
            self.settings,
            user_id=principal.user_id if principal else local_user,
            key_id=principal.key_id if principal else None,
            groups=principal.groups if principal else None,
            temporal_client=self._base.temporal_client,
            audit_writer=self.audit_writer,
            health_snapshots=self.health_snapshots,
        )
        try:
            if self.stop_grace_seconds is None:
                return await invoke_tool(ctx, name, arguments)
            self._loop = asyncio.get_running_loop()
            return await self._unless_stopped(name, invoke_tool(ctx, name, arguments))
        finally:
            # A tool that needed Temporal connected through `ctx`; later calls
            # reuse that connection. Tools that never need Temporal (the
            # audit log) no longer wait for a connection attempt.
            if self._base.temporal_client is None and ctx.temporal_client is not None:
                self._base.temporal_client = ctx.temporal_client
