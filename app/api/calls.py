"""One path from a caller to a tool, shared by HTTP, streamable MCP and stdio
MCP: group permission, invocation through `invoke_tool`, and error shapes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from app.api.keys import Principal
from app.services.audit import record_call
from app.services.audit_writer import AuditWriter
from app.services.health_cache import HealthSnapshots
from app.settings import Settings
from app.tools import ToolContext, ToolError, ToolInputError, get_tool, invoke_tool

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
    """

    settings: Settings
    audit_writer: AuditWriter | None = None
    health_snapshots: HealthSnapshots | None = None
    _base: ToolContext = field(init=False)

    def __post_init__(self) -> None:
        self._base = ToolContext(self.settings)

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
        spec = get_tool(name)
        if principal is not None and not principal.may_call(spec.group):
            allowed = ", ".join(principal.groups or ())
            message = (
                f"API key {principal.key_id} may not call {name} (group "
                f"{spec.group}); it is limited to the groups: {allowed}. Use a "
                "key created with `nexus keys create --group "
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
            return await invoke_tool(ctx, name, arguments)
        finally:
            # A tool that needed Temporal connected through `ctx`; later calls
            # reuse that connection. Tools that never need Temporal (the
            # audit log) no longer wait for a connection attempt.
            if self._base.temporal_client is None and ctx.temporal_client is not None:
                self._base.temporal_client = ctx.temporal_client
