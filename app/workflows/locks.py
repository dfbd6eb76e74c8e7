"""A lock per workflow definition name, shared by every process that uses
one database.

`workflow_create`, `workflow_delete` and `workflow_agent_assign` change a
definition's rows and then its Temporal Schedules, and a run started from
outside with a definition snapshot stores that snapshot as a version. Two
of them interleaved on one name leave schedules that the definition's final
state does not have, for example a deleted definition whose schedules still
start runs. So each call holds this lock from its first read of the
definition to its last schedule change.

The CLI runs tools in its own process, so an in-process lock is not enough.
On PostgreSQL the lock is a session advisory lock on a connection held for
the call. On SQLite, whose database is a local file, it is an exclusive
`flock` on a file next to the database, which the kernel releases when its
holder's process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.db import get_engine

logger = logging.getLogger(__name__)

# Longer than a create with many schedule triggers takes against a reachable
# server; a caller that waits longer gets DefinitionBusyError.
LOCK_WAIT_SECONDS = 30.0
_POLL_SECONDS = 0.05
# SQLite lock files: names share one of this many files by hash, so the
# folder stays small; two names in one file only take turns.
_LOCK_FILES = 256


class DefinitionBusyError(Exception):
    """Another call held the definition's lock for longer than the wait."""

    def __init__(self, name: str, waited: float) -> None:
        super().__init__(
            f"workflow {name!r} is being changed by another workflow_create, "
            f"workflow_delete or workflow_agent_assign call, which still held it "
            f"after {waited:g} s; nothing was changed, send the call again"
        )
        self.name = name


def _digest(name: str) -> bytes:
    return hashlib.sha256(f"nexus-workflow-definition:{name}".encode()).digest()


@contextlib.asynccontextmanager
async def definition_lock(
    url: str, name: str, *, wait: float = LOCK_WAIT_SECONDS
) -> AsyncIterator[None]:
    """Hold the lock of definition `name` in the database at `url`.

    Raises:
        DefinitionBusyError: the lock stayed taken for `wait` seconds.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        manager = _advisory_lock(url, name, wait)
    else:
        manager = _file_lock(_lock_path(parsed.database, name), name, wait)
    async with manager:
        yield


@contextlib.contextmanager
def definition_lock_blocking(
    url: str, name: str, *, wait: float = LOCK_WAIT_SECONDS
) -> Iterator[None]:
    """`definition_lock` for synchronous code, such as an activity that runs
    in a thread: it sleeps between attempts instead of awaiting.

    Raises:
        DefinitionBusyError: the lock stayed taken for `wait` seconds.
    """
    parsed = make_url(url)
    deadline = time.monotonic() + wait
    if parsed.get_backend_name() == "postgresql":
        key = _advisory_key(name)
        while (connection := _try_advisory_lock(url, key)) is None:
            if time.monotonic() >= deadline:
                raise DefinitionBusyError(name, wait)
            time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            _advisory_unlock(connection, key)
        return
    path = _lock_path(parsed.database, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while not _try_flock(descriptor):
            if time.monotonic() >= deadline:
                raise DefinitionBusyError(name, wait)
            time.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(descriptor)


def _try_flock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise
        return False
    return True


def _lock_path(database: str | None, name: str) -> Path:
    if database and database != ":memory:":
        folder = Path(database).with_name(Path(database).name + "-workflow-locks")
    else:
        # A database without a file has no other process to share it with.
        folder = Path(tempfile.gettempdir()) / "nexus-workflow-locks"
    bucket = int.from_bytes(_digest(name)[:4], "big") % _LOCK_FILES
    return folder / f"{bucket:03d}.lock"


@contextlib.asynccontextmanager
async def _file_lock(path: Path, name: str, wait: float) -> AsyncIterator[None]:
    # One open file per holder: flock locks belong to the open file, so two
    # calls in one process exclude each other too.
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = asyncio.get_running_loop().time() + wait
        while not _try_flock(descriptor):
            if asyncio.get_running_loop().time() >= deadline:
                raise DefinitionBusyError(name, wait)
            await asyncio.sleep(_POLL_SECONDS)
        yield
    finally:
        # Closing the file releases the lock.
        os.close(descriptor)


def _advisory_key(name: str) -> int:
    return int.from_bytes(_digest(name)[:8], "big", signed=True)


def _try_advisory_lock(url: str, key: int) -> Connection | None:
    """Return a connection that holds the advisory lock `key`, or None when
    another session holds it."""
    connection = get_engine(url).connect()
    try:
        acquired = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
        ).scalar()
        connection.commit()
    except BaseException:
        connection.invalidate()
        connection.close()
        raise
    if acquired:
        return connection
    connection.close()
    return None


def _advisory_unlock(connection: Connection, key: int) -> None:
    try:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        connection.commit()
    except SQLAlchemyError as error:
        # The pool would hand the connection on with the lock still held;
        # closing the session is what releases it then.
        logger.warning("advisory unlock failed, closing the connection: %s", error)
        connection.invalidate()
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def _advisory_lock(url: str, name: str, wait: float) -> AsyncIterator[None]:
    key = _advisory_key(name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        attempt = asyncio.ensure_future(asyncio.to_thread(_try_advisory_lock, url, key))
        try:
            # Shielded, so that a cancelled caller still learns whether the
            # thread took the lock, and releases it.
            connection = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(lambda done: _release_abandoned(loop, done, key))
            raise
        if connection is not None:
            break
        if loop.time() >= deadline:
            raise DefinitionBusyError(name, wait)
        await asyncio.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        await asyncio.shield(asyncio.to_thread(_advisory_unlock, connection, key))


def _release_abandoned(
    loop: asyncio.AbstractEventLoop,
    attempt: asyncio.Future[Connection | None],
    key: int,
) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return
    connection = attempt.result()
    if connection is not None:
        loop.run_in_executor(None, _advisory_unlock, connection, key)
