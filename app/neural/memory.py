"""Release the memory that training caches hold in this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import socket

import psutil

from app.contracts.neural import MemoryCleanupReport
from app.neural.data import clear_dataset_cache
from app.neural.distributed import clear_session_data
from app.neural.training import clear_compiled


def _trim_heap() -> None:
    # glibc keeps freed pages in its arenas; malloc_trim hands them back, so
    # the RSS drop is visible.
    name = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if function is not None:
        function(0)


def cleanup(task_queue: str) -> MemoryCleanupReport:
    """Clear compiled functions (`jax.clear_caches`), cached trainers and data
    sets, and measure RSS before and after."""
    process = psutil.Process()
    before = process.memory_info().rss
    trainers = clear_compiled()
    datasets = clear_dataset_cache() + clear_session_data()
    gc.collect()
    _trim_heap()
    after = process.memory_info().rss
    return MemoryCleanupReport(
        task_queue=task_queue,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        rss_before=before,
        rss_after=after,
        compiled_trainers_cleared=trainers,
        datasets_cleared=datasets,
    )
