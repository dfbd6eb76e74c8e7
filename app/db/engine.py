"""Engines and sessions that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, create_engine

from app.settings import mask_url_passwords, url_passwords

logger = logging.getLogger(__name__)

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
# SQLite databases whose WAL this process checkpoints from a background
# thread (see `BackgroundCheckpoints`).
_background_checkpoints: set[str] = set()


def get_engine(url: str) -> Engine:
    """Return the process-wide engine for `url`, creating it on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create_engine(url)
            _engines[url] = engine
        return engine


def unreachable_database_message(url: str) -> str | None:
    """Connect to `url` once, and return a one-line error with the masked URL
    and the fix when that fails, or None when it succeeds.

    Commands call it after a database error, to tell a database that cannot
    be reached from a failed statement.
    """
    try:
        with get_engine(url).connect():
            pass
    except DBAPIError as error:
        # The driver's first line, such as psycopg's `connection failed:
        # connection to server at "HOST", port N failed: Connection refused`,
        # ends with the cause. Its host and port are in the URL already.
        first_line = str(error.orig).strip().splitlines()[0] if error.orig else ""
        reason = first_line.rpartition("failed: ")[2] or type(error).__name__
        for secret in url_passwords(url):
            reason = reason.replace(secret, "***")
        return (
            f"the database at {mask_url_passwords(url)} cannot be reached "
            f"({reason}); start it or fix NEXUS_DATABASE_URL"
        )
    return None


def get_stream_engine(url: str) -> Engine:
    """Return the engine for realtime reads and cursor writes of `url`.

    On PostgreSQL it skips the pool's pre-ping, because that round trip per
    checkout doubled the cost of the many small reads a stream makes. Stream
    readers retry a query that fails on a dropped connection instead. Its
    connections autocommit, so a read opens no transaction and returning the
    connection to the pool sends no ROLLBACK. Each cursor write is a single
    UPDATE, so it needs no transaction either. On SQLite it is the
    process-wide engine.
    """
    if make_url(url).get_backend_name() == "sqlite":
        return get_engine(url)
    key = f"stream:{url}"
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_engine(
                url,
                pool_size=10,
                max_overflow=20,
                isolation_level="AUTOCOMMIT",
                hide_parameters=True,
                connect_args=_postgres_connect_args(url),
            )
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    # hide_parameters: a database error's text (logged, or shown by a tool
    # before it was caught) then carries no bound values, which can be secrets.
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # A new folder for the owner only, as `keep_private` makes it.
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
        )
        event.listen(engine, "connect", functools.partial(_configure_sqlite, url))
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        hide_parameters=True,
        connect_args=_postgres_connect_args(url),
    )


# Seconds a PostgreSQL connection may take to open. libpq waits forever by
# default, so a host that accepts connections and never responds would hang
# every command instead of giving the one-line unreachable-database error.
CONNECT_TIMEOUT_SECONDS = 10


def _postgres_connect_args(url: str) -> dict[str, Any]:
    # A `connect_timeout` in the URL's query is the user's choice and wins.
    if "connect_timeout" in make_url(url).query:
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_SECONDS}


def _configure_sqlite(url: str, dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (health, realtime pollers) run while a worker writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    if url in _background_checkpoints:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class BackgroundCheckpoints:
    """Checkpoint a SQLite database's WAL from a thread of this process, in
    place of the commits of this process.

    By default the commit that takes the WAL past 1000 pages copies them all
    back into the database before it returns. In the HTTP server that was
    one audit write in about 125, every 0.3 s at 400 calls a second. It
    took 3 to 5 ms where a write takes 0.2 ms, so the `audit_log` calls
    waiting for that write made up the slowest percent. Here this process's
    connections never checkpoint; a thread runs a passive checkpoint every
    `interval` seconds, which copies what no reader still needs while
    writers go on appending. Other processes keep SQLite's automatic
    checkpoints, so the WAL stays bounded when this process stops.

    Does nothing for PostgreSQL or an in-memory database.
    """

    def __init__(self, url: str, interval: float = 0.5) -> None:
        self.url = url
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        parsed = make_url(url)
        database = parsed.database
        self._path = (
            database
            if parsed.get_backend_name() == "sqlite"
            and database
            and database != ":memory:"
            else None
        )

    def start(self) -> bool:
        """Start the thread; return False where this database needs none."""
        if self._path is None:
            return False
        if self._thread is not None:
            return True
        with _lock:
            _background_checkpoints.add(self.url)
        # Pooled connections were configured with automatic checkpoints.
        get_engine(self.url).dispose()
        self._thread = threading.Thread(
            target=self._run, name="sqlite-checkpoints", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop the thread after one last checkpoint; connections opened
        from now on checkpoint automatically again."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with _lock:
            _background_checkpoints.discard(self.url)
        get_engine(self.url).dispose()

    def _run(self) -> None:
        assert self._path is not None
        connection = sqlite3.connect(self._path, timeout=30, check_same_thread=False)
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:
                    logger.warning("WAL checkpoint of %s failed: %s", self._path, error)
                if stopping:
                    return
        finally:
            connection.close()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on error."""
    with Session(get_engine(url), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def compiled_cache_sizes() -> list[tuple[str, int]]:
    """Return each engine, named by its URL with its secrets masked (and
    `stream` for a stream engine), with the entries in its compiled statement
    cache. A count that keeps rising names a statement that is built anew on
    every call; the cache grows to 750 entries before it prunes back to 500."""
    with _lock:
        engines = list(_engines.items())
    return [
        (
            ("stream " if key.startswith("stream:") else "")
            + mask_url_passwords(engine.url.render_as_string(hide_password=False)),
            len(engine._compiled_cache or {}),
        )
        for key, engine in engines
    ]


def dispose_engines() -> None:
    """Close every pooled connection, for tests and process shutdown."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
