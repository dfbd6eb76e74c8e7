"""Memory readings of this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys
from typing import Any, NamedTuple

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


@functools.cache
def _mallctl() -> Any:
    """Return jemalloc's `mallctl` where jemalloc is this process's malloc
    (preloaded by the worker allocator setting), else None."""
    function = getattr(ctypes.CDLL(None), "mallctl", None)
    if function is None:
        return None
    function.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    function.restype = ctypes.c_int
    return function


def _jemalloc_stat(mallctl: Any, name: str) -> int | None:
    value = ctypes.c_size_t()
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0):
        return None
    return value.value


def jemalloc_usage() -> tuple[int, int] | None:
    """Return jemalloc's (active, allocated) bytes, or None without jemalloc.

    `stats.allocated` counts the bytes that the process has allocated and not
    freed; `stats.active` the pages those allocations occupy. jemalloc
    refreshes its statistics only when the `epoch` control is written.
    """
    mallctl = _mallctl()
    if mallctl is None:
        return None
    epoch = ctypes.c_uint64(1)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
    active = _jemalloc_stat(mallctl, "stats.active")
    allocated = _jemalloc_stat(mallctl, "stats.allocated")
    if active is None or allocated is None:
        return None
    return active, allocated


def heap_usage() -> tuple[int, int] | None:
    """Return (heap total, heap used) in bytes of the process's malloc:
    jemalloc's active and allocated bytes where it is in use, else glibc's
    arena and in-use bytes, or None without either."""
    jemalloc = jemalloc_usage()
    if jemalloc is not None:
        return jemalloc
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


class PythonHeap(NamedTuple):
    """pymalloc's figures: the allocator of Python objects of 512 bytes or less."""

    used: int
    """Bytes in allocated blocks: the small objects that are alive."""
    arenas: int
    """Arenas currently mapped, 1 MiB each on 64-bit CPython 3.11."""


class _MallocStatsReader(NamedTuple):
    debug_malloc_stats: Any
    open_memstream: Any
    fclose: Any
    free: Any


@functools.cache
def _malloc_stats_reader() -> _MallocStatsReader | None:
    """Load `_PyObject_DebugMallocStats(FILE *)` and the libc functions that
    give it an in-memory FILE, or return None where one is missing."""
    debug_malloc_stats = getattr(ctypes.pythonapi, "_PyObject_DebugMallocStats", None)
    name = ctypes.util.find_library("c")
    if debug_malloc_stats is None or not name:
        return None
    libc = ctypes.CDLL(name)
    open_memstream = getattr(libc, "open_memstream", None)
    if open_memstream is None:
        return None
    debug_malloc_stats.argtypes = [ctypes.c_void_p]
    debug_malloc_stats.restype = ctypes.c_int
    open_memstream.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    open_memstream.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.fclose.restype = ctypes.c_int
    # The stream's buffer comes from the malloc that the process uses, which
    # is not libc's own when another allocator is preloaded (LD_PRELOAD of
    # jemalloc). So the global `free` releases it, not libc's.
    free = ctypes.CDLL(None).free
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    return _MallocStatsReader(debug_malloc_stats, open_memstream, libc.fclose, free)


def pymalloc_stats_text() -> str | None:
    """Return pymalloc's statistics, the text that `sys._debugmallocstats()`
    prints, or None where pymalloc is off (`PYTHONMALLOC=malloc`) or the
    functions to read them are missing.

    `sys._debugmallocstats()` writes to the C stderr. This passes CPython's
    function a FILE from `open_memstream` instead, so no file descriptor is
    redirected while other threads write to stderr. ctypes.pythonapi holds
    the GIL for the call, which the function requires.
    """
    reader = _malloc_stats_reader()
    if reader is None:
        return None
    buffer = ctypes.c_void_p()
    size = ctypes.c_size_t()
    stream = reader.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return None
    try:
        printed = reader.debug_malloc_stats(stream)
    finally:
        # fclose sets `buffer` and `size` to the final text.
        reader.fclose(stream)
    address = buffer.value
    if address is None:
        return None
    try:
        # 0 means pymalloc is not the allocator, so nothing was printed.
        return ctypes.string_at(address, size.value).decode() if printed else None
    finally:
        reader.free(address)


_STATS_LINE = re.compile(
    r"^# (?P<name>[a-z ]+?)\s+=\s+(?P<value>[\d,]+)$", re.MULTILINE
)


def python_heap() -> PythonHeap | None:
    """Read pymalloc's bytes in allocated blocks and its current arenas, or
    return None where `pymalloc_stats_text` returns None.

    The call walks every pool of every arena. timeit measured 0.03 ms with
    11 arenas and 0.19 ms with 344 arenas (355 MB of small objects), on
    CPython 3.11.7 on a 2-core AMD EPYC machine.
    """
    text = pymalloc_stats_text()
    if text is None:
        return None
    figures = {
        match["name"]: int(match["value"].replace(",", ""))
        for match in _STATS_LINE.finditer(text)
    }
    used = figures.get("bytes in allocated blocks")
    arenas = figures.get("arenas allocated current")
    if used is None or arenas is None:
        return None
    return PythonHeap(used=used, arenas=arenas)


def read_memory() -> MemoryStats:
    info = psutil.Process().memory_info()
    heap = heap_usage()
    pymalloc = python_heap()
    return MemoryStats(
        rss=info.rss,
        vms=info.vms,
        heapTotal=heap[0] if heap else None,
        heapUsed=heap[1] if heap else None,
        python_heap_used=pymalloc.used if pymalloc else None,
        python_arenas=pymalloc.arenas if pymalloc else None,
        python_allocated_blocks=sys.getallocatedblocks(),
    )
