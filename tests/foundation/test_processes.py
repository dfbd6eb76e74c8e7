"""Process helpers that long-lived servers and workers call at startup."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.processes import (
    MAX_BACKOFF_SECONDS,
    STABLE_SECONDS,
    ManagedProcess,
    freeze_startup_objects,
)


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    # The test process goes on collecting as usual.
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen_after")
def test_freeze_collects_garbage_first() -> None:
    first, second = _Node(), _Node()
    first.peer, second.peer = second, first
    cycle = weakref.ref(first)
    del first, second
    freeze_startup_objects()
    # A frozen cycle would stay in memory for the life of the process.
    assert cycle() is None


@pytest.mark.usefixtures("unfrozen_after")
def test_freeze_keeps_live_objects_out() -> None:
    live = _Node()
    freeze_startup_objects()
    assert gc.get_freeze_count() > 0
    # Frozen objects are no longer in the generations a collection scans.
    assert not any(item is live for item in gc.get_objects())


class _Clock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _crashing_child(tmp_path: Path, clock: _Clock) -> ManagedProcess:
    # A real child that exits at once with code 3, as a worker does when its
    # database cannot be reached.
    return ManagedProcess(
        "crasher",
        [sys.executable, "-c", "raise SystemExit(3)"],
        log_path=tmp_path / "crasher.log",
        clock=clock,
    )


def _exited_pid(child: ManagedProcess) -> int:
    assert child.process is not None
    assert child.process.wait(30) == 3
    return child.process.pid


def test_crash_loop_never_gives_up(tmp_path: Path) -> None:
    clock = _Clock()
    child = _crashing_child(tmp_path, clock)
    child.start()
    pids = [_exited_pid(child)]
    started = clock.now
    for _ in range(15):
        child.poll_and_restart()
        if child.restart_at is not None:  # the first restart has no wait
            clock.now = child.restart_at
            child.poll_and_restart()
        pids.append(_exited_pid(child))
    assert len(set(pids)) == 16
    assert child.failures == 15
    # Restarted on, long after 5 restarts in a minute.
    assert clock.now - started > 5 * MAX_BACKOFF_SECONDS


def test_crash_loop_backs_off_up_to_cap(tmp_path: Path) -> None:
    clock = _Clock()
    child = _crashing_child(tmp_path, clock)
    child.start()
    first = _exited_pid(child)
    # The first exit is restarted at once.
    child.poll_and_restart()
    second = _exited_pid(child)
    assert second != first
    waits = []
    pid = second
    for _ in range(9):
        child.poll_and_restart()
        assert child.restart_at is not None
        waits.append(child.restart_at - clock.now)
        # Not restarted before its back-off has passed.
        clock.now = child.restart_at - 0.5
        child.poll_and_restart()
        assert _exited_pid(child) == pid
        clock.now = child.restart_at
        child.poll_and_restart()
        pid = _exited_pid(child)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]

    # A child that ran for a while before it exited starts again at once.
    clock.now += STABLE_SECONDS
    child.poll_and_restart()
    assert child.failures == 1
    assert _exited_pid(child) != pid
