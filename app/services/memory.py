"""Memory readings of this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

import psutil

from app.contracts.system import MemoryStats


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    function = getattr(ctypes.CDLL(name), "mallinfo2", None)
    if function is None:  # glibc older than 2.33, or not glibc
        return None
    function.restype = _MallInfo2
    return function


def heap_usage() -> tuple[int, int] | None:
    """Return (heap total, heap used) in bytes from glibc, or None."""
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    # hblkhd counts mmap-ed blocks: large allocations that bypass the arena.
    return info.arena + info.hblkhd, info.uordblks + info.hblkhd


def mallinfo2_fields() -> dict[str, int] | None:
    """Return every field of glibc's `mallinfo2` in bytes, or None without it."""
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    return {field[0]: getattr(info, field[0]) for field in _MallInfo2._fields_}


def read_memory() -> MemoryStats:
    info = psutil.Process().memory_info()
    heap = heap_usage()
    return MemoryStats(
        rss=info.rss,
        vms=info.vms,
        heapTotal=heap[0] if heap else None,
        heapUsed=heap[1] if heap else None,
        python_allocated_blocks=sys.getallocatedblocks(),
    )
