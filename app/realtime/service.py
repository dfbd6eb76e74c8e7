"""Subscriptions, their durable cursors, and reading the change log."""

from __future__ import annotations

import bisect
import json
import logging
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from app.contracts.realtime import SubscriptionInfo
from app.db import get_engine, get_stream_engine
from app.jsonsafe import has_wide_float
from app.realtime.filters import RowFilter, parse_filter
from app.realtime.triggers import (
    capture_is_current,
    column_kinds,
    enable_realtime,
    enabled_tables,
    validate_table_name,
)

logger = logging.getLogger(__name__)

EVENT_TYPES = ("INSERT", "UPDATE", "DELETE", "*")
DEFAULT_BATCH_SIZE = 100
DEFAULT_BUFFER_TIMEOUT_MS = 1000
DEFAULT_MAX_BUFFER_SIZE = 10000
# Rows read from the log per query; non-matching rows only move the cursor.
SCAN_PAGE = 1000


class SubscriptionError(ValueError):
    """An invalid subscription request; the message names the value."""


class SubscriptionNotFound(LookupError):
    """The subscription id does not exist (never created, or unsubscribed)."""


@dataclass(frozen=True)
class Change:
    """One row of the change log."""

    id: int
    schema: str
    table: str
    event_type: str
    record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    committed_at: str

    def payload(self) -> dict[str, Any]:
        """Return the event as subscribers see it."""
        return {
            "id": self.id,
            "schema": self.schema,
            "table": self.table,
            "commit_timestamp": self.committed_at,
            "eventType": self.event_type,
            # Copies, because cached pages share these dicts between subscribers.
            "new": dict(self.record or {}),
            "old": dict(self.old_record or {}),
        }


@dataclass(frozen=True)
class Matcher:
    """The event type and filter of one subscription, compiled."""

    event: str
    row_filter: RowFilter

    def matches(self, change: Change) -> bool:
        if self.event != "*" and change.event_type != self.event:
            return False
        record = change.old_record if change.event_type == "DELETE" else change.record
        return self.row_filter.matches(record)


def new_subscription_id() -> str:
    return "sub_" + secrets.token_hex(8)


def compile_matcher(url: str, table: str, event: str, filter_text: str) -> Matcher:
    """Validate and compile a subscription's event type and filter.

    Raises:
        SubscriptionError: an unknown event type, column or operator, or a bad
            value; the table is missing or not enabled.
    """
    if event not in EVENT_TYPES:
        raise SubscriptionError(
            f"invalid event {event!r}; use one of {', '.join(EVENT_TYPES)}"
        )
    try:
        validate_table_name(table)
        kinds = column_kinds(url, table)
    except ValueError as error:
        raise SubscriptionError(str(error)) from None
    try:
        row_filter = parse_filter(filter_text, kinds)
    except ValueError as error:
        raise SubscriptionError(
            f"invalid filter for table {table!r}: {error}"
        ) from None
    return Matcher(event=event, row_filter=row_filter)


def stored_matcher(url: str, info: SubscriptionInfo) -> Matcher:
    """Compile a stored subscription's matcher.

    Raises:
        SubscriptionError: its table was dropped, or changed so that its
            filter no longer applies. The message asks the caller to
            subscribe again.
    """
    try:
        return compile_matcher(url, info.table, info.event, info.filter)
    except SubscriptionError as error:
        raise SubscriptionError(
            f"subscription {info.subscription_id} no longer fits its table: "
            f"{error}. The table was dropped or changed after the subscription "
            "was created; unsubscribe it and subscribe again"
        ) from None


