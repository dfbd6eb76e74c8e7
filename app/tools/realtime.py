"""Realtime tools: filtered subscriptions to table changes and execution
output streams."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from app.contracts.realtime import EventType, SubscriptionInfo
from app.contracts.types import UtcDateTime
from app.realtime.access import (
    check_stream,
    check_subscription,
    check_table,
    not_found_unless_owned,
    owns,
)
from app.realtime.output import output_status, stream_target_exists
from app.realtime.service import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_TIMEOUT_MS,
    DEFAULT_MAX_BUFFER_SIZE,
    SubscriptionError,
    SubscriptionNotFound,
    create_subscription,
    delete_subscription,
    describe_subscription,
    get_subscription,
    list_subscriptions,
    prune_if_due,
    pruned_output_chunks,
)
from app.realtime.stream import close_streams, next_events
from app.tools.registry import ToolContext, ToolError, arguments_error, tool


class RealtimeSubscribeInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    table: str = Field(description="Table of the application database.")
    event: EventType = Field("*", description="INSERT, UPDATE, DELETE or *.")
    filter: str | None = Field(
        None,
        description="PostgREST filter such as `status=eq.active,score=gt.10`: eq, "
        "neq, lt, lte, gt, gte, in.(a,b), is.null|true|false, like, ilike, not. "
        "prefix; commas mean AND; double-quote values with commas or parentheses.",
    )
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    buffer_timeout: int = Field(
        DEFAULT_BUFFER_TIMEOUT_MS,
        ge=10,
        le=60_000,
        description="Milliseconds a stream waits for changes before it looks at "
        "the log again (and an SSE stream sends a keep-alive comment).",
    )
    max_buffer_size: int = Field(DEFAULT_MAX_BUFFER_SIZE, ge=1, le=1_000_000)


@tool("realtime_subscribe", group="realtime")
async def realtime_subscribe(
    ctx: ToolContext, args: RealtimeSubscribeInput
) -> SubscriptionInfo:
    """Subscribe to changes of a table, optionally filtered PostgREST-style
    (`col=eq.v`, comma = AND). Returns subscription_id with its cursor, head
    and lag; read the matching changes after that moment with
    realtime_events, each subscription with its own durable cursor."""
    check_table(ctx, args.table)
    try:
        created = await asyncio.to_thread(
            create_subscription,
            ctx.database_url,
            args.table,
            event=args.event,
            filter_text=args.filter,
            batch_size=args.batch_size,
            buffer_timeout_ms=args.buffer_timeout,
            max_buffer_size=args.max_buffer_size,
            user_id=ctx.user_id,
            key_id=ctx.key_id,
        )
    except SubscriptionError as error:
        raise ToolError(str(error), kind="invalid_argument") from None
    return await _described(ctx, created)


async def _described(ctx: ToolContext, created: SubscriptionInfo) -> SubscriptionInfo:
    """Return the new subscription with head and lag, as realtime_list
    shows it."""
    try:
        return await asyncio.to_thread(
            describe_subscription, ctx.database_url, created.subscription_id
        )
    except SubscriptionNotFound:
        return created  # unsubscribed at once by another caller


class RealtimeEventsInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    subscription_id: str
    limit: int = Field(100, ge=1, le=1000, description="Events to return at most.")
    wait_ms: int = Field(
        0,
        ge=0,
        le=60_000,
        description="Milliseconds to wait for a first event when none is ready.",
    )


class RealtimeEventsResult(BaseModel):
    subscription_id: str
    events: list[dict[str, Any]]
    count: int
    cursor: int = Field(description="The cursor after this batch.")


def _not_found(error: SubscriptionNotFound) -> ToolError:
    return ToolError(str(error), kind="not_found")


async def _owned(ctx: ToolContext, subscription_id: str) -> SubscriptionInfo:
    """Return the caller's subscription, or raise not found for a missing
    one or another caller's."""
    try:
        info = await asyncio.to_thread(
            get_subscription, ctx.database_url, subscription_id
        )
    except SubscriptionNotFound as error:
        raise _not_found(error) from None
    not_found_unless_owned(ctx, info)
    return info


async def _readable(ctx: ToolContext, subscription_id: str) -> SubscriptionInfo:
    """Return the caller's subscription if the caller may still read it."""
    info = await _owned(ctx, subscription_id)
    check_subscription(ctx, info)
    return info


