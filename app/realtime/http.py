"""Server-Sent Events stream of a subscription and its acknowledgement route;
the HTTP server mounts them."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.contracts.realtime import SubscriptionInfo
from app.jsonsafe import InvalidJSONError, dumps, load_strict
from app.realtime.access import check_subscription
from app.realtime.service import (
    SubscriptionError,
    SubscriptionNotFound,
    confirm_cursor,
    get_subscription,
)
from app.realtime.stream import Subscriber, SubscriptionClosed
from app.settings import Settings
from app.tools.registry import ToolContext, ToolError

logger = logging.getLogger(__name__)


class AckBody(BaseModel):
    """Body of `POST /realtime/v1/subscriptions/{id}/ack`."""

    model_config = ConfigDict(extra="forbid")

    # Strict, so that true or "5" is rejected instead of read as a cursor.
    cursor: int = Field(
        ge=0,
        strict=True,
        description="The `id:` of the last batch the client has processed.",
    )


def build_realtime_router(settings: Settings) -> APIRouter:
    """Return a router serving `GET /realtime/v1/subscriptions/{id}/stream`
    and `POST /realtime/v1/subscriptions/{id}/ack`.

    Each SSE message is one batch: `event: changes`, `id:` the cursor after
    the batch, `data:` a JSON list of events. Writing a batch to the socket
    does not move the subscription's stored cursor; only the client's
    confirmation does: the `Last-Event-ID` it sends when it (re)connects, or
    an `ack` with the `id:` of a batch it has processed. A stream without
    `Last-Event-ID` starts at the stored cursor, so events the client never
    confirmed come again (at least once); with it, the stream starts right
    after that id (exactly once). A comment (`: keep-alive`) goes out after
    `buffer_timeout` without events, and `event: closed` when the
    subscription is deleted, which ends the stream. With
    `Accept-Encoding: gzip` and `gzip=true` the stream is gzip-compressed,
    flushed after every message.
    """
    router = APIRouter(tags=["realtime"])
    url = settings.effective_database_url

    async def owned(request: Request, subscription_id: str) -> SubscriptionInfo:
        """Return the caller's subscription; 404 for a missing one and for
        another caller's, which may not be read, confirmed or learned of."""
        try:
            info = await asyncio.to_thread(get_subscription, url, subscription_id)
        except SubscriptionNotFound as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        # Set by the API's key check; absent only where no key is required.
        principal = getattr(request.state, "principal", None)
        if principal is not None and info.key_id != principal.key_id:
            raise HTTPException(
                status_code=404,
                detail=f"subscription {subscription_id!r} not found; realtime_list "
                "shows your subscriptions",
            )
        if principal is not None:
            caller = ToolContext(
                settings,
                user_id=principal.user_id,
                key_id=principal.key_id,
                groups=principal.groups,
            )
            try:
                check_subscription(caller, info)
            except ToolError as error:
                raise HTTPException(status_code=403, detail=error.message) from None
        return info

    async def confirm(subscription_id: str, cursor: int, name: str) -> SubscriptionInfo:
        try:
            return await asyncio.to_thread(
                confirm_cursor, url, subscription_id, cursor, name=name
            )
        except SubscriptionNotFound as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        except SubscriptionError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @router.get(
        "/realtime/v1/subscriptions/{subscription_id}/stream",
        responses={
            400: {"description": "Last-Event-ID is not a change id of this log."},
            404: {"description": "The subscription does not exist."},
        },
    )
    async def stream_subscription(
        request: Request,
        subscription_id: str,
        gzip: bool = Query(False, description="Compress batches with gzip."),
        max_batches: int | None = Query(
            None, ge=1, description="Close the stream after this many batches."
        ),
        last_event_id: str | None = Header(None),
        accept_encoding: str = Header(""),
    ) -> StreamingResponse:
        await owned(request, subscription_id)
        start_after: int | None = None
        if last_event_id:
            if not last_event_id.isdigit():
                raise HTTPException(
                    status_code=400,
                    detail=f"Last-Event-ID {last_event_id!r} is not a change id; "
                    "send the `id:` of the last batch received, or no header",
                )
            start_after = int(last_event_id)
            # The client proves it received everything up to this id.
            await confirm(subscription_id, start_after, "Last-Event-ID")
        compress = gzip and "gzip" in accept_encoding.lower()
        # Set by the API's key check; absent only where no key is required.
        key_is_active = getattr(request.state, "key_is_active", None)
        body = _events(
            request, url, subscription_id, start_after, max_batches, key_is_active
        )
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if compress:
            headers["Content-Encoding"] = "gzip"
            body = _gzip(body)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    @router.post(
        "/realtime/v1/subscriptions/{subscription_id}/ack",
        responses={
            400: {"description": "The cursor is beyond the newest change."},
            404: {"description": "The subscription does not exist."},
            422: {"description": "The body is not JSON of the form {cursor: ID}."},
        },
        openapi_extra={"requestBody": _ACK_REQUEST_BODY},
    )
    async def acknowledge(subscription_id: str, request: Request) -> SubscriptionInfo:
        """Confirm every event up to `cursor`: the stored cursor moves there
        (never back), so a later stream without Last-Event-ID starts after
        it and pruning may delete what it passed."""
        body = await _read_ack_body(request)
        await owned(request, subscription_id)
        return await confirm(subscription_id, body.cursor, "cursor")

    return router