def create_subscription(
    url: str,
    table: str,
    *,
    event: str = "*",
    filter_text: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    buffer_timeout_ms: int = DEFAULT_BUFFER_TIMEOUT_MS,
    max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
    user_id: str = "local",
    key_id: str | None = None,
    stream_kind: str | None = None,
    stream_id: str | None = None,
    from_start: bool = False,
) -> SubscriptionInfo:
    """Create a subscription whose cursor starts at the newest change (or at
    the start of the log with `from_start`).

    Raises:
        SubscriptionError: see `compile_matcher`; also a table without realtime.
    """
    filter_text = (filter_text or "").strip()
    try:
        table = validate_table_name(table)
    except ValueError as error:
        raise SubscriptionError(str(error)) from None
    if max_buffer_size < batch_size:
        raise SubscriptionError(
            f"max_buffer_size {max_buffer_size} is smaller than batch_size "
            f"{batch_size}; raise max_buffer_size or lower batch_size"
        )
    compile_matcher(url, table, event, filter_text)
    if table not in enabled_tables(url):
        raise SubscriptionError(
            f"realtime is not enabled on table {table!r}; run "
            f"`nexus realtime enable {table}` first"
        )
    if not capture_is_current(url, table):
        # A SQLite table created again, or given a column, since it was
        # enabled: its changes would go uncaptured, or without that column.
        logger.warning(
            "the realtime capture triggers of table %s were missing or out of "
            "date; installing them again",
            table,
        )
        enable_realtime(url, table)
    subscription_id = new_subscription_id()
    now = datetime.now(UTC)
    with get_engine(url).begin() as connection:
        cursor = 0 if from_start else _head(connection)
        connection.execute(
            text(
                "INSERT INTO realtime_subscriptions (id, table_name, event_type, "
                "filter, cursor, delivered, batch_size, buffer_timeout_ms, "
                "max_buffer_size, user_id, key_id, stream_kind, stream_id, "
                "created_at, updated_at) VALUES (:id, :table, :event, :filter, "
                ":cursor, 0, :batch_size, :buffer_timeout, :max_buffer, :user_id, "
                ":key_id, :stream_kind, :stream_id, :now, :now)"
            ),
            {
                "id": subscription_id,
                "table": table,
                "event": event,
                "filter": filter_text,
                "cursor": cursor,
                "batch_size": batch_size,
                "buffer_timeout": buffer_timeout_ms,
                "max_buffer": max_buffer_size,
                "user_id": user_id,
                "key_id": key_id,
                "stream_kind": stream_kind,
                "stream_id": stream_id,
                "now": now,
            },
        )
    logger.info(
        "subscription %s created on %s (event %s, filter %r, cursor %d)",
        subscription_id,
        table,
        event,
        filter_text,
        cursor,
    )
    return get_subscription(url, subscription_id)


def _head(connection: Connection) -> int:
    value = connection.execute(text("SELECT MAX(id) FROM realtime_changes")).scalar()
    return int(value or 0)


_SUBSCRIPTION_COLUMNS = (
    "id, table_name, event_type, filter, cursor, delivered, batch_size, "
    "buffer_timeout_ms, max_buffer_size, stream_kind, stream_id, created_at, "
    "updated_at, user_id, key_id"
)


def _info(row: Sequence[Any]) -> SubscriptionInfo:
    return SubscriptionInfo(
        subscription_id=row[0],
        table=row[1],
        event=row[2],
        filter=row[3],
        cursor=int(row[4]),
        delivered=int(row[5]),
        batch_size=int(row[6]),
        buffer_timeout=int(row[7]),
        max_buffer_size=int(row[8]),
        stream_kind=row[9],
        stream_id=row[10],
        created_at=row[11],
        updated_at=row[12],
        user_id=row[13],
        key_id=row[14],
    )


def get_subscription(url: str, subscription_id: str) -> SubscriptionInfo:
    """Raises: SubscriptionNotFound."""
    with get_engine(url).connect() as connection:
        row = connection.execute(
            text(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM realtime_subscriptions "
                "WHERE id = :id"
            ),
            {"id": subscription_id},
        ).first()
    if row is None:
        raise SubscriptionNotFound(
            f"subscription {subscription_id!r} not found; list subscriptions with "
            "realtime_list or create one with realtime_subscribe"
        )
    return _info(row)


def log_head(url: str) -> int:
    """Return the id of the newest change in the log, any table (0 if empty)."""
    with get_engine(url).connect() as connection:
        return _head(connection)


# The lag of a filtered subscription is counted by reading the changes after
# its cursor through its filter. It reads at most this many per subscription,
# so listing subscriptions stays cheap however far one has fallen behind.
LAG_SCAN_CHANGES = 10 * SCAN_PAGE


def count_matching(
    url: str,
    table: str,
    matcher: Matcher,
    after: int,
    upto: int | None = None,
    max_changes: int | None = None,
) -> tuple[int, bool]:
    """Count the changes in (`after`, `upto`] that `matcher` accepts.

    Reads at most `max_changes` changes of the table (all with None).

    Returns:
        The count, and whether every change in the range was read.
    """
    count = read = 0
    cursor = after
    while True:
        page = fetch_changes(url, table, cursor, SCAN_PAGE)
        for change in page:
            if upto is not None and change.id > upto:
                return count, True
            if max_changes is not None and read >= max_changes:
                return count, False
            read += 1
            if matcher.matches(change):
                count += 1
            cursor = change.id
        if len(page) < SCAN_PAGE:
            return count, True


