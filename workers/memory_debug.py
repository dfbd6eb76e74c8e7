"""A memory report that a worker writes when it gets SIGUSR1, for finding what
grows in a long run: `kill -USR1 PID`, then read the file named in its log.

The report has the counts of live Python objects by type and of imported
modules by top-level package, the largest objects with who refers to them,
glibc's `mallinfo2` fields, SQLite's allocated
bytes, the entries in each engine's compiled statement cache, pymalloc's
arena statistics (`sys._debugmallocstats`), the thread count and
`/proc/self/smaps_rollup`. Nothing runs until the signal comes.

A worker started with Python's `PYTHONTRACEMALLOC=FRAMES` traces its
allocations from the start. Its reports then also list the allocation sites
that hold the most memory and, from the second report on, the sites whose
memory grew most since the previous report, with up to FRAMES frames each.
Tracing slows the worker and adds to its memory, so it is for diagnosis:
a report took about 30 s in a small process, and had not finished after
10 minutes in a soak's 800 MB orchestration worker traced with 8 frames.
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
import tracemalloc
from collections.abc import Iterator
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
# Smaller objects are not listed, whatever their number.
LARGE_OBJECT_BYTES = 4096


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


def _walk(roots: list[object]) -> Iterator[object]:
    """Yield every object reachable from `roots`, each once.

    Objects without referents (numbers, text, bytes) are yielded each time
    they are reached, since remembering them all would take more memory
    than the report may add."""
    seen: set[int] = set()
    stack = list(roots)
    seen.update((id(seen), id(stack), id(roots)))
    while stack:
        obj = stack.pop()
        if isinstance(obj, int | float | str | bytes):
            yield obj
            continue
        key = id(obj)
        if key in seen:
            continue
        seen.add(key)
        yield obj
        stack.extend(gc.get_referents(obj))


def largest_objects() -> list[str]:
    """Return one line for each of the largest objects by `sys.getsizeof`,
    with where their referrers keep them.

    The objects are those reachable from the modules and from what the
    collector tracks. A worker freezes its startup objects, which the
    collector then no longer lists, so a module-level cache that grows is
    found only through its module."""
    roots: list[object] = [vars(m) for m in list(sys.modules.values())]
    roots += gc.get_objects()
    found: dict[int, tuple[int, object]] = {}
    for obj in _walk(roots):
        size = sys.getsizeof(obj, 0)
        if size >= LARGE_OBJECT_BYTES:
            found[id(obj)] = (size, obj)
    largest = sorted(found, key=lambda key: found[key][0], reverse=True)
    top = {key: found[key] for key in largest[:MAX_LARGEST_SHOWN]}
    found.clear()
    holders: dict[int, list[str]] = {key: [] for key in top}
    for container in _walk(roots):
        if isinstance(container, int | float | str | bytes):
            continue
        for referent in gc.get_referents(container):
            names = holders.get(id(referent))
            if names is not None and len(names) < MAX_REFERRERS_SHOWN:
                names.append(_referrer_name(container, referent))
    del roots
    return [
        f"  {size:>11} {_describe(obj)}; in: {', '.join(holders[key])}"
        for key, (size, obj) in top.items()
    ]


# Sites listed in each of the report's tracemalloc sections.
TRACED_SITES = 30

# This process's snapshot at its previous report, for the growth section.
_previous_snapshot: tracemalloc.Snapshot | None = None


def _format_site(stat: tracemalloc.Statistic | tracemalloc.StatisticDiff) -> str:
    return "\n".join(f"      {line.strip()}" for line in stat.traceback.format())


def traced_allocation_lines() -> list[str]:
    """Return the report's tracemalloc sections, or no lines when this
    process does not trace its allocations."""
    global _previous_snapshot
    if not tracemalloc.is_tracing():
        return []
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    traced, peak = tracemalloc.get_traced_memory()
    lines = [f"tracemalloc traced {traced} bytes, peak {peak} bytes"]
    lines.append(f"tracemalloc largest sites (top {TRACED_SITES})")
    for stat in snapshot.statistics("traceback")[:TRACED_SITES]:
        lines.append(f"  {stat.size} bytes in {stat.count} blocks")
        lines.append(_format_site(stat))
    if _previous_snapshot is not None:
        lines.append(
            f"tracemalloc growth since the previous report (top {TRACED_SITES})"
        )
        growth = snapshot.compare_to(_previous_snapshot, "traceback")
        for diff in growth[:TRACED_SITES]:
            lines.append(
                f"  {diff.size_diff:+} bytes, {diff.count_diff:+} blocks "
                f"(now {diff.size} bytes in {diff.count} blocks)"
            )
            lines.append(_format_site(diff))
    _previous_snapshot = snapshot
    return lines


def write_memory_report(folder: Path, label: str) -> Path:
    """Write one memory report of this process into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{label}-{os.getpid()}-{time.strftime('%H%M%S')}.txt"
    # Taken first, so that it leaves out what the report itself allocates.
    traced = traced_allocation_lines()
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    with path.open("w") as out:
        out.write(f"pid {os.getpid()} at {time.time():.0f}\n")
        out.write(f"threads {threading.active_count()}\n")
        out.write(f"gc objects {sum(counts.values())}\n")
        for name, count in counts.most_common(60):
            out.write(f"  {count:>9} {name}\n")
        out.write("largest objects (bytes by sys.getsizeof)\n")
        for line in largest_objects():
            out.write(line + "\n")
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
        for line in traced:
            out.write(line + "\n")
    return path


def report_on_signal(folder: Path, label: str) -> None:
    """Write a memory report and log its path (the SIGUSR1 handler)."""
    try:
        path = write_memory_report(folder, label)
    except OSError as error:
        logger.error("memory report of %s failed: %s", label, error)
        return
    logger.info("memory report of %s written to %s", label, path)
