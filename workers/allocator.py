"""The memory allocator of worker processes: glibc's malloc with pymalloc
(the default), or jemalloc, chosen with `NEXUS_WORKER_ALLOCATOR=jemalloc`.

With CPython's defaults a worker keeps memory that it no longer uses:
pymalloc returns an arena to the kernel only when every object in it is
freed, and glibc keeps free chunks that cover no whole page. jemalloc
hands freed pages back to the kernel on a timer (`dirty_decay_ms`), and
`PYTHONMALLOC=malloc` sends Python's small objects to it too. In a pair of
60-minute soaks it held the neural worker's RSS flat after the warm-up
(0.009 MB/min against 0.10 with glibc), but the orchestration worker grew
faster (0.24 against 0.12 MB/min), so it is not the default
(docs/benchmark.md).

Both must be in place before the interpreter starts, so a worker process
that should use jemalloc and does not yet runs itself again with
`LD_PRELOAD`, `PYTHONMALLOC` and `MALLOC_CONF` set. Only the standard
library is imported here, because the process may be replaced before it
does anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Environment variable of the allocator setting (`Settings.worker_allocator`),
# read here before the settings module is imported.
ALLOCATOR_VARIABLE = "NEXUS_WORKER_ALLOCATOR"

# jemalloc's options: a background thread purges freed pages, dirty pages
# are returned after 1 s and no pages are kept in the lazily-freed state.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"

# Set in the environment of the process run again, so a library that the
# dynamic loader could not preload does not make it run itself once more.
_RAN_AGAIN_VARIABLE = "NEXUS_WORKER_ALLOCATOR_EXEC"


def jemalloc_loaded() -> bool:
    """Return True when jemalloc is this process's malloc."""
    return hasattr(ctypes.CDLL(None), "mallctl")


def jemalloc_library() -> str | None:
    """Return the name of the installed jemalloc library, or None."""
    return ctypes.util.find_library("jemalloc")


def allocator_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """Return the environment to run this worker again with, or None to go
    on in this process: jemalloc is not wanted, is in use already, or is not
    installed (which is logged to stderr)."""
    if environ.get(ALLOCATOR_VARIABLE, "system") != "jemalloc":
        return None
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
    """Replace this process with the same command under jemalloc, when the
    setting requests jemalloc and this process does not use it yet."""
    environment = allocator_environment(dict(os.environ))
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
