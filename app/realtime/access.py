"""Access rules of realtime: the tables and subscriptions a caller may use.

A key limited to tool groups must not read through a subscription what the
tools of those groups would not show it: the platform's tables belong to
the group whose tools serve their data. A subscription and its cursor
belong to the caller that created it. The local user (the CLI and MCP over
stdio) may use every subscription and every table but those that no caller
may subscribe to (see `app.realtime.triggers.validate_table_name`).
"""

from __future__ import annotations

import functools

from sqlmodel import SQLModel

from app.contracts.realtime import SubscriptionInfo
from app.realtime.triggers import (
    INTERNAL_TABLES,
    SECRET_TABLES,
    RealtimeTableError,
    validate_table_name,
)
from app.tools.registry import ToolContext, ToolError

# The groups a key needs, beside "realtime", to subscribe to each table of the
# platform: the groups whose tools show that table's data. Every other table
# the platform owns is in `INTERNAL_TABLES` or `SECRET_TABLES`, which no
# caller may subscribe to. tests/realtime/test_access.py checks that each
# table of the metadata has one of these rules. Only tables the platform does
# not own (user tables) need "realtime" alone.
TABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "benchmark_claims": ("system",),
    "benchmark_operations": ("system",),
    "benchmark_phases": ("system",),
    "benchmark_runs": ("system",),
    "benchmark_samples": ("system",),
    "extended_duration_test_events": ("system",),
    "execution_output": ("sandbox", "workflows"),
    "neural_clusters": ("neural",),
    "neural_epochs": ("neural",),
    "neural_jobs": ("neural",),
    "neural_models": ("neural",),
    "neural_nodes": ("neural",),
    "neural_round_events": ("neural",),
    "neural_sessions": ("neural",),
    "sandboxes": ("sandbox",),
    "storage_objects": ("storage",),
    "agents": ("swarm",),
    "swarms": ("swarm",),
    "swarm_events": ("swarm",),
    "workflow_audit_events": ("workflows",),
    "workflow_definitions": ("workflows",),
    "workflow_executions": ("workflows",),
    "workflow_steps": ("workflows",),
}
# Tables whose rows a limited key's tools show only in part, so only a key
# without groups may subscribe. The audit log contains every key's call
# arguments, and the `audit_log` tool shows a limited key only the calls of
# its groups' tools and its own.
UNLIMITED_TABLES: dict[str, str] = {
    "audit_log": "the arguments of every key's calls, which the audit_log tool "
    "shows a limited key only for its groups' tools and its own calls",
}
# The group that serves the output of each kind of execution stream.
STREAM_GROUPS: dict[str, str] = {"sandbox": "sandbox", "workflow": "workflows"}


@functools.cache
def platform_tables() -> frozenset[str]:
    """Return the names of every table the platform owns: the SQLModel tables
    of the project and the migration version table."""
    import app.db.all_models  # noqa: F401  (fills the metadata)

    return frozenset(SQLModel.metadata.tables) | {"alembic_version"}


def unruled_tables() -> list[str]:
    """Return the platform's tables that have no access rule."""
    ruled = (
        INTERNAL_TABLES
        | SECRET_TABLES.keys()
        | TABLE_GROUPS.keys()
        | UNLIMITED_TABLES.keys()
    )
    return sorted(platform_tables() - ruled)


def _missing(ctx: ToolContext, needed: tuple[str, ...]) -> list[str]:
    if ctx.groups is None:
        return []
    return [group for group in needed if group not in ctx.groups]


def _caller(ctx: ToolContext) -> str:
    """Name the limited caller in an error: its key, or for a workflow step
    or swarm action, which runs without one, the groups of its run."""
    if ctx.key_id is not None:
        return f"API key {ctx.key_id}"
    allowed = ", ".join(ctx.groups or ()) or "none"
    return f"a run limited to the groups: {allowed}"


def check_table(ctx: ToolContext, table: str) -> None:
    """Raise a ToolError unless the caller may read `table`: invalid_argument
    for a table that no caller may subscribe to, forbidden for a table of a
    group the caller's key may not call."""
    try:
        table = validate_table_name(table)
    except RealtimeTableError as error:
        # The message names the table already.
        raise ToolError(str(error), kind="invalid_argument") from None
    if table in UNLIMITED_TABLES and ctx.groups is not None:
        raise ToolError(
            f"table: {table!r} contains {UNLIMITED_TABLES[table]}, so "
            f"{_caller(ctx)} may not subscribe to it; read it with the {table} "
            "tool, "
            "or subscribe with a key created without --group",
            kind="forbidden",
        )
    needed = TABLE_GROUPS.get(table)
    if needed is None and table in platform_tables() and ctx.groups is not None:
        # A table added to the platform without a rule: only a key with
        # every group may read it until it gets one.
        raise ToolError(
            f"table: {table!r} belongs to the platform and has no realtime access "
            f"rule, so {_caller(ctx)} may not subscribe to it; use a key "
            "created without --group",
            kind="forbidden",
        )
    missing = _missing(ctx, needed or ())
    if missing:
        raise ToolError(
            f"table: {table!r} contains data of the tool group(s) "
            f"{', '.join(missing)}, which {_caller(ctx)} may not call; "
            "subscribe with a key created with `nexus keys create NAME --group "
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
            f"{missing[0]}, which {_caller(ctx)} may not call; use a key "
            f"created with `nexus keys create NAME --group {missing[0]}`",
            kind="forbidden",
        )


def check_subscription(ctx: ToolContext, info: SubscriptionInfo) -> None:
    """Raise a ToolError unless the caller may still read what the
    subscription delivers, by the rules above as they are now: a rule made
    stricter after the subscription was created applies to its next read."""
    if info.stream_kind is not None:
        field = "sandbox_id" if info.stream_kind == "sandbox" else "execution_id"
        check_stream(ctx, info.stream_kind, field)
    else:
        check_table(ctx, info.table)


def owns(ctx: ToolContext, info: SubscriptionInfo) -> bool:
    """Return whether the caller may read, confirm and delete the subscription."""
    # By key id, not by the caller's name: two keys may share a name, and a
    # revoked key's name may be given to a new key.
    return ctx.key_id is None or info.key_id == ctx.key_id


def not_found_unless_owned(ctx: ToolContext, info: SubscriptionInfo) -> None:
    """Raise the not-found error for another caller's subscription, so that
    its id reveals nothing, not even that it exists."""
    if not owns(ctx, info):
        raise ToolError(
            f"subscription {info.subscription_id!r} not found; realtime_list "
            "shows your subscriptions",
            kind="not_found",
        )
