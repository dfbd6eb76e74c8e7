"""Engines and sessions that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlmodel import Session, create_engine

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """Return the process-wide engine for `url`, creating it on first use."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create_engine(url)
            _engines[url] = engine
        return engine


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
            )
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    # hide_parameters: a database error's text (logged, or shown by a tool
    # before it was caught) then carries no bound values, which can be secrets.
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
        )
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        hide_parameters=True,
    )


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (health, realtime pollers) run while a worker writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


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
    """Return each engine, named by its URL without the password (and
    `stream` for a stream engine), with the entries in its compiled statement
    cache. A count that keeps rising names a statement that is built anew on
    every call; the cache grows to 750 entries before it prunes back to 500."""
    with _lock:
        engines = list(_engines.items())
    return [
        (
            ("stream " if key.startswith("stream:") else "")
            + engine.url.render_as_string(hide_password=True),
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
