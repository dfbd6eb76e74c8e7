"""Server-Sent Events stream of a subscription; the HTTP server mounts it."""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from app.realtime.service import SubscriptionNotFound, get_subscription
from app.realtime.stream import Subscriber, SubscriptionClosed
from app.settings import Settings

logger = logging.getLogger(__name__)


def build_realtime_router(settings: Settings) -> APIRouter:
    """Return a router serving `GET /realtime/v1/subscriptions/{id}/stream`.

    Each SSE message is one batch: `event: changes`, `id:` the cursor after
    the batch, `data:` a JSON list of events. A reconnecting client sends the
    last id as `Last-Event-ID` and resumes right after it; without one, the
    stream starts at the subscription's stored cursor. With
    `Accept-Encoding: gzip` and `gzip=true` the stream is gzip-compressed,
    flushed after every batch.
    """
    router = APIRouter(tags=["realtime"])
    url = settings.effective_database_url

    @router.get("/realtime/v1/subscriptions/{subscription_id}/stream")
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
        try:
            await asyncio.to_thread(get_subscription, url, subscription_id)
        except SubscriptionNotFound as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        start_after: int | None = None
        if last_event_id:
            if not last_event_id.isdigit():
                raise HTTPException(
                    status_code=400,
                    detail=f"Last-Event-ID {last_event_id!r} is not a change id",
                )
            start_after = int(last_event_id)
        compress = gzip and "gzip" in accept_encoding.lower()
        body = _events(request, url, subscription_id, start_after, max_batches)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if compress:
            headers["Content-Encoding"] = "gzip"
            body = _gzip(body)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    return router


async def _events(
    request: Request,
    url: str,
    subscription_id: str,
    start_after: int | None,
    max_batches: int | None,
) -> AsyncIterator[bytes]:
    sent = 0
    yield b": connected\n\n"
    async with Subscriber(url, subscription_id, start_after=start_after) as subscriber:
        try:
            async for batch in subscriber.batches():
                data = json.dumps(batch, separators=(",", ":"), default=str)
                cursor = subscriber.cursor
                yield f"id: {cursor}\nevent: changes\ndata: {data}\n\n".encode()
                sent += 1
                if max_batches is not None and sent >= max_batches:
                    await subscriber.ack()
                    return
                if await request.is_disconnected():
                    return
        except SubscriptionClosed:
            yield b"event: closed\ndata: {}\n\n"


async def _gzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    async for chunk in body:
        yield compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()