def _lag(connection: Connection, url: str, info: SubscriptionInfo) -> tuple[int, bool]:
    """Matching events after the cursor: counted in SQL without a row filter,
    else through the filter over at most `LAG_SCAN_CHANGES` changes."""
    if not info.filter:
        condition = "" if info.event == "*" else " AND event_type = :e"
        value = connection.execute(
            text(
                "SELECT COUNT(*) FROM realtime_changes "
                f"WHERE table_name = :t AND id > :c{condition}"
            ),
            {"t": info.table, "c": info.cursor, "e": info.event},
        ).scalar()
        return int(value or 0), True
    matcher = stored_matcher(url, info)
    return count_matching(
        url, info.table, matcher, info.cursor, max_changes=LAG_SCAN_CHANGES
    )


def _with_lag(
    connection: Connection, url: str, info: SubscriptionInfo, head: int
) -> SubscriptionInfo:
    try:
        lag, exact = _lag(connection, url, info)
    except SubscriptionError as error:
        # The table changed under the filter (a column dropped): no count.
        logger.warning("no lag for %s: %s", info.subscription_id, error)
        return info.model_copy(update={"head": head})
    return info.model_copy(update={"head": head, "lag": lag, "lag_exact": exact})


def describe_subscription(url: str, subscription_id: str) -> SubscriptionInfo:
    """Return one subscription with `head` and `lag` filled.

    Raises:
        SubscriptionNotFound: the subscription does not exist.
    """
    info = get_subscription(url, subscription_id)
    with get_engine(url).connect() as connection:
        return _with_lag(connection, url, info, _head(connection))


def list_subscriptions(url: str) -> list[SubscriptionInfo]:
    """List every subscription with `head` and its lag: the matching events
    after its cursor (see `describe_subscription`)."""
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM realtime_subscriptions "
                "ORDER BY created_at, id"
            )
        ).all()
        head = _head(connection)
        return [_with_lag(connection, url, _info(row), head) for row in rows]


def subscription_exists(url: str, subscription_id: str) -> bool:
    """Return whether the subscription still exists (read on a stream
    connection)."""
    row = _on_stream_connection(
        url,
        lambda connection: connection.execute(
            text("SELECT 1 FROM realtime_subscriptions WHERE id = :id"),
            {"id": subscription_id},
        ).first(),
    )
    return row is not None


def delete_subscription(url: str, subscription_id: str) -> bool:
    with get_engine(url).begin() as connection:
        result = connection.execute(
            text("DELETE FROM realtime_subscriptions WHERE id = :id"),
            {"id": subscription_id},
        )
    deleted = bool(result.rowcount)
    if deleted:
        logger.info("subscription %s deleted", subscription_id)
    return deleted


def save_cursor(
    url: str,
    subscription_id: str,
    cursor: int,
    delivered: int,
    *,
    expected: int | None = None,
) -> bool:
    """Move the cursor forward (never back) and count delivered events.

    With `expected`, the update only happens if the stored cursor still equals
    it, so two readers of one subscription cannot both deliver a batch.

    Returns:
        False when the subscription no longer exists or `expected` did not match.
    """
    condition = "cursor = :expected" if expected is not None else "cursor <= :cursor"
    result = _on_stream_connection(
        url,
        lambda connection: connection.execute(
            text(
                "UPDATE realtime_subscriptions SET cursor = :cursor, "
                "delivered = delivered + :delivered, updated_at = :now "
                f"WHERE id = :id AND {condition}"
            ),
            {
                "cursor": cursor,
                "delivered": delivered,
                "now": datetime.now(UTC),
                "id": subscription_id,
                "expected": expected,
            },
        ),
        commit=True,
    )
    return bool(result.rowcount)


def advance_cursor(
    url: str,
    subscription_id: str,
    cursor: int,
    counted: Callable[[int], int],
) -> bool:
    """Move the stored cursor forward to `cursor` (never back) and add to
    `delivered` the events between the stored cursor and `cursor`, each event
    once however often it was handed out.

    Args:
        counted: given the stored cursor, returns how many events in
            (stored cursor, `cursor`] the move confirms.

    Returns:
        False when the subscription no longer exists.
    """

    def stored_cursor(connection: Connection) -> int | None:
        value = connection.execute(
            text("SELECT cursor FROM realtime_subscriptions WHERE id = :id"),
            {"id": subscription_id},
        ).scalar()
        return None if value is None else int(value)

    while True:
        stored = _on_stream_connection(url, stored_cursor)
        if stored is None:
            return False
        if cursor <= stored:
            return True
        if save_cursor(url, subscription_id, cursor, counted(stored), expected=stored):
            return True
        # Another reader moved the cursor meanwhile: count again from there.


