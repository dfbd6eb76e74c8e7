"""The memory allocator of worker processes, chosen with
`NEXUS_WORKER_ALLOCATOR`: `system` (glibc's malloc with pymalloc), `glibc`
(glibc's malloc for Python's objects too) or `jemalloc`, for every worker
or per task queue (the default, `system,nexus-orchestration=glibc`).

With CPython's defaults a worker keeps memory that it no longer uses:
pymalloc returns an arena to the kernel only when every object in it is
freed, and glibc keeps free chunks that cover no whole page. jemalloc
hands freed pages back to the kernel on a timer (`dirty_decay_ms`), and
`PYTHONMALLOC=malloc` sends Python's small objects to it too. In a pair of
60-minute soaks it held the neural worker's RSS flat after the warm-up
(0.009 MB/min against 0.10 with glibc), but the orchestration worker grew
faster (0.24 against 0.12 MB/min), so it is not the default
(docs/benchmark.md). `glibc` halved the orchestration worker's growth
after the warm-up in another pair, but raised the sandbox worker's almost
fourfold, hence the choice per queue.

Both must be in place before the interpreter starts, so a worker process
whose allocator differs from the one it runs with runs itself again with
`PYTHONMALLOC` (and for jemalloc `LD_PRELOAD` and `MALLOC_CONF`) set. Only
the standard library and the queue names are imported here, because the
process may be replaced before it does anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from app.contracts.queues import ALL_QUEUES, NEURAL_NODE_PREFIX

# Environment variable of the allocator setting (`Settings.worker_allocator`),
# read here before the settings module is imported.
ALLOCATOR_VARIABLE = "NEXUS_WORKER_ALLOCATOR"

# jemalloc's options: a background thread purges freed pages, dirty pages
# are returned after 1 s and no pages are kept in the lazily-freed state.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"

# Set in the environment of the process run again, so a library that the
# dynamic loader could not preload does not make it run itself once more.
# Outside the NEXUS_ names, which the settings check warns about when unknown.
_RAN_AGAIN_VARIABLE = "FLOW_NEXUS_ALLOCATOR_RAN_AGAIN"

ALLOCATORS = ("system", "glibc", "jemalloc")

# The setting's default. In two pairs of 60-minute soaks, glibc for Python's
# objects gave the orchestration worker, the one that grows most, 0.140 and
# 0.132 MB/min of RSS growth against 0.196 and 0.170 with pymalloc. The
# neural worker was lower in one pair and higher in the other, and the
# sandbox worker grew faster, so they keep pymalloc (docs/benchmark.md).
DEFAULT_SETTING = "system,nexus-orchestration=glibc"


def _known_queue(queue: str) -> bool:
    return queue in ALL_QUEUES or (
        queue.startswith(NEURAL_NODE_PREFIX) and len(queue) > len(NEURAL_NODE_PREFIX)
    )


def parse_allocator_setting(value: str) -> tuple[str, dict[str, str]]:
    """Return the default allocator and the allocator of each named queue of
    a setting such as `system` or `system,nexus-orchestration=glibc`.

    Raises ValueError with a message that names the bad entry and the fix.
    """
    example = "system,nexus-orchestration=glibc"
    default = "system"
    per_queue: dict[str, str] = {}
    for position, raw in enumerate(value.split(",")):
        entry = raw.strip()
        if not entry:
            raise ValueError(
                f"{ALLOCATOR_VARIABLE}={value!r} has an empty entry: separate "
                f"entries with one comma, as in {example}"
            )
        has_queue = "=" in entry
        queue, _, choice = (part.strip() for part in entry.rpartition("="))
        choice = choice.lower()
        if choice not in ALLOCATORS:
            raise ValueError(
                f"{ALLOCATOR_VARIABLE} entry {entry!r} names no allocator: use "
                f"one of {', '.join(ALLOCATORS)}, alone or as QUEUE=ALLOCATOR "
                f"after a comma ({example})"
            )
        if not has_queue and position == 0:
            default = choice
        elif not has_queue or not queue:
            raise ValueError(
                f"{ALLOCATOR_VARIABLE} entry {entry!r} has no queue: only the "
                "first entry is a bare allocator, the others are QUEUE=ALLOCATOR"
            )
        elif not _known_queue(queue):
            raise ValueError(
                f"{ALLOCATOR_VARIABLE} entry {entry!r} names an unknown queue: "
                f"use one of {', '.join(ALL_QUEUES)}, or "
                f"{NEURAL_NODE_PREFIX}NODE_ID for a neural cluster node"
            )
        elif queue in per_queue:
            raise ValueError(
                f"{ALLOCATOR_VARIABLE} names queue {queue!r} twice: give each "
                "queue one allocator"
            )
        else:
            per_queue[queue] = choice
    return default, per_queue


def process_queues(argv: list[str]) -> list[str]:
    """Return the task queues that a worker's arguments name: `--queue NAME`
    and `--neural-node NODE_ID`, whose queue is nexus-neural-NODE_ID."""
    queues = []
    options = {"--queue": "", "--neural-node": NEURAL_NODE_PREFIX}
    for index, argument in enumerate(argv):
        name, equals, inline = argument.partition("=")
        if name not in options:
            continue
        if equals:
            queues.append(options[name] + inline)
        elif index + 1 < len(argv):
            queues.append(options[name] + argv[index + 1])
    return queues


def chosen_allocator(setting: str, queues: list[str]) -> str:
    """Return the allocator of a worker process polling `queues`: that of
    its first queue, since one process has one allocator."""
    default, per_queue = parse_allocator_setting(setting)
    return per_queue.get(queues[0], default) if queues else default


def jemalloc_loaded() -> bool:
    """Return True when jemalloc is this process's malloc."""
    return hasattr(ctypes.CDLL(None), "mallctl")


