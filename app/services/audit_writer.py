"""Audit events queued in memory and written in batches by one background task.

A long-running server (the HTTP API) submits each call's event and waits
for the commit that covers it. One task writes every event queued so far in
one transaction, so under load a batch contains many events and a call
shares its database round trip with the calls beside it. Events are masked
when they are submitted, so a secret never waits in the queue. A batch
leaves the queue only after its transaction committed; a failed write is
retried, and `close` writes what is left before the server exits.

Worker processes install a writer with `queued_audit`, so that the tool
calls that run inside their activities (workflow steps, swarm actions) are
queued and retried too. Their queue has a maximum size: a worker whose
database is down for long drops new events once the queue is full, and logs
how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from app.contracts.system import AuditRecord
from app.db import get_engine
from app.logs import RepeatedFailureLog
from app.services.audit import audit_fields, insert_statement, list_calls

logger = logging.getLogger(__name__)

# How long a call's response waits for its audit event's commit (see
# `AuditWriter.committed`) while the database does not respond.
COMMIT_WAIT_SECONDS = 5.0
# Attempts at writing a batch once `close` was called, before the events
# are given up and logged as lost.
_CLOSE_ATTEMPTS = 3


def write_events(database_url: str, events: list[dict[str, Any]]) -> None:
    """Insert `events` (from `audit_fields`) in one transaction."""
    # One Core executemany, because the ORM's objects made a batch cost
    # 0.14-0.18 ms of CPU per event against 0.04 ms for Core (SQLite,
    # batches of 20, 2-core machine), and the HTTP server writes one event
    # per call.
    with get_engine(database_url).begin() as connection:
        connection.execute(insert_statement(), events)


def _database_responds(database_url: str) -> bool:
    try:
        with get_engine(database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return False
    return True


# The filters of an audit log query: limit, user_id and tool.
# limit, user_id, tool, the tools a group-limited key may see and its key id.
_ReadKey = tuple[int, str | None, str | None, tuple[str, ...] | None, str | None]
# A query that the writer runs right after a commit: its filters, and the
# events that must be committed first (those submitted before its calls).
_QueuedRead = tuple[_ReadKey, int]
_Rows = asyncio.Future[list[AuditRecord]]


@dataclass
class _SharedRead:
    """An audit log query that concurrent calls may share.

    Attributes:
        after: calls with a lower arrival number arrived before it started.
        written: events committed when it started.
    """

    after: int
    written: int
    task: asyncio.Task[list[AuditRecord]]


class AuditWriter:
    """Queue of audit events and the task that writes them in batches.

    Use it from one event loop. The task starts on the first `submit`.

    Args:
        database_url: the database that contains the audit log.
        max_batch: maximum number of events written in one transaction.
        retry_seconds: wait after a failed write before the next attempt.
        linger_seconds: how long the task waits for more events before it
            writes a batch, unless a `flush` or `close` waits for the write.
        max_pending: maximum number of events queued and not yet committed;
            None for no limit. A full queue drops each new event, and the
            writer logs how many it dropped.
    """

    def __init__(
        self,
        database_url: str,
        *,
        max_batch: int = 1000,
        retry_seconds: float = 0.5,
        linger_seconds: float = 0.01,
        max_pending: int | None = None,
    ) -> None:
        self.database_url = database_url
        self.max_batch = max_batch
        self.retry_seconds = retry_seconds
        self.linger_seconds = linger_seconds
        self.max_pending = max_pending
        # Events dropped because the queue was full, not yet logged.
        self.dropped = 0
        self._write_failures = RepeatedFailureLog(
            logger, "the write of queued audit events"
        )
        self._flush_waiters = 0
        self._urgent = asyncio.Event()
        self._pending: list[dict[str, Any]] = []
        self._submitted = 0
        self._written = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._arrivals = itertools.count()
        self._reads: dict[_ReadKey, _SharedRead] = {}
        # Keyed by the target too, so that a later call with a higher target
        # does not hold back the calls queued before it.
        self._reads_after_write: dict[_QueuedRead, _Rows] = {}

    @property
    def pending(self) -> int:
        """Events submitted but not yet committed."""
        return len(self._pending)

    def submit(self, **fields: Any) -> None:
        """Queue one event; takes the keyword arguments of `audit_fields`.

        After `close`, the event is written at once, because no task is left
        to write it.
        """
        event = audit_fields(**fields)
        if self._closed:
            write_events(self.database_url, [event])
            return
        if self.max_pending is not None and len(self._pending) >= self.max_pending:
            # The newest event is dropped, because the oldest ones may be in
            # the batch that is being written.
            if not self.dropped:
                logger.error(
                    "the audit queue is full with %d events that the database "
                    "did not take; dropping new audit events, starting with "
                    "the event of tool %r by %r, until a write succeeds",
                    len(self._pending),
                    event["tool"],
                    event["user_id"],
                )
            self.dropped += 1
            return
        self._pending.append(event)
        self._submitted += 1
        self._start()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every event submitted before this call is committed."""
        target = self._submitted
        if self._written >= target:
            return
        self._start()
        self._wake.set()
        self._urgent.set()
        self._flush_waiters += 1
        try:
            async with self._progress:
                await self._progress.wait_for(lambda: self._written >= target)
        finally:
            self._flush_waiters -= 1

    async def committed(self, timeout: float = COMMIT_WAIT_SECONDS) -> bool:
        """Wait until every event submitted so far is committed, for at most
        `timeout` seconds; return whether it was.

        A call's response waits for this, so that a call that got its response
        has its audit row even if the server is killed right after. Waiting
        calls share commits: the writer writes at once, without lingering,
        and a commit covers every event queued before it.
        """
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            logger.warning(
                "audit events not committed within %g s; returning the call's result "
                "anyway, the writer keeps retrying",
                timeout,
            )
            return False
        return True

    async def list_calls(
        self,
        *,
        limit: int,
        user_id: str | None,
        tool: str | None,
        visible_tools: tuple[str, ...] | None = None,
        own_key_id: str | None = None,
    ) -> list[AuditRecord]:
        """Return the newest audit events, including every event submitted
        before this call.

        Concurrent calls with the same filters share one query. A call joins
        a query only if the query started after the call arrived and after
        the call's events were committed, so the shared result is one that
        the call's own query could have returned.
        """
        arrival = next(self._arrivals)
        target = self._submitted
        key = (limit, user_id, tool, visible_tools, own_key_id)
        if self._written < target and not self._closed:
            return await self._read_after_write(key, target)
        await self.flush()
        shared = self._reads.get(key)
        if shared is None or shared.after < arrival or shared.written < target:
            read = functools.partial(_list_by_key, self.database_url, key)
            shared = _SharedRead(
                # Calls with a lower arrival number arrived before this query.
                after=next(self._arrivals),
                written=self._written,
                task=asyncio.get_running_loop().create_task(asyncio.to_thread(read)),
            )
            self._reads[key] = shared
            shared.task.add_done_callback(
                functools.partial(self._forget_read, key, shared)
            )
        # A caller that is cancelled must not cancel the query that others
        # wait for.
        return await asyncio.shield(shared.task)

    async def _read_after_write(self, key: _ReadKey, target: int) -> list[AuditRecord]:
        """Wait for the commit that covers `target` and the query the writer
        runs right after it. One thread call then does both, where a flush
        followed by a query took two."""
        # The query has not started (it leaves this dict when it does), so
        # it starts after this call arrived.
        future = self._reads_after_write.get((key, target))
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._reads_after_write[(key, target)] = future
        self._start()
        self._wake.set()
        self._urgent.set()
        # A caller that is cancelled must not cancel the query that others
        # wait for.
        return await asyncio.shield(future)

    def _take_reads(self, committed: int) -> dict[_QueuedRead, _Rows]:
        """Remove and return the queued queries whose calls wait for no more
        than `committed` events."""
        ready = {
            queued: future
            for queued, future in self._reads_after_write.items()
            if queued[1] <= committed
        }
        for queued in ready:
            del self._reads_after_write[queued]
        return ready

    def _write_and_read(
        self, batch: list[dict[str, Any]], reads: Iterable[_QueuedRead]
    ) -> dict[_ReadKey, list[AuditRecord] | Exception]:
        """Commit `batch` (if any), then run each distinct query of `reads`
        once. A failed query is returned as its exception, so the commit
        still counts."""
        if batch:
            write_events(self.database_url, batch)
        results: dict[_ReadKey, list[AuditRecord] | Exception] = {}
        for filters, _ in reads:
            if filters in results:
                continue
            try:
                results[filters] = _list_by_key(self.database_url, filters)
            except Exception as error:
                results[filters] = error
        return results

    async def _serve_reads(self) -> None:
        """Run, in one thread call, the queued queries that the events
        committed so far already satisfy (after a failed batch, when nothing
        is pending, or at the end)."""
        reads = self._take_reads(self._written)
        if reads:
            results = await asyncio.to_thread(self._write_and_read, [], list(reads))
            _settle_reads(reads, results)

    def _forget_read(
        self,
        key: _ReadKey,
        shared: _SharedRead,
        _: asyncio.Task[list[AuditRecord]],
    ) -> None:
        if self._reads.get(key) is shared:
            del self._reads[key]

    async def close(self) -> None:
        """Write every queued event and stop the task."""
        self._closed = True
        self._wake.set()
        self._urgent.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._pending:
            # Events queued while no task ran (submit outside a running loop).
            await asyncio.to_thread(write_events, self.database_url, self._pending)
            self._written += len(self._pending)
            self._pending = []
        await self._serve_reads()
        self._log_dropped()
        logger.info("audit writer stopped after %d events", self._written)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="audit-writer"
            )

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                if self._reads_after_write:
                    # Their events were in a batch that was being written
                    # when they were queued.
                    await self._serve_reads()
                    continue
                if self._closed:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            await self._linger()
            batch = self._pending[: self.max_batch]
            # Taken with the batch, so each query's calls arrived before it.
            reads = self._take_reads(self._written + len(batch))
            try:
                results = await asyncio.to_thread(
                    self._write_and_read, batch, list(reads)
                )
            except Exception:
                # The queries wait for a commit that covers them again.
                for queued, future in reads.items():
                    waiting = self._reads_after_write.setdefault(queued, future)
                    if waiting is not future:
                        _chain(future, waiting)
                failures += 1
                self._write_failures.failed()
                kept = await asyncio.to_thread(self._write_one_by_one, batch)
                self._pending[: len(batch)] = kept
                self._written += len(batch) - len(kept)
                async with self._progress:
                    self._progress.notify_all()
                await self._serve_reads()
                if not kept:
                    failures = 0
                    self._write_failures.succeeded()
                    self._log_dropped()
                    continue
                if self._closed and failures >= _CLOSE_ATTEMPTS:
                    logger.error(
                        "gave up on %d audit events at shutdown after %d attempts",
                        len(self._pending),
                        failures,
                    )
                    self._written += len(self._pending)
                    self._pending = []
                    async with self._progress:
                        self._progress.notify_all()
                    await self._serve_reads()
                    return
                await asyncio.sleep(self.retry_seconds)
                continue
            failures = 0
            self._write_failures.succeeded()
            self._log_dropped()
            # Only a committed batch leaves the queue, so none is lost when a
            # write fails.
            self._done(len(batch))
            _settle_reads(reads, results)
            async with self._progress:
                self._progress.notify_all()

    async def _linger(self) -> None:
        # Each transaction costs a thread hop and a commit. For 1000 events
        # submitted 2 ms apart, a 10 ms wait cut the transactions from about
        # 950 to about 200 and the CPU per event from 0.7-0.9 ms to 0.44 ms
        # (SQLite, loaded 2-core machine).
        if (
            self.linger_seconds <= 0
            or self._closed
            or self._flush_waiters
            or self._reads_after_write
            or len(self._pending) >= self.max_batch
        ):
            return
        self._urgent.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._urgent.wait(), self.linger_seconds)

    def _log_dropped(self) -> None:
        if self.dropped:
            logger.error(
                "dropped %d audit events because the audit queue was full "
                "(maximum %s events) while the database did not take writes",
                self.dropped,
                self.max_pending,
            )
            self.dropped = 0

    def _done(self, count: int) -> None:
        del self._pending[:count]
        self._written += count

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write each event of a failed batch alone, in order, until one stays
        queued; return it and the events after it.

        Stopping there keeps `_written` a count of the events at the head of
        the queue, which `flush` and the queued reads compare with.
        """
        for index, event in enumerate(batch):
            if not self._write_alone(event):
                return batch[index:]
        return []

    def _write_alone(self, event: dict[str, Any]) -> bool:
        """Write one event; return False when it stays queued.

        An event that fails twice while the database responds to queries (a
        value too long for its column) is logged and dropped, so that one
        event cannot stop the audit log. While the database does not respond,
        the event stays queued.
        """
        for _ in range(2):
            try:
                write_events(self.database_url, [event])
            except Exception:
                continue
            return True
        if not _database_responds(self.database_url):
            return False
        logger.error(
            "dropped the audit event of tool %r by %r: the database rejected it",
            event["tool"],
            event["user_id"],
        )
        return True


def _list_by_key(database_url: str, key: _ReadKey) -> list[AuditRecord]:
    limit, user_id, tool, visible_tools, own_key_id = key
    return list_calls(
        database_url,
        limit=limit,
        user_id=user_id,
        tool=tool,
        visible_tools=visible_tools,
        own_key_id=own_key_id,
    )


def _settle_reads(
    reads: dict[_QueuedRead, _Rows],
    results: dict[_ReadKey, list[AuditRecord] | Exception],
) -> None:
    """Give each queued query's future the rows or error of its filters,
    unless every caller left already."""
    for (filters, _), future in reads.items():
        if future.done():
            continue
        outcome = results[filters]
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _chain(source: _Rows, target: _Rows) -> None:
    """Settle `source` with the outcome of `target` when it has one."""

    def copy(done: _Rows) -> None:
        if source.done():
            return
        if done.cancelled():
            source.cancel()
        elif (error := done.exception()) is not None:
            source.set_exception(error)
        else:
            source.set_result(done.result())

    target.add_done_callback(copy)


# The writers that `queued_audit` installed, by event loop and database URL,
# each with the number of blocks that use it.
_installed: dict[tuple[asyncio.AbstractEventLoop, str], tuple[AuditWriter, int]] = {}


@contextlib.asynccontextmanager
async def queued_audit(database_url: str, **options: Any) -> AsyncIterator[AuditWriter]:
    """Queue the audit events of tool calls on this event loop that have no
    writer of their own (see `installed_writer`), and write what is left at
    the end of the block.

    A block inside another one for the same database uses the outer block's
    writer, which the outer block closes.

    Args:
        options: keyword arguments of `AuditWriter`, for the first block.
    """
    key = (asyncio.get_running_loop(), database_url)
    writer, users = _installed.get(key, (None, 0))
    if writer is None:
        writer = AuditWriter(database_url, **options)
    _installed[key] = (writer, users + 1)
    try:
        yield writer
    finally:
        writer, users = _installed.pop(key)
        if users > 1:
            _installed[key] = (writer, users - 1)
        else:
            await writer.close()


def installed_writer(database_url: str) -> AuditWriter | None:
    """Return the writer that `queued_audit` installed on the running event
    loop for `database_url`, or None."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    installed = _installed.get((loop, database_url))
    return None if installed is None else installed[0]
