"""The realtime router served by a real uvicorn server on 127.0.0.1, and an
SSE client that reads a stream message by message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from app.realtime.http import build_realtime_router
from app.settings import Settings
from tests.support.servers import ThreadedServer, free_port


class RealtimeServer(ThreadedServer):
    """uvicorn serving the realtime router in a background thread."""

    def __init__(self, settings: Settings) -> None:
        app = FastAPI()
        app.include_router(build_realtime_router(settings))
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        super().__init__(app, self.port)

    def __enter__(self) -> RealtimeServer:
        super().__enter__()
        return self

    def stream_path(self, subscription_id: str) -> str:
        return f"/realtime/v1/subscriptions/{subscription_id}/stream"

    async def wait_idle(self) -> None:
        """Wait until the server runs no request, so a closed stream has ended
        on the server too (its subscriber closed)."""
        while self.server.server_state.tasks:
            await asyncio.sleep(0.02)


@dataclass
class Message:
    event: str
    id: int | None
    data: Any
    comment: bool = False


@dataclass
class SseReader:
    """Reads one SSE response message by message."""

    response: httpx.Response
    _lines: AsyncIterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    async def next(self) -> Message | None:
        """Return the next message, or None at the end of the stream."""
        fields: dict[str, str] = {}
        comment = False
        async for line in self._lines:
            if line == "":
                if fields or comment:
                    return Message(
                        event=fields.get("event", "message"),
                        id=int(fields["id"]) if "id" in fields else None,
                        data=json.loads(fields["data"]) if "data" in fields else None,
                        comment=comment and not fields,
                    )
                continue
            if line.startswith(":"):
                comment = True
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        return None

    async def next_batch(self) -> Message:
        """Return the next `changes` message, skipping comments."""
        while True:
            message = await self.next()
            assert message is not None, "the stream ended before a batch"
            if message.event == "changes":
                return message
            assert message.comment, f"unexpected message {message}"
