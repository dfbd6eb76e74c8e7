"""Delivery: wake-ups (LISTEN/NOTIFY on PostgreSQL, polling and in-process
signals on SQLite), the bounded async subscriber, and `next_events`."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.db import get_engine
from app.jsonsafe import encodable
from app.realtime.service import (
    Matcher,
    SubscriptionNotFound,
    advance_cursor,
    get_subscription,
    read_ticket,
    save_cursor,
    scan,
    stored_matcher,
    subscription_exists,
)
from app.realtime.triggers import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

# How often SQLite subscribers look at the log for changes made by other
# processes; changes made in this process wake them at once.
SQLITE_POLL_SECONDS = 0.05
_RETRY_SECONDS = (0.1, 0.2, 0.5, 1.0, 2.0)
# Minimum seconds between two cursor writes of one subscriber while it streams.
CURSOR_SAVE_INTERVAL = 0.1
# Seconds between two checks that a subscriber's subscription still exists,
# so that a deletion by another process ends it. A deletion in this process
# ends it at once (`close_streams`).
SUBSCRIPTION_CHECK_SECONDS = 1.0
# Minimum seconds between two wake-ups by PostgreSQL notifications: a
# notification that comes sooner after the last wake-up is held until then,
# together with any that follow it. See `_SharedListener`.
NOTIFY_COALESCE_SECONDS = 0.02


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; return whether set.

    `asyncio.timeout` rather than `asyncio.wait_for`, because on Python 3.11
    `wait_for` can swallow a cancellation that arrives as the event is set.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def libpq_conninfo(url: str) -> str:
    parsed = make_url(url)
    return psycopg.conninfo.make_conninfo(
        host=parsed.host or "",
        port=str(parsed.port or ""),
        user=parsed.username or "",
        password=parsed.password or "",
        dbname=parsed.database or "",
    )


class _LocalCommits:
    """Wakes waiters of a SQLite database when this process commits to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]]
        self._waiters = {}
        self._hooked: set[str] = set()

    def add(
        self, url: str, loop: asyncio.AbstractEventLoop, wake: asyncio.Event
    ) -> None:
        with self._lock:
            if url not in self._hooked:
                event.listen(get_engine(url), "commit", lambda _c: self._signal(url))
                self._hooked.add(url)
            self._waiters.setdefault(url, set()).add((loop, wake))

    def remove(
        self, url: str, loop: asyncio.AbstractEventLoop, wake: asyncio.Event
    ) -> None:
        with self._lock:
            self._waiters.get(url, set()).discard((loop, wake))

    def _signal(self, url: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(url, ()))
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(wake.set)


_local_commits = _LocalCommits()