_ACK_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": AckBody.model_json_schema()}},
}


async def _read_ack_body(request: Request) -> AckBody:
    """Parse the ack body as strict JSON whatever its Content-Type, as the
    tool routes do: FastAPI reads a body model only from a JSON Content-Type,
    and its parser lets NaN and 1e400 through to an error it cannot encode.

    Raises:
        HTTPException: 422, the body is not strict JSON.
        RequestValidationError: the JSON is not an `AckBody`.
    """
    raw = await request.body()
    try:
        parsed = load_strict(raw) if raw.strip() else {}
    except InvalidJSONError as error:
        detail: dict[str, Any] = {"kind": "invalid_argument", "message": error.message}
        if error.field is not None:
            # Located under "body", as FastAPI locates a body model's errors.
            field = "body" if error.field == "(body)" else f"body.{error.field}"
            detail["errors"] = [
                {"field": field, "value": error.value, "message": error.problem}
            ]
        raise HTTPException(status_code=422, detail=detail) from None
    try:
        return AckBody.model_validate(parsed)
    except ValidationError as error:
        errors = [
            {**item, "loc": ("body", *item["loc"])}
            for item in error.errors(include_url=False, include_context=False)
        ]
        raise RequestValidationError(errors, body=parsed) from None


# Seconds between two checks that an open stream's API key is still valid.
KEY_CHECK_SECONDS = 1.0

_KEY_REVOKED_EVENT = (
    b"event: error\ndata: "
    + dumps(
        {
            "kind": "unauthorized",
            "message": "the API key of this stream was revoked or rotated; "
            "reconnect with an active key",
        }
    )
    + b"\n\n"
)


async def _until_key_inactive(key_is_active: Callable[[], Awaitable[bool]]) -> None:
    """Return once the stream's key is no longer valid, or its check failed."""
    while True:
        await asyncio.sleep(KEY_CHECK_SECONDS)
        try:
            if not await key_is_active():
                return
        except Exception:
            # Ends the stream as a rejected key would: an unchecked key
            # must not keep reading.
            logger.exception("could not check the API key of a realtime stream")
            return


async def _events(
    request: Request,
    url: str,
    subscription_id: str,
    start_after: int | None,
    max_batches: int | None,
    key_is_active: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[bytes]:
    sent = 0
    yield b": connected\n\n"
    # store_cursor=False: only the client's confirmation moves the cursor.
    subscriber = Subscriber(
        url,
        subscription_id,
        start_after=start_after,
        store_cursor=False,
        store_skipped=True,
    )
    key_check = (
        asyncio.create_task(_until_key_inactive(key_is_active))
        if key_is_active is not None
        else None
    )
    try:
        async with subscriber:
            batches = subscriber.batches(idle=True)
            while True:
                next_batch = asyncio.ensure_future(anext(batches))
                waited = {next_batch} if key_check is None else {next_batch, key_check}
                await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
                revoked = key_check is not None and key_check.done()
                if (
                    not revoked
                    and key_is_active is not None
                    and next_batch.exception() is None
                ):
                    # Checked before each batch too, so that a revocation in
                    # this process stops the very next batch.
                    revoked = not await key_is_active()
                if revoked:
                    # Nothing read after the revocation is sent.
                    next_batch.cancel()
                    await asyncio.wait({next_batch})
                    if not next_batch.cancelled():
                        next_batch.exception()  # retrieved, so never logged
                    logger.info(
                        "ended the stream of subscription %s: its API key is "
                        "no longer valid",
                        subscription_id,
                    )
                    yield _KEY_REVOKED_EVENT
                    return
                try:
                    batch = next_batch.result()
                except StopAsyncIteration:
                    return
                if not batch:
                    yield b": keep-alive\n\n"
                else:
                    # `dumps` writes a lone surrogate that a stored row may
                    # hold as U+FFFD and a non-finite number as null, so every
                    # client's JSON parser reads the batch.
                    data = dumps(batch).decode()
                    cursor = subscriber.cursor
                    yield f"id: {cursor}\nevent: changes\ndata: {data}\n\n".encode()
                    sent += 1
                    if max_batches is not None and sent >= max_batches:
                        return
                if await request.is_disconnected():
                    return
    except SubscriptionClosed:
        yield b"event: closed\ndata: {}\n\n"
    except SubscriptionNotFound:
        # Deleted between the request's check and the stream's start.
        yield b"event: closed\ndata: {}\n\n"
    finally:
        if key_check is not None:
            key_check.cancel()


async def _gzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    async for chunk in body:
        yield compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()
