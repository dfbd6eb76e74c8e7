"""Output streams of sandboxes and workflow executions, delivered through
realtime: producers append chunks to `execution_output`, whose changes
subscribers read like any other table's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from app.db import get_engine

logger = logging.getLogger(__name__)

StreamKind = Literal["sandbox", "workflow"]
STREAM_KINDS = ("sandbox", "workflow")


# The `stream` column's width (VARCHAR(20) on PostgreSQL).
MAX_STREAM_LABEL = 20
# A chunk's text is cut into rows of at most this many characters.
MAX_CHUNK_CHARS = 4096
# Seconds an `OutputWriter` waits after a chunk arrives with none buffered
# before it writes; MAX_CHUNK_CHARS buffered characters start a write at once.
FLUSH_INTERVAL = 0.5
# Seconds `OutputWriter.close` waits for the last write before it returns;
# the write itself goes on in its thread.
CLOSE_TIMEOUT = 2.0

# One thread writes the output of every run of this process, so batches
# commit in the order they were submitted, across runs too.
_write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-output")

_INSERT = text(
    "INSERT INTO execution_output (stream_kind, stream_id, stream, text, final, "
    "created_at) VALUES (:kind, :sid, :stream, :text, :final, :now)"
)


@dataclass(frozen=True)
class OutputChunk:
    """One row of a stream: `stream` labels it (stdout, stderr, start, ...)."""

    stream: str
    text: str
    final: bool = False


def _check_target(stream_kind: str, stream_id: str) -> None:
    if stream_kind not in STREAM_KINDS:
        raise ValueError(
            f"invalid stream kind {stream_kind!r}; use one of {', '.join(STREAM_KINDS)}"
        )
    if not stream_id:
        raise ValueError("stream_id is empty; pass the sandbox id or workflow id")


def _check_label(stream: str) -> None:
    if not stream or len(stream) > MAX_STREAM_LABEL:
        raise ValueError(
            f"invalid stream label {stream!r}; use 1 to {MAX_STREAM_LABEL} "
            "characters, such as stdout or stderr"
        )


def append_output(
    url: str,
    stream_kind: str,
    stream_id: str,
    text_chunk: str,
    *,
    stream: str = "stdout",
    final: bool = False,
) -> int:
    """Append one chunk of output and return its id.

    Args:
        stream_kind: "sandbox" or "workflow".
        stream_id: the sandbox id, or the execution id of a workflow execution.
        text_chunk: the output, as produced.
        stream: "stdout", "stderr" or another label of at most 20 characters.
        final: True on the last chunk, so subscribers know the run ended.

    Raises:
        ValueError: an unknown stream kind, an empty stream id or an invalid
            stream label.
    """
    _check_target(stream_kind, stream_id)
    _check_label(stream)
    with get_engine(url).begin() as connection:
        result = connection.execute(
            text(
                "INSERT INTO execution_output (stream_kind, stream_id, stream, text, "
                "final, created_at) VALUES (:kind, :sid, :stream, :text, :final, :now) "
                "RETURNING id"
            ),
            {
                "kind": stream_kind,
                "sid": stream_id,
                "stream": stream,
                "text": text_chunk,
                "final": final,
                "now": datetime.now(UTC),
            },
        )
        return int(result.scalar_one())


def insert_chunks(
    connection: Connection,
    stream_kind: str,
    stream_id: str,
    chunks: Sequence[OutputChunk],
) -> None:
    """Insert `chunks` in order inside the caller's transaction.

    Raises:
        ValueError: as `append_output`, before anything is inserted.
    """
    _check_target(stream_kind, stream_id)
    for chunk in chunks:
        _check_label(chunk.stream)
    if not chunks:
        return
    now = datetime.now(UTC)
    connection.execute(
        _INSERT,
        [
            {
                "kind": stream_kind,
                "sid": stream_id,
                "stream": chunk.stream,
                "text": chunk.text,
                "final": chunk.final,
                "now": now,
            }
            for chunk in chunks
        ],
    )


def append_chunks(
    url: str, stream_kind: str, stream_id: str, chunks: Sequence[OutputChunk]
) -> None:
    """Append `chunks` in order, in one transaction (see `insert_chunks`)."""
    with get_engine(url).begin() as connection:
        insert_chunks(connection, stream_kind, stream_id, chunks)


class OutputWriter:
    """Buffers the chunks of one run's output and appends them in batches.

    `add` and `add_event` only buffer, so they are cheap enough to call from
    an event loop callback. The process's writer thread writes the batches in
    the order they were submitted: FLUSH_INTERVAL seconds after a chunk
    arrives with none waiting, as soon as MAX_CHUNK_CHARS characters wait,
    and on `close`. A write in flight delays the next batch until it ends. A
    failed write is logged with the stream's ids, its chunks are dropped, and
    the error does not reach the run that produces the output.
    """

    def __init__(
        self,
        url: str,
        stream_kind: str,
        stream_id: str,
        *,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        _check_target(stream_kind, stream_id)
        self.url = url
        self.stream_kind = stream_kind
        self.stream_id = stream_id
        self.flush_interval = flush_interval
        self.failed_chunks = 0
        self._pending: list[OutputChunk] = []
        self._pending_chars = 0
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        self._closed = False
        # Labels that `add_event` used: their rows never take joined text.
        self._events: set[str] = set()

    def add(self, stream: str, text_chunk: str) -> None:
        """Buffer output text; consecutive text of one stream joins one row,
        and text beyond MAX_CHUNK_CHARS goes on in the next row."""
        self._check_open(stream)
        last = self._pending[-1] if self._pending else None
        if last is not None and last.stream == stream and not last.final:
            room = MAX_CHUNK_CHARS - len(last.text)
            if room > 0 and last.stream not in self._events:
                self._pending[-1] = OutputChunk(stream, last.text + text_chunk[:room])
                self._pending_chars += min(room, len(text_chunk))
                text_chunk = text_chunk[room:]
        while text_chunk:
            self._pending.append(OutputChunk(stream, text_chunk[:MAX_CHUNK_CHARS]))
            self._pending_chars += min(MAX_CHUNK_CHARS, len(text_chunk))
            text_chunk = text_chunk[MAX_CHUNK_CHARS:]
        self._schedule()

    def add_event(self, stream: str, text_chunk: str, *, final: bool = False) -> None:
        """Buffer a chunk that stays one row of its own, such as a JSON
        document; `final` marks the end of the run."""
        self._check_open(stream)
        self._events.add(stream)
        self._pending.append(OutputChunk(stream, text_chunk, final))
        self._pending_chars += len(text_chunk)
        self._schedule()

    def _check_open(self, stream: str) -> None:
        _check_label(stream)
        if self._closed:
            raise RuntimeError(
                f"output writer of {self.stream_kind} {self.stream_id} is closed"
            )

    def _schedule(self) -> None:
        if self._writing is not None or not self._pending:
            return  # a write in flight schedules the next one when it ends
        if self._pending_chars >= MAX_CHUNK_CHARS:
            self._start_write()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._writing is None and self._pending:
            self._start_write()

    def _start_write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_chars = self._pending, [], 0
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(_write_thread, self._append, batch)
        self._writing.add_done_callback(self._written)

    def _written(self, _future: asyncio.Future[None]) -> None:
        self._writing = None
        self._schedule()

    def _append(self, batch: list[OutputChunk]) -> None:
        try:
            append_chunks(self.url, self.stream_kind, self.stream_id, batch)
        except Exception as error:  # any failure: the run must go on
            if not self.failed_chunks:
                # Later failures of this run are counted, and `close` logs the
                # count once.
                logger.warning(
                    "writing %d output chunks of %s %s failed, so subscribers "
                    "miss them: %s: %s",
                    len(batch),
                    self.stream_kind,
                    self.stream_id,
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )
            self.failed_chunks += len(batch)

    async def close(self, timeout: float = CLOSE_TIMEOUT, wait: bool = True) -> None:
        """Write everything buffered, after the write in flight.

        With `wait`, return once it is written or after `timeout` seconds,
        whichever comes first. The write goes on in its thread either way, so
        the chunks land unless the process is killed first.
        """
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_chars = self._pending, [], 0
        loop = asyncio.get_running_loop()
        last = loop.run_in_executor(_write_thread, self._append_last, batch)
        if not wait:
            return
        try:
            await asyncio.wait_for(asyncio.shield(last), timeout)
        except TimeoutError:
            logger.warning(
                "output of %s %s is still being written after %.1f s; the "
                "call returns without waiting for it",
                self.stream_kind,
                self.stream_id,
                timeout,
            )

    def _append_last(self, batch: list[OutputChunk]) -> None:
        # After every earlier batch of this writer, as the thread is FIFO.
        if batch:
            self._append(batch)
        if self.failed_chunks:
            logger.warning(
                "%d output chunks of %s %s were not written",
                self.failed_chunks,
                self.stream_kind,
                self.stream_id,
            )


async def wait_for_output_writes() -> None:
    """Wait until every batch that writers of this process submitted so far
    is written (or failed)."""
    await asyncio.get_running_loop().run_in_executor(_write_thread, _do_nothing)


def _do_nothing() -> None:
    pass


def output_status(url: str, stream_kind: str, stream_id: str) -> dict[str, Any]:
    """Summarize one stream: chunks, characters, whether it ended, last time.

    `finished` is whether the newest chunk is final. A sandbox's stream
    contains the output of every execution of the sandbox, so it is
    unfinished again once the next execution starts.
    """
    with get_engine(url).connect() as connection:
        row = connection.execute(
            text(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(text)), 0), MAX(created_at) "
                "FROM execution_output WHERE stream_kind = :kind AND stream_id = :sid"
            ),
            {"kind": stream_kind, "sid": stream_id},
        ).one()
        tail = connection.execute(
            text(
                "SELECT text, final FROM execution_output WHERE stream_kind = :kind "
                "AND stream_id = :sid ORDER BY id DESC LIMIT 1"
            ),
            {"kind": stream_kind, "sid": stream_id},
        ).first()
    last = row[2]
    return {
        "chunks": int(row[0]),
        "characters": int(row[1]),
        "finished": bool(tail[1]) if tail is not None else False,
        "last_output_at": last,
        "last_chunk": tail[0] if tail is not None else None,
    }


# Tables that record each kind of run: sandboxes by `sandbox_create`, workflow
# executions by `workflow_execute` (the id is the execution id).
_RUN_TABLES = {"sandbox": "sandboxes", "workflow": "workflow_executions"}


def stream_target_exists(url: str, stream_kind: str, stream_id: str) -> bool:
    """Return whether the sandbox or workflow execution exists or has output.

    A run counts as existing if its table contains it or if any chunk of its
    output was appended, so output of a run recorded elsewhere still counts.
    """
    with get_engine(url).connect() as connection:
        chunk = connection.execute(
            text(
                "SELECT 1 FROM execution_output WHERE stream_kind = :kind AND "
                "stream_id = :sid LIMIT 1"
            ),
            {"kind": stream_kind, "sid": stream_id},
        ).first()
    if chunk is not None:
        return True
    table = _RUN_TABLES[stream_kind]
    try:
        with get_engine(url).connect() as connection:
            row = connection.execute(
                text(f"SELECT 1 FROM {table} WHERE id = :id"), {"id": stream_id}
            ).first()
    except DBAPIError:
        # The capability that owns the table is not installed.
        logger.warning("no %s table to look up %s %r", table, stream_kind, stream_id)
        return False
    return row is not None
