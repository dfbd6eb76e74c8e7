"""A memory report that a worker writes when it gets SIGUSR1, for finding what
grows in a long run: `kill -USR1 PID`, then read the file named in its log.

The report has the counts of live Python objects by type and of imported
modules by top-level package, the largest objects with who refers to them,
glibc's `mallinfo2` fields, SQLite's allocated
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


# Objects the report lists by size, and the referrers it names for each.
MAX_LARGEST_SHOWN = 25
MAX_REFERRERS_SHOWN = 3
# Objects that the collector does not track, such as bytes and text, are
# listed from this size on, when a tracked object refers to them.
UNTRACKED_MIN_BYTES = 256 * 1024


def _describe(obj: object) -> str:
    """Return the type of `obj` and, for a container, its length and a sample
    of its first key or item, so that a reader can tell what it holds."""
    kind = type(obj).__qualname__
    try:
        size = len(obj)  # type: ignore[arg-type]
    except TypeError:
        return kind
    sample = ""
    if isinstance(obj, dict) and obj:
        sample = f" first key {next(iter(obj))!r:.80}"
    elif isinstance(obj, list | tuple | collections.deque) and obj:
        sample = f" first item {type(obj[0]).__qualname__}"
    elif isinstance(obj, set | frozenset) and obj:
        sample = f" an item {next(iter(obj))!r:.80}"
    return f"{kind} len {size}{sample}"


def _referrer_name(referrer: object, target: object) -> str:
    """Return where `referrer` keeps `target`: the attribute or key of an
    object's or module's dict, or the referrer's type."""
    if isinstance(referrer, dict):
        for key, value in referrer.items():
            if value is target:
                return f"key {key!r:.60} of a dict of {len(referrer)}"
        return f"a dict of {len(referrer)}"
    kind = type(referrer).__qualname__
    attributes = getattr(referrer, "__dict__", None)
    if isinstance(attributes, dict):
        for key, value in attributes.items():
            if value is target:
                return f"attribute {key!r:.60} of a {kind}"
    return kind


def largest_objects(objects: list[object]) -> list[str]:
    """Return one line for each of the largest objects by `sys.getsizeof`,
    with where their referrers keep them. `objects` are the ones the
    collector tracks. Large objects it does not track (bytes, text, and
    containers of numbers or text only) are found among their referents."""
    sizes: dict[int, int] = {}
    found: dict[int, object] = {}
    for obj in objects:
        candidates = [obj]
        candidates += [
            r
            for r in gc.get_referents(obj)
            if not gc.is_tracked(r) and sys.getsizeof(r, 0) >= UNTRACKED_MIN_BYTES
        ]
        for candidate in candidates:
            size = sys.getsizeof(candidate, 0)
            key = id(candidate)
            if key not in sizes and (len(sizes) < 4 * MAX_LARGEST_SHOWN or size > 4096):
                sizes[key] = size
                found[key] = candidate

    largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:MAX_LARGEST_SHOWN]
    top = [found[key] for key in largest]
    found.clear()

    this_frame = sys._getframe()
    lines = []
    for index in range(len(top)):
        obj = top[index]
        names = []
        for referrer in gc.get_referrers(obj):
            if referrer is top or referrer is objects or referrer is this_frame:
                continue
            names.append(_referrer_name(referrer, obj))
            if len(names) == MAX_REFERRERS_SHOWN:
                break
        size = sizes[largest[index]]
        lines.append(f"  {size:>11} {_describe(obj)}; in: {', '.join(names)}")
    return lines


def write_memory_report(folder: Path, label: str) -> Path:
    """Write one memory report of this process into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{label}-{os.getpid()}-{time.strftime('%H%M%S')}.txt"
    objects = gc.get_objects()
    counts = collections.Counter(type(o).__qualname__ for o in objects)
    with path.open("w") as out:
        out.write(f"pid {os.getpid()} at {time.time():.0f}\n")
        out.write(f"threads {threading.active_count()}\n")
        out.write(f"gc objects {sum(counts.values())}\n")
        for name, count in counts.most_common(60):
            out.write(f"  {count:>9} {name}\n")
        out.write("largest objects (bytes by sys.getsizeof)\n")
        for line in largest_objects(objects):
            out.write(line + "\n")
        del objects
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
