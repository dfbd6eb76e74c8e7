"""Memory settings and tools of long-running workers: the malloc arena cap,
the periodic malloc_trim, the warm-up before polling, the SIGUSR1 report and
the Python heap reading that the benchmark sampler records."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.db import get_engine
from app.services import memory
from app.settings import Settings
from workers import allocator, malloc, memory_debug, warmup
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


class _Holder:
    pass


def test_memory_report_names_largest_objects(tmp_path: Path) -> None:
    # A dict of numbers only is not tracked by the collector, so the report
    # must find it among the referents of its holder.
    holder = _Holder()
    holder.cache = {index: index for index in range(200_000)}  # type: ignore[attr-defined]
    path = memory_debug.write_memory_report(tmp_path / "logs", "nexus-test")
    lines = path.read_text().split("largest objects")[1].splitlines()[1:]
    shown = lines[: memory_debug.MAX_LARGEST_SHOWN]
    assert all(line.startswith("  ") for line in shown)
    expected = "dict len 200000 first key 0; in: attribute 'cache' of a _Holder"
    assert any(expected in line for line in shown)


def _grow(kept: list[bytes]) -> None:
    kept.extend(bytes(1000) for _ in range(2000))


def test_memory_report_traces_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_debug, "_previous_snapshot", None)
    assert memory_debug.traced_allocation_lines() == []
    tracemalloc.start(3)
    try:
        first = memory_debug.traced_allocation_lines()
        kept: list[bytes] = []
        _grow(kept)
        second = memory_debug.traced_allocation_lines()
    finally:
        tracemalloc.stop()
    assert "tracemalloc largest sites (top 30)" in first
    assert not any("growth since the previous report" in line for line in first)
    header = next(
        i for i, line in enumerate(second) if "growth since the previous" in line
    )
    site, *rest = second[header + 1 :]
    frames = "\n".join(itertools.takewhile(lambda line: line[:6] == " " * 6, rest))
    # About 2 MB in the 2,000 bytes objects of _grow, and sometimes one more
    # block there: the list's own buffer, grown by the same line.
    assert site.startswith("  +2")
    blocks = re.search(r"\+(\d+) blocks", site)
    assert blocks is not None, site
    assert int(blocks.group(1)) in (2000, 2001), site
    assert "kept.extend(bytes(1000)" in frames


def test_memory_report_failure_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.ERROR, logger="workers.memory_debug"):
        memory_debug.report_on_signal(blocker, "nexus-test")
    assert "memory report of nexus-test failed" in caplog.text


def test_python_heap_counts_small_objects(capfd: pytest.CaptureFixture[str]) -> None:
    before = memory.python_heap()
    malloc_before = memory.heap_usage()
    assert before is not None
    # Tuples of 64 bytes and their ints of 28 bytes come from pymalloc's
    # arenas; only the list's array of pointers is malloc's. Enough of them
    # to pass the free space that earlier tests left in the arenas, so that
    # new arenas are needed.
    free = before.arenas * 2**20 - before.used
    count = max(200_000, (free + 4 * 2**20) // 64)
    objects = [(i, i + 1, i + 2) for i in range(count)]
    after = memory.python_heap()
    malloc_after = memory.heap_usage()
    assert after is not None
    python_growth = after.used - before.used
    assert python_growth >= count * 64
    assert after.arenas > before.arenas
    if malloc_before is not None and malloc_after is not None:
        assert malloc_after[1] - malloc_before[1] < python_growth / 2
    assert len(objects) == count
    # The statistics went to a memory stream, not to this process's stderr.
    # Other threads of the test process, such as the SDK's core, may still
    # write their own lines there.
    assert "arenas allocated" not in capfd.readouterr().err


def test_python_heap_without_pymalloc_is_none() -> None:
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.services.memory import python_heap; print(python_heap())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def test_python_heap_without_symbols_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_stats_reader", lambda: None)
    assert memory.python_heap() is None
    assert memory.read_memory().python_heap_used is None


def test_memory_reading_has_python_heap() -> None:
    reading = memory.read_memory()
    assert reading.python_heap_used is not None
    assert reading.python_heap_used > 0
    assert reading.python_arenas is not None
    assert reading.python_arenas >= 1


JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


@glibc_only
@pytest.mark.skipif(not JEMALLOC.exists(), reason="needs Debian's libjemalloc2")
def test_python_heap_with_preloaded_allocator() -> None:
    # An operator may preload another malloc into the workers; the memory
    # stream's buffer then comes from it and must go back to it.
    env = {**os.environ, "LD_PRELOAD": str(JEMALLOC)}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.services.memory import python_heap\n"
            "for _ in range(50):\n"
            "    heap = python_heap()\n"
            "print(heap.arenas > 0 and heap.used > 0)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_allocator_environment_for_jemalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "libjemalloc.so.2")
    chosen = {"NEXUS_WORKER_ALLOCATOR": "jemalloc"}
    environment = allocator.allocator_environment(
        {**chosen, "LD_PRELOAD": "libother.so"}
    )
    assert environment is not None
    assert environment["LD_PRELOAD"] == "libjemalloc.so.2 libother.so"
    assert environment["PYTHONMALLOC"] == "malloc"
    assert environment["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    # The user's own values are kept.
    mine = allocator.allocator_environment(
        {**chosen, "PYTHONMALLOC": "debug", "MALLOC_CONF": "narenas:1"}
    )
    assert mine is not None
    assert mine["PYTHONMALLOC"] == "debug"
    assert mine["MALLOC_CONF"] == "narenas:1"


def test_allocator_environment_keeps_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "libjemalloc.so.2")
    chosen = {"NEXUS_WORKER_ALLOCATOR": "jemalloc"}
    assert allocator.allocator_environment({}) is None
    assert allocator.allocator_environment({"NEXUS_WORKER_ALLOCATOR": "system"}) is None
    assert capsys.readouterr().err == ""
    # Run again already, and the library still did not load: no loop.
    ran_again = allocator.allocator_environment(
        {**chosen, "FLOW_NEXUS_ALLOCATOR_RAN_AGAIN": "1"}
    )
    assert ran_again is None
    assert "jemalloc could not be preloaded" in capsys.readouterr().err
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert allocator.allocator_environment(chosen) is None
    assert "apt-get install libjemalloc2" in capsys.readouterr().err
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: True)
    assert allocator.allocator_environment(chosen) is None


def test_allocator_setting_per_queue() -> None:
    setting = "system, nexus-orchestration = GLIBC,nexus-neural=jemalloc"
    assert allocator.parse_allocator_setting(setting) == (
        "system",
        {"nexus-orchestration": "glibc", "nexus-neural": "jemalloc"},
    )
    node = "system,nexus-neural-n1=glibc"
    assert allocator.chosen_allocator(node, ["nexus-neural-n1"]) == "glibc"
    assert allocator.chosen_allocator(setting, ["nexus-orchestration"]) == "glibc"
    # A process of several queues takes its first queue's allocator.
    both = ["nexus-sandbox", "nexus-orchestration"]
    assert allocator.chosen_allocator(setting, both) == "system"
    assert allocator.chosen_allocator("glibc", []) == "glibc"
    argv = ["--queue", "nexus-neural", "--queue=nexus-sandbox", "--connect-wait", "1"]
    assert allocator.process_queues(argv) == ["nexus-neural", "nexus-sandbox"]
    nodes = ["--neural-node", "n1", "--neural-node=n2"]
    assert allocator.process_queues(nodes) == ["nexus-neural-n1", "nexus-neural-n2"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("tcmalloc", "entry 'tcmalloc' names no allocator"),
        ("system,glibc", "entry 'glibc' has no queue"),
        ("=glibc", "entry '=glibc' has no queue"),
        ("system,", "has an empty entry"),
        ("system,nexus-orch=glibc", "entry 'nexus-orch=glibc' names an unknown queue"),
        ("a=b=glibc", "entry 'a=b=glibc' names an unknown queue"),
        ("nexus-neural-=glibc", "names an unknown queue"),
        (
            "system,nexus-neural=glibc,nexus-neural=system",
            "names queue 'nexus-neural' twice",
        ),
    ],
)
def test_allocator_setting_rejected(setting: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allocator.parse_allocator_setting(setting)
    with pytest.raises(ValidationError, match=message):
        Settings(worker_allocator=setting)
    # The worker goes on in this process and the settings check names it.
    assert allocator.allocator_environment({"NEXUS_WORKER_ALLOCATOR": setting}) is None


def test_default_allocator_per_queue() -> None:
    # By default the orchestration worker alone takes glibc for Python objects.
    orchestration = allocator.allocator_environment({}, ["nexus-orchestration"])
    assert orchestration is not None
    assert orchestration["PYTHONMALLOC"] == "malloc"
    for queue in ("nexus-neural", "nexus-sandbox", "nexus-streaming"):
        assert allocator.allocator_environment({}, [queue]) is None
    assert Settings().worker_allocator == allocator.DEFAULT_SETTING


def test_allocator_environment_for_glibc() -> None:
    chosen = {"NEXUS_WORKER_ALLOCATOR": "jemalloc,nexus-streaming=glibc"}
    environment = allocator.allocator_environment(chosen, ["nexus-streaming"])
    assert environment is not None
    assert environment["PYTHONMALLOC"] == "malloc"
    assert "LD_PRELOAD" not in environment
    # Run again, or the user's own value: no second run.
    assert allocator.allocator_environment(environment, ["nexus-streaming"]) is None
    mine = {**chosen, "PYTHONMALLOC": "debug"}
    assert allocator.allocator_environment(mine, ["nexus-streaming"]) is None


def _worker_maps(
    environment: dict[str, str], loaded: str, stderr: Path | None = None
) -> tuple[str, str]:
    """Start a worker process that cannot reach Temporal, wait until its
    memory map names `loaded`, and return its map and environment. With
    `stderr`, its stderr goes to that file, and the wait lasts until the
    worker has logged its allocator there too."""
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "--queue", "nexus-streaming"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if stderr is None else stderr.open("w"),
    )
    if stderr is not None:
        deadline = time.monotonic() + 120
        while "memory allocator" not in stderr.read_text():
            assert process.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the allocator was never logged"
            time.sleep(0.2)
    try:
        maps = ""
        deadline = time.monotonic() + 120
        while loaded not in maps:
            assert process.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, f"{loaded} never loaded"
            time.sleep(0.2)
            maps = Path(f"/proc/{process.pid}/maps").read_text()
        environ = Path(f"/proc/{process.pid}/environ").read_text()
        return maps, environ
    finally:
        process.kill()
        process.wait(30)


def _unreachable_worker_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env.update(
        NEXUS_DATA_DIR=str(tmp_path),
        NEXUS_TEMPORAL_ADDRESS=f"127.0.0.1:{closed}",
        NEXUS_WORKER_WARM_UP="false",
    )
    env.pop("LD_PRELOAD", None)
    env.pop("PYTHONMALLOC", None)
    return env


@pytest.mark.skipif(not JEMALLOC.exists(), reason="needs Debian's libjemalloc2")
def test_worker_runs_under_jemalloc(tmp_path: Path) -> None:
    environment = _unreachable_worker_env(tmp_path)
    environment["NEXUS_WORKER_ALLOCATOR"] = "jemalloc"
    # The SDK's native module loads after the allocator choice.
    maps, environ = _worker_maps(environment, "temporal_sdk_bridge")
    assert "libjemalloc" in maps
    assert "PYTHONMALLOC=malloc\0" in environ


def test_worker_of_glibc_queue_runs_again(tmp_path: Path) -> None:
    environment = _unreachable_worker_env(tmp_path)
    environment["NEXUS_WORKER_ALLOCATOR"] = "system,nexus-streaming=glibc"
    environment["NEXUS_LOG_LEVEL"] = "INFO"
    stderr = tmp_path / "stderr.txt"
    maps, environ = _worker_maps(environment, "temporal_sdk_bridge", stderr)
    assert "libjemalloc" not in maps
    assert "PYTHONMALLOC=malloc\0" in environ
    logged = stderr.read_text()
    assert "Python objects: PYTHONMALLOC=malloc" in logged
    # The marker of the second run is not taken for a mistyped setting.
    assert "unknown setting" not in logged


def test_worker_on_system_allocator(tmp_path: Path) -> None:
    # The default.
    environment = _unreachable_worker_env(tmp_path)
    maps, environ = _worker_maps(environment, "temporal_sdk_bridge")
    assert "libjemalloc" not in maps
    assert "PYTHONMALLOC=" not in environ


@pytest.mark.skipif(not JEMALLOC.exists(), reason="needs Debian's libjemalloc2")
def test_heap_read_from_jemalloc() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.services.memory import heap_usage\n"
            "before = heap_usage()[1]\n"
            "blocks = [bytes(1000) for _ in range(100_000)]\n"
            "after = heap_usage()[1]\n"
            "del blocks\n"
            "print(after - before, heap_usage()[1] - before)",
        ],
        env={**os.environ, "LD_PRELOAD": str(JEMALLOC), "PYTHONMALLOC": "malloc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    grown, left = (int(value) for value in done.stdout.split())
    # 100,000 objects of about 1 KB each, all freed again.
    assert grown >= 100_000_000
    assert left < 10_000_000