class _SharedListener:
    """One LISTEN connection per database and event loop, waking every
    waiter of that database: a notification then costs the server one
    delivery, not one per subscriber."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.wakes: set[asyncio.Event] = set()
        self.task: asyncio.Task[None] | None = None
        self._last_wake = float("-inf")
        self._held_wake: asyncio.TimerHandle | None = None

    def wake_all(self) -> None:
        if self._held_wake is not None:
            self._held_wake.cancel()
            self._held_wake = None
        self._last_wake = asyncio.get_running_loop().time()
        for wake in self.wakes:
            wake.set()

    def notified(self) -> None:
        """Wake every waiter, or, within `NOTIFY_COALESCE_SECONDS` of the
        last wake-up, once that interval has passed.

        Under a stream of commits each wake-up starts a read of the log by
        every subscriber, and with one wake-up per commit the subscribers'
        process spent its CPU on reads of a few rows each, beside the
        inserting clients. A change after a quiet spell is still read at once.
        """
        if self._held_wake is not None:
            return
        loop = asyncio.get_running_loop()
        due = self._last_wake + NOTIFY_COALESCE_SECONDS
        if loop.time() >= due:
            self.wake_all()
        else:
            self._held_wake = loop.call_at(due, self.wake_all)

    def stop(self) -> None:
        if self._held_wake is not None:
            self._held_wake.cancel()
            self._held_wake = None

    async def listen(self) -> None:
        attempt = 0
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    libpq_conninfo(self.url), autocommit=True
                )
                async with connection:
                    await connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if attempt:
                        logger.info("realtime listener reconnected to PostgreSQL")
                    attempt = 0
                    # Changes committed while disconnected sent no notification.
                    self.wake_all()
                    async for _notification in connection.notifies():
                        self.notified()
            except psycopg.OperationalError as error:
                delay = _RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)]
                attempt += 1
                logger.warning(
                    "realtime listener lost PostgreSQL (%s); retry %d in %.1f s",
                    error,
                    attempt,
                    delay,
                )
                self.wake_all()
                await asyncio.sleep(delay)


_listeners: dict[tuple[asyncio.AbstractEventLoop, str], _SharedListener] = {}


async def _join_listener(url: str, wake: asyncio.Event) -> None:
    key = (asyncio.get_running_loop(), url)
    listener = _listeners.get(key)
    if listener is None:
        listener = _listeners[key] = _SharedListener(url)
    listener.wakes.add(wake)
    if listener.task is None:
        listener.task = asyncio.create_task(listener.listen())


async def _leave_listener(url: str, wake: asyncio.Event) -> None:
    key = (asyncio.get_running_loop(), url)
    listener = _listeners.get(key)
    if listener is None:
        return
    listener.wakes.discard(wake)
    if listener.wakes or listener.task is None:
        return
    del _listeners[key]
    listener.stop()
    listener.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener.task


class ChangeWaiter:
    """Wait for "the change log may have grown", never for a specific change:
    the reader always re-reads the log after a wake-up or a timeout, so a lost
    notification costs latency, never an event."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._wake = asyncio.Event()
        self._postgresql = is_postgresql(url)
        self._started = False

    async def start(self) -> None:
        self._started = True
        if self._postgresql:
            await _join_listener(self.url, self._wake)
        else:
            _local_commits.add(self.url, asyncio.get_running_loop(), self._wake)

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._postgresql:
            await _leave_listener(self.url, self._wake)
        else:
            _local_commits.remove(self.url, asyncio.get_running_loop(), self._wake)

    def clear(self) -> None:
        """Forget earlier wake-ups; call before reading the log."""
        self._wake.clear()

    def wake(self) -> None:
        """End the current or next `wait` at once."""
        self._wake.set()

    async def wait(self, timeout: float) -> None:
        if not self._postgresql:
            timeout = min(timeout, SQLITE_POLL_SECONDS)
        await wait_event(self._wake, timeout)


class SubscriptionClosed(Exception):
    """The subscription was deleted while a stream was reading it."""