@tool("realtime_events", group="realtime")
async def realtime_events(
    ctx: ToolContext, args: RealtimeEventsInput
) -> RealtimeEventsResult:
    """Read the next batch of matching changes after the subscription's cursor
    and advance the cursor past them before returning: a caller that loses
    the reply does not get that batch again. Each event has id, schema,
    table, commit_timestamp, eventType, new and old. Pass wait_ms to wait for
    changes when none are ready."""
    await _readable(ctx, args.subscription_id)
    try:
        events, cursor = await next_events(
            ctx.database_url, args.subscription_id, args.limit, args.wait_ms
        )
    except SubscriptionNotFound as error:
        raise _not_found(error) from None
    except SubscriptionError as error:
        # The table no longer accepts the subscription: it was dropped, lost
        # a filtered column, or may no longer be subscribed to.
        raise ToolError(str(error), kind="invalid_argument") from None
    await asyncio.to_thread(
        prune_if_due, ctx.database_url, ctx.settings.realtime_retention_seconds
    )
    return RealtimeEventsResult(
        subscription_id=args.subscription_id,
        events=events,
        count=len(events),
        cursor=cursor,
    )


class SubscriptionIdInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    subscription_id: str


class RealtimeUnsubscribeResult(BaseModel):
    subscription_id: str
    unsubscribed: bool


@tool("realtime_unsubscribe", group="realtime")
async def realtime_unsubscribe(
    ctx: ToolContext, args: SubscriptionIdInput
) -> RealtimeUnsubscribeResult:
    """Delete a subscription and its cursor. Streams reading it stop: an SSE
    stream sends `event: closed` and ends (at once on this server, within a
    second on another process)."""
    try:
        await _owned(ctx, args.subscription_id)
    except ToolError:
        deleted = False
    else:
        deleted = await asyncio.to_thread(
            delete_subscription, ctx.database_url, args.subscription_id
        )
        close_streams(args.subscription_id)
    if not deleted:
        raise ToolError(
            f"subscription {args.subscription_id!r} not found; realtime_list shows "
            "the existing ones",
            kind="not_found",
        )
    return RealtimeUnsubscribeResult(
        subscription_id=args.subscription_id, unsubscribed=True
    )


class RealtimeListInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RealtimeListResult(BaseModel):
    subscriptions: list[SubscriptionInfo]
    count: int


@tool("realtime_list", group="realtime")
async def realtime_list(
    ctx: ToolContext, args: RealtimeListInput
) -> RealtimeListResult:
    """List subscriptions with table, filter, cursor (the last change the
    subscriber confirmed), delivered (distinct events the cursor has passed),
    head (newest change id of the log) and lag: events after the cursor that
    match the event and filter. A filtered subscription's lag counts matches
    among the first 10,000 changes of its table after the cursor, and
    lag_exact is false when more changes wait beyond them."""
    subscriptions = [
        info
        for info in await asyncio.to_thread(list_subscriptions, ctx.database_url)
        if owns(ctx, info)
    ]
    return RealtimeListResult(subscriptions=subscriptions, count=len(subscriptions))


class ExecutionStreamSubscribeInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    sandbox_id: str | None = Field(None, description="Stream this sandbox's output.")
    # The schema names it execution_id, as the docs and errors do, and
    # workflow_id is accepted too.
    execution_id: str | None = Field(
        None,
        validation_alias=AliasChoices("execution_id", "workflow_id"),
        description=(
            "Stream the output of this workflow execution (its workflow id; "
            "also accepted as workflow_id)."
        ),
    )

    @model_validator(mode="after")
    def _one_target(self) -> ExecutionStreamSubscribeInput:
        if (self.sandbox_id is None) == (self.execution_id is None):
            raise arguments_error(
                "pass exactly one of sandbox_id and execution_id",
                "sandbox_id",
                "execution_id",
            )
        return self

    def target(self) -> tuple[Literal["sandbox", "workflow"], str]:
        if self.sandbox_id is not None:
            return "sandbox", self.sandbox_id
        assert self.execution_id is not None
        return "workflow", self.execution_id


async def _execution_started(ctx: ToolContext, execution_id: str) -> bool:
    try:
        from app.workflows.engine import execution_started
    except ImportError:
        # The workflows capability is not installed.
        return False
    return await execution_started(await ctx.client(), execution_id)


async def _require_stream_target(ctx: ToolContext, kind: str, stream_id: str) -> None:
    """Raise not_found unless the sandbox or workflow execution exists or
    has output."""
    if await asyncio.to_thread(stream_target_exists, ctx.database_url, kind, stream_id):
        return
    if kind == "workflow" and await _execution_started(ctx, stream_id):
        return
    if kind == "sandbox":
        hint = "sandbox_list shows the sandboxes; sandbox_create makes one"
        target = f"sandbox {stream_id!r}"
    else:
        hint = (
            "workflow_status shows a workflow's executions; workflow_execute "
            "starts one and returns its execution_id"
        )
        target = f"workflow execution {stream_id!r}"
    field = "sandbox_id" if kind == "sandbox" else "execution_id"
    raise ToolError(f"{field}: {target} not found; {hint}", kind="not_found")


