"""A memory report that a worker writes when it gets SIGUSR1, for finding what
grows in a long run: `kill -USR1 PID`, then read the file named in its log.

The report has the counts of live Python objects by type and of imported
modules by top-level package, glibc's `mallinfo2` fields, SQLite's allocated
bytes, the entries in each engine's compiled statement cache, pymalloc's
arena statistics (`sys._debugmallocstats`), the thread count and
`/proc/self/smaps_rollup`. Nothing runs until the signal comes.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path

from app.db.engine import compiled_cache_sizes
from app.services.memory import mallinfo2_fields, pymalloc_stats_text

logger = logging.getLogger(__name__)


def sqlite_memory_used() -> int | None:
    """Return the bytes that SQLite has allocated in this process (its page
    caches included), or None when the library cannot be loaded."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    library.sqlite3_memory_used.restype = ctypes.c_int64
    return int(library.sqlite3_memory_used())


def write_memory_report(folder: Path, label: str) -> Path:
    """Write one memory report of this process into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{label}-{os.getpid()}-{time.strftime('%H%M%S')}.txt"
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    with path.open("w") as out:
        out.write(f"pid {os.getpid()} at {time.time():.0f}\n")
        out.write(f"threads {threading.active_count()}\n")
        out.write(f"gc objects {sum(counts.values())}\n")
        for name, count in counts.most_common(60):
            out.write(f"  {count:>9} {name}\n")
        packages = collections.Counter(name.split(".")[0] for name in sys.modules)
        out.write(f"modules {len(sys.modules)}\n")
        for name, count in packages.most_common():
            out.write(f"  {count:>9} {name}\n")
        out.write("mallinfo2\n")
        for name, value in (mallinfo2_fields() or {}).items():
            out.write(f"  {name} {value}\n")
        sqlite_bytes = sqlite_memory_used()
        if sqlite_bytes is not None:
            out.write(f"sqlite3_memory_used {sqlite_bytes}\n")
        for url, entries in compiled_cache_sizes():
            out.write(f"sqlalchemy compiled cache {entries} entries ({url})\n")
        rollup = Path("/proc/self/smaps_rollup")
        if rollup.exists():
            out.write(rollup.read_text())
        out.write("sys._debugmallocstats\n")
        out.write(pymalloc_stats_text() or "pymalloc statistics not available\n")
    return path


def report_on_signal(folder: Path, label: str) -> None:
    """Write a memory report and log its path (the SIGUSR1 handler)."""
    try:
        path = write_memory_report(folder, label)
    except OSError as error:
        logger.error("memory report of %s failed: %s", label, error)
        return
    logger.info("memory report of %s written to %s", label, path)