def jemalloc_library() -> str | None:
    """Return the name of the installed jemalloc library, or None."""
    return ctypes.util.find_library("jemalloc")


def allocator_environment(
    environ: dict[str, str], queues: list[str] | None = None
) -> dict[str, str] | None:
    """Return the environment to run a worker of `queues` again with, or
    None to go on in this process: the chosen allocator is in use already,
    or jemalloc is chosen and not installed (which is logged to stderr).
    A setting that cannot be read is left to the settings check, which
    names it."""
    try:
        setting = environ.get(ALLOCATOR_VARIABLE, DEFAULT_SETTING)
        choice = chosen_allocator(setting, queues or [])
    except ValueError:
        return None
    if choice == "system":
        return None
    if choice == "glibc":
        if environ.get("PYTHONMALLOC") or environ.get(_RAN_AGAIN_VARIABLE):
            # Set already, by this module or by the user (`debug`, say).
            return None
        return {**environ, "PYTHONMALLOC": "malloc", _RAN_AGAIN_VARIABLE: "1"}
    if jemalloc_loaded():
        return None
    if environ.get(_RAN_AGAIN_VARIABLE):
        sys.stderr.write(
            f"warning: jemalloc could not be preloaded (LD_PRELOAD="
            f"{environ.get('LD_PRELOAD', '')!r}), so this worker uses glibc's "
            "malloc\n"
        )
        return None
    library = jemalloc_library()
    if library is None:
        sys.stderr.write(
            "warning: jemalloc is not installed (Debian: apt-get install "
            f"libjemalloc2), so this worker uses glibc's malloc; set "
            f"{ALLOCATOR_VARIABLE}=system to choose that without this warning\n"
        )
        return None
    preload = environ.get("LD_PRELOAD", "")
    return {
        **environ,
        "LD_PRELOAD": f"{library} {preload}".strip(),
        # A value set by the user, such as `debug`, is kept.
        "PYTHONMALLOC": environ.get("PYTHONMALLOC", "malloc"),
        "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF),
        _RAN_AGAIN_VARIABLE: "1",
    }


def exec_with_allocator() -> None:
    """Replace this process with the same command under the allocator that
    the setting chooses for its queues, when it does not use it yet."""
    environment = allocator_environment(dict(os.environ), process_queues(sys.argv[1:]))
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
