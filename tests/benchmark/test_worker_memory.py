"""Memory settings and tools of long-running workers: the malloc arena cap,
the periodic malloc_trim, the warm-up before polling and the SIGUSR1 report."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from app.db import get_engine
from workers import malloc, memory_debug, warmup
from workers.registry import QUEUE_LIMITS, QUEUE_WARM_UPS

glibc_only = pytest.mark.skipif(
    malloc._libc() is None, reason="needs glibc's mallopt and malloc_trim"
)


@glibc_only
def test_arena_cap_accepts_positive_count() -> None:
    assert malloc.limit_malloc_arenas(8) is True
    assert malloc.limit_malloc_arenas(0) is False


@glibc_only
def test_mmap_threshold_accepts_size() -> None:
    assert malloc.fix_mmap_threshold(128 * 1024) is True
    assert malloc.fix_mmap_threshold(0) is False


@glibc_only
def test_trim_releases_freed_blocks() -> None:
    # 64 KiB blocks come from the heap (below the 128 KiB mmap threshold).
    # Freeing every other one leaves free pages between live blocks, which
    # free() cannot return by itself but malloc_trim can.
    blocks = [bytearray(64 * 1024) for _ in range(1000)]
    live_blocks = blocks[1::2]
    del blocks
    assert malloc.trim_malloc() is True
    assert len(live_blocks) == 500


async def test_trim_loop_stops_on_event(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(malloc, "trim_malloc", lambda: calls.append(1) or True)
    monkeypatch.setattr(malloc, "_libc", lambda: object())
    stop = asyncio.Event()
    loop = asyncio.create_task(malloc.trim_malloc_every(0.01, stop))
    while len(calls) < 3:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(loop, timeout=5)
    assert loop.done()
    assert loop.exception() is None


def test_warm_up_imports_modules_and_skips_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sys.modules.pop("colorsys", None)
    with caplog.at_level(logging.INFO, logger="workers.warmup"):
        warmup.warm_up("nexus-test", ["colorsys", "no_such_module_for_warm_up"], [])
    assert "colorsys" in sys.modules
    assert "cannot import no_such_module_for_warm_up" in caplog.text
    assert "warm-up of nexus-test took" in caplog.text


def test_warm_up_plans_name_known_queues_and_steps() -> None:
    for queue, plan in QUEUE_WARM_UPS.items():
        assert queue in QUEUE_LIMITS
        for step in plan.steps:
            assert step in warmup.WARM_UPS


def test_jax_warm_up_runs() -> None:
    warmup.start_jax_backend()
    import jax

    assert jax.devices()


def test_memory_report_has_every_section(tmp_path: Path) -> None:
    get_engine(f"sqlite:///{tmp_path / 'report.db'}")
    path = memory_debug.write_memory_report(tmp_path / "logs", "nexus-test")
    text = path.read_text()
    assert path.parent == tmp_path / "logs"
    assert "gc objects" in text
    assert "\nmodules " in text
    assert "sys._debugmallocstats" in text
    # pymalloc's statistics reached the file, not the test's stderr.
    assert "arenas allocated current" in text
    if malloc._libc() is not None:
        assert "uordblks" in text
    if memory_debug.sqlite_memory_used() is not None:
        assert "sqlite3_memory_used" in text
    assert f"sqlalchemy compiled cache 0 entries (sqlite:///{tmp_path}" in text


def test_memory_report_failure_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.ERROR, logger="workers.memory_debug"):
        memory_debug.report_on_signal(blocker, "nexus-test")
    assert "memory report of nexus-test failed" in caplog.text