def confirm_cursor(
    url: str, subscription_id: str, cursor: int, *, name: str = "cursor"
) -> SubscriptionInfo:
    """Record that a client received every event up to change id `cursor`:
    the stored cursor moves there unless it is already further, and
    `delivered` counts the matching events it passes.

    Args:
        name: what the client called the value, for the error message.

    Raises:
        SubscriptionNotFound: the subscription does not exist.
        SubscriptionError: `cursor` is beyond the newest change of the log.
    """
    info = get_subscription(url, subscription_id)
    check_client_cursor(url, info, cursor, name)
    if cursor > info.cursor:
        matcher = stored_matcher(url, info)

        def counted(stored: int) -> int:
            return count_matching(url, info.table, matcher, stored, cursor)[0]

        if not advance_cursor(url, subscription_id, cursor, counted):
            raise SubscriptionNotFound(
                f"subscription {subscription_id!r} was deleted; create a new one "
                "with realtime_subscribe"
            )
        logger.info("subscription %s confirmed up to %d", subscription_id, cursor)
    return get_subscription(url, subscription_id)


def check_client_cursor(
    url: str, info: SubscriptionInfo, cursor: int, name: str
) -> None:
    """Reject a change id from a client that no stream can have sent: one
    beyond both the newest change of the log and the stored cursor.

    Raises:
        SubscriptionError: naming the value, the newest change and the fix.
    """
    if cursor < 0:
        raise SubscriptionError(f"{name} {cursor} is negative; send a change id")
    head = log_head(url)
    if cursor > max(head, info.cursor):
        raise SubscriptionError(
            f"{name} {cursor} is beyond the log: the newest change is {head}. "
            "Send the `id:` of the last batch the stream gave you, or reconnect "
            f"without it to start at the stored cursor {info.cursor}"
        )


def _parse_json_float(text: str) -> float | int | None:
    """Decode a JSON number that has a fraction or an exponent.

    A number beyond the float range, such as `1e400` in a `json` column,
    would decode to an infinity, which JSON output cannot write. It becomes
    the exact int instead, as `jsonb` documents carried it before, or None
    when it has a fraction or more digits than Python prints in an int
    (`sys.get_int_max_str_digits()`).
    """
    value = float(text)
    if math.isfinite(value):
        return value
    exact = Decimal(text)
    limit = sys.get_int_max_str_digits()
    if exact != exact.to_integral_value() or (limit and exact.adjusted() >= limit):
        return None
    return int(exact)


def _parse_json_int(text: str) -> int | None:
    # int() rejects more digits than sys.get_int_max_str_digits().
    try:
        return int(text)
    except ValueError:
        return None


def _load_json_exactly(text: str | bytes) -> Any:
    return json.loads(text, parse_float=_parse_json_float, parse_int=_parse_json_int)


def _load_json(text: str | bytes) -> Any:
    """Decode JSON with orjson, falling back to the json module where orjson
    would round a large integer or rejects the text (a lone surrogate, a
    number beyond the float range)."""
    try:
        loaded = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _load_json_exactly(text)
    # PostgreSQL writes numbers of any size as digits, which orjson rounds.
    if has_wide_float(loaded):
        return _load_json_exactly(text)
    return loaded


