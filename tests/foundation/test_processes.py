"""Process helpers that long-lived servers and workers call at startup."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.processes import freeze_startup_objects


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
