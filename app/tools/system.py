"""System tools: `system_health` and `audit_log`."""

from __future__ import annotations

import asyncio
import functools

from pydantic import BaseModel, ConfigDict, Field

from app.contracts.system import AuditRecord, HealthReport
from app.services.audit import list_calls
from app.services.health import system_health
from app.tools.registry import ToolContext, all_tools, tool


class SystemHealthInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@tool("system_health", group="system")
async def system_health_tool(ctx: ToolContext, args: SystemHealthInput) -> HealthReport:
    """Read the platform's health: database, Temporal, pollers on every
    task queue, uptime, memory and version. `age_seconds` is how old the
    figures are: 0 when read for this call, at most
    NEXUS_API_HEALTH_MAX_AGE_SECONDS when the HTTP server returns its last
    reading again."""

    async def probe() -> HealthReport:
        return await system_health(ctx.settings, await ctx.optional_client())

    if ctx.health_snapshots is None:
        return await probe()
    return await ctx.health_snapshots.read(probe)


class AuditLogInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    limit: int = Field(
        100, ge=1, le=1000, description="Events to return, newest first."
    )
    user_id: str | None = Field(None, description="Only calls by this caller.")
    tool: str | None = Field(None, description="Only calls of this tool.")


class AuditLogResult(BaseModel):
    events: list[AuditRecord]
    count: int


@tool("audit_log", group="system")
async def audit_log_tool(ctx: ToolContext, args: AuditLogInput) -> AuditLogResult:
    """List recent tool calls: who called what, when, with masked arguments,
    the outcome and the duration. A key limited to some groups reads the
    calls of those groups' tools and its own calls."""
    visible: tuple[str, ...] | None = None
    if ctx.groups is not None:
        # Arguments keep up to 4096 characters of every string, such as an
        # upload's content, so a key reads only what it could have sent.
        visible = tuple(
            sorted(spec.name for spec in all_tools() if spec.group in ctx.groups)
        )
    if ctx.audit_writer is not None:
        # Calls that this server made before this one are in the result.
        events = await ctx.audit_writer.list_calls(
            limit=args.limit,
            user_id=args.user_id,
            tool=args.tool,
            visible_tools=visible,
            own_key_id=ctx.key_id,
        )
    else:
        read = functools.partial(
            list_calls,
            ctx.database_url,
            limit=args.limit,
            user_id=args.user_id,
            tool=args.tool,
            visible_tools=visible,
            own_key_id=ctx.key_id,
        )
        events = await asyncio.to_thread(read)
    return AuditLogResult(events=events, count=len(events))
