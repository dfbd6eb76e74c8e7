"""glibc malloc settings of worker processes, which run for days.

A worker has many threads: the SDK core's Tokio threads, the activity thread
pool and asyncio's default executor. glibc gives each contending thread its
own arena, up to 8 per core, and free pages inside an arena stay resident
until something trims them. In the neural worker this showed as RSS growth
in the thread arenas while the bytes in use stayed flat. Fewer arenas and a
periodic `malloc_trim(0)`, which hands the free pages of every arena back
to the kernel, keep RSS closer to the bytes in use. Free pieces smaller
than a page stay resident all the same.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc
    return libc


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at `count` for arenas created from now on.

    Call it before the process starts threads. Returns False where the C
    library is not glibc or rejects the value.
    """
    libc = _libc()
    if libc is None or count <= 0:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, count))


def fix_mmap_threshold(size: int) -> bool:
    """Serve allocations of `size` bytes or more with their own mmap.

    glibc starts at 128 KiB but raises the threshold (up to 32 MiB on 64-bit)
    each time such a block is freed, after which large, short-lived buffers
    come from the arenas and fragment them. Setting the threshold turns that
    adjustment off, so a freed large block goes straight back to the kernel.
    Returns False where the C library is not glibc or rejects the value.
    """
    libc = _libc()
    if libc is None or size <= 0:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, size))


def trim_malloc() -> bool:
    """Return free memory of every glibc arena to the kernel.

    Returns True when memory was released, False when none was or the C
    library is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


async def trim_malloc_every(interval_seconds: float, stop: asyncio.Event) -> None:
    """Call `trim_malloc` every `interval_seconds` until `stop` is set."""
    if _libc() is None:
        logger.info("malloc_trim is not available (C library is not glibc)")
        return
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        except TimeoutError:
            started = time.perf_counter()
            # In a thread, because a trim walks every arena under its lock and
            # the event loop of the workflow tasks should not wait for that.
            released = await asyncio.to_thread(trim_malloc)
            logger.debug(
                "malloc_trim took %.1f ms (released memory: %s)",
                (time.perf_counter() - started) * 1000,
                released,
            )
