"""The local backend's output pipes: read to the end, capped, and closed
exactly once on either event loop."""

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from app.sandbox.local import _read_fd_capped

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


async def _read_then_open_pipe() -> tuple[int, tuple[int, int], tuple[str, int]]:
    loop = asyncio.get_running_loop()
    read, write = os.pipe()
    os.write(write, b"x" * 10)
    os.close(write)
    output = await _read_fd_capped(loop, read, 4)
    fresh = os.pipe()
    # A close still pending in the loop or in a finalizer would run here.
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)
    return read, fresh, output


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_pipe_closed_once_when_read_returns(run: Runner) -> None:
    read, fresh, output = run(_read_then_open_pipe())
    try:
        # The descriptor was closed when the read returned, so the next pipe
        # got its number, and no second close took that pipe away later.
        assert read in fresh
        for fd in fresh:
            os.fstat(fd)
    finally:
        for fd in fresh:
            os.close(fd)
    assert output == ("xxxx\n[output truncated: 6 bytes dropped]", 6)
