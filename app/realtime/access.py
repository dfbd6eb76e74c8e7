"""Access rules of realtime: the tables and subscriptions a caller may use.

A key limited to tool groups must not read through a subscription what the
tools of those groups would not show it: the platform's tables belong to
the group whose tools serve their data. A subscription and its cursor
belong to the caller that created it. The local user (the CLI and MCP over
stdio) may use every table and subscription.
"""

from __future__ import annotations

from app.contracts.realtime import SubscriptionInfo
from app.tools.registry import ToolContext, ToolError

# The groups a key needs, beside "realtime", to subscribe to each of the
# platform's tables. Tables not listed (user tables) need "realtime" only.
TABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "audit_log": ("system",),
    "benchmark_samples": ("system",),
    "benchmark_operations": ("system",),
    "extended_duration_test_events": ("system",),
    "execution_output": ("sandbox", "workflows"),
    "workflow_executions": ("workflows",),
    "workflow_steps": ("workflows",),
    "sandboxes": ("sandbox",),
    "neural_epochs": ("neural",),
    "neural_round_events": ("neural",),
    "swarm_events": ("swarm",),
}
# The group that serves the output of each kind of execution stream.
STREAM_GROUPS: dict[str, str] = {"sandbox": "sandbox", "workflow": "workflows"}


def _missing(ctx: ToolContext, needed: tuple[str, ...]) -> list[str]:
    if ctx.groups is None:
        return []
    return [group for group in needed if group not in ctx.groups]


def check_table(ctx: ToolContext, table: str) -> None:
    """Raise a forbidden ToolError unless the caller may read `table`."""
    missing = _missing(ctx, TABLE_GROUPS.get(table, ()))
    if missing:
        raise ToolError(
            f"table: {table!r} contains data of the tool group(s) "
            f"{', '.join(missing)}, which API key {ctx.key_id} may not call; "
            "subscribe with a key created with `nexus keys create --group "
            f"{missing[0]}` (and the realtime group)",
            kind="forbidden",
        )


def check_stream(ctx: ToolContext, kind: str, field: str) -> None:
    """Raise a forbidden ToolError unless the caller may read the output of
    executions of `kind` ("sandbox" or "workflow")."""
    missing = _missing(ctx, (STREAM_GROUPS[kind],))
    if missing:
        raise ToolError(
            f"{field}: the output of a {kind} belongs to the tool group "
            f"{missing[0]}, which API key {ctx.key_id} may not call; use a key "
            f"created with `nexus keys create --group {missing[0]}`",
            kind="forbidden",
        )


def owns(ctx: ToolContext, info: SubscriptionInfo) -> bool:
    """Return whether the caller may read, confirm and delete the subscription."""
    return ctx.key_id is None or info.user_id == ctx.user_id


def not_found_unless_owned(ctx: ToolContext, info: SubscriptionInfo) -> None:
    """Raise the not-found error for another caller's subscription, so that
    its id reveals nothing, not even that it exists."""
    if not owns(ctx, info):
        raise ToolError(
            f"subscription {info.subscription_id!r} not found; realtime_list "
            "shows your subscriptions",
            kind="not_found",
        )