class Subscriber:
    """Async reader of one subscription with a bounded buffer.

    A background task reads the change log after the cursor into a buffer of
    at most `max_buffer_size` events and stops reading while the buffer is
    full. A slow consumer therefore uses memory for at most that many
    events, and the rest waits in the change log. `batches()` yields up to
    `batch_size` events as soon as any are buffered.

    Requesting the next batch acknowledges the previous one: its cursor is
    then stored (coalesced, in the background), and on a normal close. A
    close on an exception (the consumer failed, or was cancelled) does not
    store the batch it was handling, so the next reader gets it again. With
    `store_cursor=False` the caller stores the cursor instead; with
    `store_skipped=True` as well, the subscriber still stores it past
    changes that did not match, until it gives out its first event, which
    loses nothing and lets pruning proceed.

    Deleting the subscription ends `batches()` with `SubscriptionClosed`: at
    once when `close_streams` is called in this process (as
    `realtime_unsubscribe` does), otherwise within
    `SUBSCRIPTION_CHECK_SECONDS`.

    Example:
        async with Subscriber(url, subscription_id) as subscriber:
            async for batch in subscriber.batches():
                ...
    """

    def __init__(
        self,
        url: str,
        subscription_id: str,
        *,
        start_after: int | None = None,
        batch_size: int | None = None,
        buffer_timeout_ms: int | None = None,
        max_buffer_size: int | None = None,
        store_cursor: bool = True,
        store_skipped: bool = False,
    ) -> None:
        self.url = url
        self._store = store_cursor
        self._store_skipped = store_skipped
        self._gave_events = False
        self._deleted = False
        self._next_check = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.subscription_id = subscription_id
        self._start_after = start_after
        self._batch_size = batch_size
        self._buffer_timeout_ms = buffer_timeout_ms
        self._max_buffer_size = max_buffer_size
        self._buffer: deque[dict[str, Any]] = deque()
        self._space = asyncio.Event()
        self._data = asyncio.Event()
        self._waiter = ChangeWaiter(url)
        self._reader: asyncio.Task[None] | None = None
        self._scanned = 0
        self._acked = 0
        # Cursor and event ids of the batch given out last, not yet acked.
        self._pending: tuple[int, list[int]] | None = None
        self._reader_error: BaseException | None = None
        self._closing = False
        self._saver: asyncio.Task[None] | None = None
        self._save_now = asyncio.Event()
        self._unsaved: tuple[int, list[int]] = (0, [])
        self._saved = 0
        self.max_buffered = 0

    @property
    def cursor(self) -> int:
        """Id of the last change whose event this consumer was given."""
        return self._acked if self._pending is None else self._pending[0]

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def __aenter__(self) -> Subscriber:
        info = await asyncio.to_thread(get_subscription, self.url, self.subscription_id)
        self.table = info.table
        self.batch_size = self._batch_size or info.batch_size
        self.buffer_timeout = (self._buffer_timeout_ms or info.buffer_timeout) / 1000
        self.max_buffer_size = self._max_buffer_size or info.max_buffer_size
        self.matcher: Matcher = await asyncio.to_thread(stored_matcher, self.url, info)
        start = info.cursor if self._start_after is None else self._start_after
        self._scanned = self._acked = self._saved = start
        self._unsaved = (start, [])
        self._loop = asyncio.get_running_loop()
        self._next_check = self._loop.time() + SUBSCRIPTION_CHECK_SECONDS
        with _open_lock:
            _open.setdefault(self.subscription_id, set()).add(self)
        await self._waiter.start()
        self._reader = asyncio.create_task(self._read_loop())
        logger.info("subscriber %s started at cursor %d", self.subscription_id, start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close(store_pending=exc_type is None)

    async def close(self, *, store_pending: bool = True) -> None:
        """Stop reading and store the cursor acknowledged so far.

        Args:
            store_pending: also store the batch given out last, which its
                consumer has not acknowledged by asking for the next one.
        """
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self._waiter.close()
        with _open_lock:
            streams = _open.get(self.subscription_id, set())
            streams.discard(self)
            if not streams:
                _open.pop(self.subscription_id, None)
        if not store_pending or self._deleted:
            self._pending = None
        with contextlib.suppress(SubscriptionClosed):
            await self.ack(wait=False)
            self._save_now.set()
            if self._saver is not None:
                await self._saver
        logger.info(
            "subscriber %s stopped at cursor %d", self.subscription_id, self.cursor
        )

    async def ack(self, *, wait: bool = True) -> None:
        """Store the cursor of the batches given out so far.

        With `wait=False` the write happens in the background, and writes in
        flight coalesce into one, so a consumer does not wait on a database
        commit between batches. `close()` waits for the last write.
        """
        if self._pending is None:
            return
        cursor, ids = self._pending
        self._pending = None
        self._acked = cursor
        if not self._store and not (self._store_skipped and not self._gave_events):
            return
        self._unsaved = (cursor, self._unsaved[1] + ids)
        if self._saver is None or self._saver.done():
            self._save_now.clear()
            self._saver = asyncio.create_task(self._save_unsaved())
        if wait or self._closing:
            self._save_now.set()
        if wait:
            await self._saver

    async def _save_unsaved(self) -> None:
        while self._unsaved[0] > self._saved:
            cursor, ids = self._unsaved
            self._unsaved = (cursor, [])
            await self._store_cursor(cursor, ids)
            self._saved = cursor
            # A fast stream acks many batches a second; one write per
            # interval carries them all. A waiting ack or close() cuts the
            # pause short, so the last cursor is written at once.
            await wait_event(self._save_now, CURSOR_SAVE_INTERVAL)

    async def _store_cursor(self, cursor: int, ids: list[int]) -> None:
        def counted(stored: int) -> int:
            # Only events past the stored cursor are new deliveries; a
            # subscriber started before it re-delivers the others.
            return len(ids) - bisect.bisect_right(ids, stored)

        attempt = 0
        while True:
            try:
                stored = await asyncio.to_thread(
                    advance_cursor, self.url, self.subscription_id, cursor, counted
                )
                break
            except DBAPIError as error:
                delay = _RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)]
                attempt += 1
                logger.warning(
                    "storing cursor %d of %s failed (%s); retry in %.1f s",
                    cursor,
                    self.subscription_id,
                    error.orig or error,
                    delay,
                )
                await asyncio.sleep(delay)
        if not stored:
            self._mark_deleted()
            raise SubscriptionClosed(
                f"subscription {self.subscription_id!r} was deleted"
            )

    def _mark_deleted(self) -> None:
        """Note that the subscription is gone and wake the consumer."""
        self._deleted = True
        self._data.set()

    def _check_closed(self) -> None:
        if self._saver is not None and self._saver.done():
            self._saver.result()  # raises SubscriptionClosed
        if self._deleted:
            raise SubscriptionClosed(
                f"subscription {self.subscription_id!r} was deleted"
            )

    async def _still_subscribed(self) -> bool:
        assert self._loop is not None
        self._next_check = self._loop.time() + SUBSCRIPTION_CHECK_SECONDS
        try:
            return await asyncio.to_thread(
                subscription_exists, self.url, self.subscription_id
            )
        except DBAPIError as error:
            # Unknown for now, so the next check queries again.
            logger.warning(
                "checking subscription %s failed (%s)",
                self.subscription_id,
                error.orig or error,
            )
            return True

    async def _read_loop(self) -> None:
        attempt = 0
        assert self._loop is not None
        try:
            while not self._closing:
                due = self._loop.time() >= self._next_check
                if due and not await self._still_subscribed():
                    logger.info(
                        "subscription %s was deleted; its stream ends",
                        self.subscription_id,
                    )
                    self._mark_deleted()
                    return
                self._waiter.clear()
                try:
                    # Taken here on the event loop, before the worker thread
                    # starts, so that the subscribers one notification woke
                    # share a single read of the log.
                    ticket = read_ticket(self.url, self.table)
                    result = await asyncio.to_thread(
                        scan,
                        self.url,
                        self.table,
                        self.matcher,
                        self._scanned,
                        None,
                        ticket,
                    )
                    attempt = 0
                except DBAPIError as error:
                    delay = _RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)]
                    attempt += 1
                    logger.warning(
                        "reading changes for %s failed (%s); retry in %.1f s",
                        self.subscription_id,
                        error.orig or error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                events, start = result.events, 0
                while start < len(events):
                    room = self.max_buffer_size - len(self._buffer)
                    if room <= 0:
                        self._space.clear()
                        await self._space.wait()
                        continue
                    self._buffer.extend(events[start : start + room])
                    start += room
                    self.max_buffered = max(self.max_buffered, len(self._buffer))
                    self._data.set()
                self._scanned = result.cursor
                self._data.set()
                if result.exhausted:
                    until_check = self._next_check - self._loop.time()
                    await self._waiter.wait(
                        max(0.0, min(self.buffer_timeout, until_check))
                    )
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            logger.exception("subscriber %s reader failed", self.subscription_id)
            self._reader_error = error
            self._data.set()

    async def batches(
        self, *, idle: bool = False
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Yield batches of events in change order, until the stream closes.

        Args:
            idle: also yield an empty batch after `buffer_timeout` without
                events, so that the consumer can send a keep-alive.

        Raises:
            SubscriptionClosed: the subscription was deleted.
        """
        loop = asyncio.get_running_loop()
        while True:
            await self.ack(wait=False)
            self._check_closed()
            deadline = loop.time() + self.buffer_timeout
            while not self._buffer:
                self._check_closed()
                if self._reader_error is not None:
                    raise self._reader_error
                self._data.clear()
                if not self._buffer and self._scanned > self.cursor:
                    # Nothing matched, but the cursor may pass what was read.
                    self._pending = (self._scanned, [])
                    await self.ack(wait=False)
                remaining = deadline - loop.time()
                if idle and remaining <= 0:
                    break
                await wait_event(self._data, remaining if idle else self.buffer_timeout)
            self._check_closed()
            if not self._buffer:
                yield []
                continue
            count = min(self.batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(count)]
            self._space.set()
            cursor = (
                batch[-1]["id"] if self._buffer else max(self._scanned, batch[-1]["id"])
            )
            self._pending = (cursor, [payload["id"] for payload in batch])
            self._gave_events = True
            yield batch

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield events one at a time (batches flattened)."""
        async for batch in self.batches():
            for payload in batch:
                yield payload


class _EventsWait:
    """A `next_events` call of this process that waits for changes, so that
    `close_streams` can end its wait as it ends a `Subscriber`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop: asyncio.AbstractEventLoop | None = loop
        self.deleted = False
        self.waiter: ChangeWaiter | None = None

    def _mark_deleted(self) -> None:
        self.deleted = True
        if self.waiter is not None:
            self.waiter.wake()


_open: dict[str, set[Subscriber | _EventsWait]] = {}
_open_lock = threading.Lock()


def close_streams(subscription_id: str) -> int:
    """End this process's open subscribers of a deleted subscription at once:
    each raises `SubscriptionClosed` instead of giving out another batch, and
    a waiting `next_events` raises `SubscriptionNotFound`. Safe to call from
    any thread or event loop. Returns how many were notified.
    """
    with _open_lock:
        subscribers = list(_open.get(subscription_id, ()))
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for subscriber in subscribers:
        loop = subscriber._loop
        if loop is None:
            continue
        if loop is current:
            subscriber._mark_deleted()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(subscriber._mark_deleted)
    return len(subscribers)


def _deleted_while_waiting(subscription_id: str) -> SubscriptionNotFound:
    return SubscriptionNotFound(
        f"subscription {subscription_id!r} was deleted while realtime_events "
        "waited for changes; create a new one with realtime_subscribe"
    )


async def next_events(
    url: str, subscription_id: str, limit: int = 100, wait_ms: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Return the next matching events after the subscription's cursor and
    advance the cursor past them, waiting up to `wait_ms` for the first one.

    The events are made encodable (`app.jsonsafe.encodable`) before the
    cursor moves, so no encoder can fail on a batch the cursor has passed.
    A deletion ends the wait: at once through `close_streams` in this
    process, otherwise within `SUBSCRIPTION_CHECK_SECONDS`.

    Raises:
        SubscriptionNotFound: the subscription does not exist, or was deleted
            during the wait.
    """
    info = await asyncio.to_thread(get_subscription, url, subscription_id)
    matcher = await asyncio.to_thread(stored_matcher, url, info)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_ms / 1000
    next_check = loop.time() + SUBSCRIPTION_CHECK_SECONDS
    waiter: ChangeWaiter | None = None
    watch = _EventsWait(loop)
    cursor = info.cursor
    with _open_lock:
        _open.setdefault(subscription_id, set()).add(watch)
    try:
        while True:
            if waiter is not None:
                waiter.clear()
            if watch.deleted:
                raise _deleted_while_waiting(subscription_id)
            result = await asyncio.to_thread(
                scan, url, info.table, matcher, cursor, limit
            )
            events = encodable(result.events)
            if result.cursor != cursor:
                stored = await asyncio.to_thread(
                    save_cursor,
                    url,
                    subscription_id,
                    result.cursor,
                    len(events),
                    expected=cursor,
                )
                if not stored:
                    # Another reader moved the cursor: read again from there.
                    info = await asyncio.to_thread(
                        get_subscription, url, subscription_id
                    )
                    cursor = info.cursor
                    continue
                cursor = result.cursor
            remaining = deadline - loop.time()
            if events or remaining <= 0:
                return events, cursor
            if waiter is None:
                waiter = watch.waiter = ChangeWaiter(url)
                await waiter.start()
                continue
            if loop.time() >= next_check:
                next_check = loop.time() + SUBSCRIPTION_CHECK_SECONDS
                exists = await asyncio.to_thread(
                    subscription_exists, url, subscription_id
                )
                if not exists:  # deleted by another process
                    raise _deleted_while_waiting(subscription_id)
            await waiter.wait(min(remaining, max(0.0, next_check - loop.time())))
    finally:
        with _open_lock:
            waits = _open.get(subscription_id, set())
            waits.discard(watch)
            if not waits:
                _open.pop(subscription_id, None)
        if waiter is not None:
            await waiter.close()


__all__ = [
    "ChangeWaiter",
    "Subscriber",
    "SubscriptionClosed",
    "SubscriptionNotFound",
    "close_streams",
    "next_events",
]