@tool("execution_stream_subscribe", group="realtime")
async def execution_stream_subscribe(
    ctx: ToolContext, args: ExecutionStreamSubscribeInput
) -> SubscriptionInfo:
    """Subscribe to the live output of an existing sandbox (sandbox_id) or
    workflow execution (execution_id), from its first chunk. Read chunks with
    realtime_events; each event's `new` has stream (stdout, stderr, or an
    event label such as start, exit, step), text and final. The run must
    exist (sandbox_list, workflow_status list them) or have output."""
    kind, stream_id = args.target()
    check_stream(ctx, kind, "sandbox_id" if kind == "sandbox" else "execution_id")
    await _require_stream_target(ctx, kind, stream_id)
    quoted = stream_id.replace("\\", "\\\\").replace('"', '\\"')
    try:
        created = await asyncio.to_thread(
            create_subscription,
            ctx.database_url,
            "execution_output",
            event="INSERT",
            filter_text=f'stream_kind=eq.{kind},stream_id=eq."{quoted}"',
            user_id=ctx.user_id,
            key_id=ctx.key_id,
            stream_kind=kind,
            stream_id=stream_id,
            from_start=True,
        )
    except SubscriptionError as error:
        raise ToolError(str(error), kind="invalid_argument") from None
    described = await _described(ctx, created)
    missed = await asyncio.to_thread(
        pruned_output_chunks, ctx.database_url, kind, stream_id
    )
    return described.model_copy(update={"missed_chunks": missed})


class ExecutionStreamStatusInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    subscription_id: str | None = None
    sandbox_id: str | None = None
    execution_id: str | None = Field(
        None,
        validation_alias=AliasChoices("execution_id", "workflow_id"),
        description="A workflow execution's id (also accepted as workflow_id).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> ExecutionStreamStatusInput:
        given = [self.subscription_id, self.sandbox_id, self.execution_id]
        if sum(value is not None for value in given) != 1:
            raise arguments_error(
                "pass exactly one of subscription_id, sandbox_id and execution_id",
                "subscription_id",
                "sandbox_id",
                "execution_id",
            )
        return self


class ExecutionStreamStatusResult(BaseModel):
    stream_kind: str
    stream_id: str
    chunks: int
    characters: int
    finished: bool
    last_output_at: UtcDateTime | None
    last_chunk: str | None
    subscriptions: list[SubscriptionInfo]


@tool("execution_stream_status", group="realtime")
async def execution_stream_status(
    ctx: ToolContext, args: ExecutionStreamStatusInput
) -> ExecutionStreamStatusResult:
    """Report an output stream: chunks and characters so far, whether it is
    finished, its last chunk, and the subscriptions reading it with their lag
    (chunks of this run after the subscription's cursor). A stream is
    finished when its newest chunk is final, so when the run ended, or for a
    sandbox when its latest execution ended. The run must exist or have
    output."""
    if args.subscription_id is not None:
        info = await _readable(ctx, args.subscription_id)
        if info.stream_kind is None or info.stream_id is None:
            raise ToolError(
                f"subscription {args.subscription_id!r} is a table subscription, "
                "not an execution stream; use realtime_list for it",
                kind="invalid_argument",
            )
        kind, stream_id = info.stream_kind, info.stream_id
    elif args.sandbox_id is not None:
        kind, stream_id = "sandbox", args.sandbox_id
    else:
        assert args.execution_id is not None
        kind, stream_id = "workflow", args.execution_id
    field = (
        "subscription_id"
        if args.subscription_id is not None
        else ("sandbox_id" if kind == "sandbox" else "execution_id")
    )
    check_stream(ctx, kind, field)
    if args.subscription_id is None:
        await _require_stream_target(ctx, kind, stream_id)
    status = await asyncio.to_thread(output_status, ctx.database_url, kind, stream_id)
    subscriptions = [
        sub
        for sub in await asyncio.to_thread(list_subscriptions, ctx.database_url)
        if sub.stream_kind == kind and sub.stream_id == stream_id and owns(ctx, sub)
    ]
    return ExecutionStreamStatusResult(
        stream_kind=kind, stream_id=stream_id, subscriptions=subscriptions, **status
    )