def _document(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if type(value) is str or isinstance(value, str | bytes):
        loaded = _load_json(value)
        return loaded if type(loaded) is dict else {"value": loaded}
    if isinstance(value, Mapping):
        return dict(value)
    return {"value": value}


# How many recent changes of one table a process keeps for its subscribers.
WINDOW_CHANGES = 5 * SCAN_PAGE


class _TailWindow:
    """The most recent changes of one table, shared by this process's
    subscribers, so that one read of the log serves all of them.

    Change ids become visible in id order, because the capture trigger holds
    a lock from a change's append to its commit. So once the window contains
    the changes in (low, high], no other change in that range can appear
    later, and serving a subscriber from the window misses nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the fields below
        self._reading = threading.Lock()  # one tail read at a time
        self._reads_begun = 0
        self.low: int | None = None
        self.high: int | None = None
        self._ids: list[int] = []
        self._changes: list[Change] = []

    def ticket(self) -> int:
        """Return the count of tail reads begun so far; see `page`."""
        with self._lock:
            return self._reads_begun

    def page(
        self, url: str, table: str, after: int, ticket: int | None = None
    ) -> list[Change]:
        """Return up to `SCAN_PAGE` changes after `after`, in id order.

        Without a `ticket` the page contains every change committed before
        this call. With a `ticket` from `ticket()` it contains every change
        committed before that call: a tail read begun since then suffices.
        """
        with self._lock:
            arrived = self._reads_begun if ticket is None else ticket
            served = self._slice(after)
            if served is None and (self.high is None or after > self.high):
                # Nothing held yet, or a cursor moved past the window by
                # another process: start the window at this cursor.
                self.low = self.high = after
                self._ids, self._changes = [], []
                served = []
        if served is None:
            # Behind the window: read this subscriber's own page.
            return fetch_changes(url, table, after, SCAN_PAGE)
        if len(served) == SCAN_PAGE:
            return served
        self._extend(url, table, arrived)
        with self._lock:
            fresh = self._slice(after)
        return fetch_changes(url, table, after, SCAN_PAGE) if fresh is None else fresh

    def _slice(self, after: int) -> list[Change] | None:
        if self.low is None or self.high is None or not self.low <= after <= self.high:
            return None
        first = bisect.bisect_right(self._ids, after)
        return self._changes[first : first + SCAN_PAGE]

    def _extend(self, url: str, table: str, arrived: int) -> None:
        """Read the changes after the window's end, unless a read that began
        after the caller arrived has already done so."""
        with self._reading:
            with self._lock:
                if self._reads_begun > arrived:
                    return
                self._reads_begun += 1
                high = self.high
            assert high is not None
            changes = fetch_changes(url, table, high, SCAN_PAGE)
            with self._lock:
                if self.high != high:  # reset meanwhile; the read is stale
                    return
                if changes:
                    self._ids.extend(c.id for c in changes)
                    self._changes.extend(changes)
                    self.high = changes[-1].id
                excess = len(self._ids) - WINDOW_CHANGES
                if excess >= SCAN_PAGE:
                    self.low = self._ids[excess - 1]
                    del self._ids[:excess]
                    del self._changes[:excess]


_windows: dict[tuple[str, str], _TailWindow] = {}
_windows_lock = threading.Lock()


def _window(url: str, table: str) -> _TailWindow:
    with _windows_lock:
        window = _windows.get((url, table))
        if window is None:
            window = _windows[(url, table)] = _TailWindow()
    return window


def read_ticket(url: str, table: str) -> int:
    """Return a ticket for `scan`: subscribers woken together that take
    their tickets before any of them reads then share one tail read."""
    return _window(url, table).ticket()


def fetch_page(
    url: str, table: str, after: int, ticket: int | None = None
) -> list[Change]:
    """Read up to `SCAN_PAGE` changes of `table` after `after`, through the
    process's shared window of the table's most recent changes."""
    return _window(url, table).page(url, table, after, ticket)


# Driver-level SQL per dialect: the tail read runs for every wake-up of every
# stream, so it skips statement compilation and SQLAlchemy row objects.
# PostgreSQL sends the documents as JSON text, decoded by `_document`, and
# the commit time as ISO 8601 text in UTC, as SQLite's trigger stores it:
# formatting it there costs less than a datetime object per change here.
_CHANGES_SQL = {
    "postgresql": (
        "SELECT id, schema_name, event_type, record::text, old_record::text, "
        "to_char(committed_at AT TIME ZONE 'UTC', "
        '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\') FROM realtime_changes '
        "WHERE table_name = %(t)s AND id > %(after)s ORDER BY id LIMIT %(limit)s"
    ),
    "sqlite": (
        "SELECT id, schema_name, event_type, record, old_record, committed_at "
        "FROM realtime_changes WHERE table_name = :t AND id > :after "
        "ORDER BY id LIMIT :limit"
    ),
}


def _select_changes(
    connection: Connection, table: str, after: int, limit: int
) -> Sequence[Any]:
    sql = _CHANGES_SQL[connection.dialect.name]
    result = connection.exec_driver_sql(
        sql, {"t": table, "after": after, "limit": limit}
    )
    # The DBAPI cursor's tuples, without a SQLAlchemy row object per change.
    rows = result.cursor.fetchall()
    result.close()
    return rows


def fetch_changes(url: str, table: str, after: int, limit: int) -> list[Change]:
    """Read up to `limit` changes of `table` with an id above `after`, in order."""
    rows = _on_stream_connection(
        url, lambda connection: _select_changes(connection, table, after, limit)
    )
    return [
        Change(
            id=row[0],
            schema=row[1],
            table=table,
            event_type=row[2],
            record=_document(row[3]),
            old_record=_document(row[4]),
            committed_at=row[5],
        )
        for row in rows
    ]


ResultT = TypeVar("ResultT")


def _on_stream_connection(
    url: str, work: Callable[[Connection], ResultT], *, commit: bool = False
) -> ResultT:
    """Run `work` on a stream connection, once more if the connection had
    dropped (a database restart): the stream engine does not pre-ping."""
    for attempt in (1, 2):
        engine = get_stream_engine(url)
        try:
            with engine.begin() if commit else engine.connect() as connection:
                return work(connection)
        except DBAPIError as error:
            if attempt == 2 or not error.connection_invalidated:
                raise
    raise AssertionError("unreachable")


@dataclass
class ScanResult:
    events: list[dict[str, Any]]
    cursor: int
    exhausted: bool


def scan(
    url: str,
    table: str,
    matcher: Matcher,
    after: int,
    limit: int | None,
    ticket: int | None = None,
) -> ScanResult:
    """Collect up to `limit` matching events after `after`, or with `limit`
    None the matching events of exactly one page (which keeps subscribers on
    shared page boundaries, so they hit the page cache).

    The returned cursor covers every row examined, so rows that did not match
    are never read again. With a `limit`, it stops at the `limit`-th event.
    A `ticket` from `read_ticket` applies to the first page.
    """
    events: list[dict[str, Any]] = []
    cursor = after
    while True:
        page = fetch_page(url, table, cursor, ticket)
        ticket = None
        for change in page:
            if matcher.matches(change):
                events.append(change.payload())
            cursor = change.id
            if limit is not None and len(events) >= limit:
                return ScanResult(events, cursor, exhausted=False)
        if len(page) < SCAN_PAGE:
            return ScanResult(events, cursor, exhausted=True)
        if limit is None:
            return ScanResult(events, cursor, exhausted=False)


def prune_changes(url: str, retention_seconds: float) -> int:
    """Delete changes older than the retention window that every subscription
    of their table has passed; return how many were deleted."""
    cutoff = datetime.now(UTC) - timedelta(seconds=retention_seconds)
    engine = get_engine(url)
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            bound: Any = cutoff.strftime("%Y-%m-%dT%H:%M:%S.") + (
                f"{cutoff.microsecond // 1000:03d}Z"
            )
        else:
            bound = cutoff
        result = connection.execute(
            text(
                "DELETE FROM realtime_changes WHERE committed_at < :cutoff AND id <= "
                "COALESCE((SELECT MIN(s.cursor) FROM realtime_subscriptions s "
                "WHERE s.table_name = realtime_changes.table_name), id)"
            ),
            {"cutoff": bound},
        )
    deleted = int(result.rowcount or 0)
    if deleted:
        logger.info("pruned %d realtime changes older than %s", deleted, cutoff)
    return deleted


def pruned_output_chunks(url: str, stream_kind: str, stream_id: str) -> int:
    """Count the chunks of one run whose changes were pruned from the log,
    which an execution stream subscribed now does not deliver.

    Pruning deletes the oldest changes, so those are the run's chunks older
    than the oldest `execution_output` change still in the log (all of them
    when none is left).
    """
    with get_engine(url).connect() as connection:
        oldest = connection.execute(
            text(
                "SELECT record FROM realtime_changes WHERE id = (SELECT MIN(id) "
                "FROM realtime_changes WHERE table_name = 'execution_output')"
            )
        ).first()
        record = _document(oldest[0]) if oldest is not None else None
        first_kept = record.get("id") if record is not None else None
        query = (
            "SELECT COUNT(*) FROM execution_output WHERE stream_kind = :kind "
            "AND stream_id = :sid"
        )
        if isinstance(first_kept, int):
            query += " AND id < :first"
        return int(
            connection.execute(
                text(query),
                {"kind": stream_kind, "sid": stream_id, "first": first_kept},
            ).scalar_one()
        )


_last_prune: dict[str, float] = {}


def prune_if_due(url: str, retention_seconds: float, interval: float = 60.0) -> None:
    """Prune at most once per `interval` seconds per process and database."""
    now = time.monotonic()
    if now - _last_prune.get(url, float("-inf")) < interval:
        return
    _last_prune[url] = now
    try:
        prune_changes(url, retention_seconds)
    except Exception:
        logger.exception("pruning the realtime change log failed; retrying later")
