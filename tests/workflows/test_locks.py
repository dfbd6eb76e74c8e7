"""The per-name definition lock, on SQLite and PostgreSQL, within one process
and across processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.workflows.locks import DefinitionBusyError, definition_lock

# Holds the lock of argv[2] in the database argv[1] until it is killed.
HOLDER = """
import asyncio, sys
from app.workflows.locks import definition_lock

async def main():
    async with definition_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_lock_excludes_a_second_holder(database_url: str) -> None:
    async with definition_lock(database_url, "one"):
        with pytest.raises(DefinitionBusyError) as caught:
            async with definition_lock(database_url, "one", wait=0.3):
                pass
        assert "workflow 'one' is being changed by another" in str(caught.value)
        assert "still held it after 0.3 s" in str(caught.value)
        async with definition_lock(database_url, "two", wait=0.3):
            pass
    async with definition_lock(database_url, "one", wait=0.3):
        pass


async def test_waiter_gets_lock_once_released(database_url: str) -> None:
    order: list[str] = []

    async def hold() -> None:
        async with definition_lock(database_url, "shared"):
            order.append("first in")
            await asyncio.sleep(0.3)
            order.append("first out")

    first = asyncio.create_task(hold())
    await asyncio.sleep(0.1)
    async with definition_lock(database_url, "shared", wait=5):
        order.append("second in")
    await first
    assert order == ["first in", "first out", "second in"]


async def test_cancelled_waiter_leaves_lock_free(database_url: str) -> None:
    async with definition_lock(database_url, "cancelled"):
        waiter = asyncio.create_task(
            definition_lock(database_url, "cancelled", wait=5).__aenter__()
        )
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    await asyncio.sleep(0.1)
    async with definition_lock(database_url, "cancelled", wait=1):
        pass


async def test_lock_excludes_another_process(database_url: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, database_url, "crossed"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line == "held\n"
        with pytest.raises(DefinitionBusyError):
            async with definition_lock(database_url, "crossed", wait=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The lock ends with the process that held it.
    async with definition_lock(database_url, "crossed", wait=10):
        pass
