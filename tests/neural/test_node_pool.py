"""The pool of embedded neural node workers while its database is down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from temporalio.client import Client

from app.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, PostgresHandle, postgres_stopped
from workers.neural_nodes import NodeWorkerPool


async def wait_until(condition: Callable[[], bool], description: str) -> None:
    """Poll `condition` until it is true, for up to 60 s."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting until {description}")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_pool_outage_logs_traceback_once(
    database_url: str,
    restartable: PostgresHandle,
    client: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
    )
    caplog.set_level(logging.INFO, logger="workers.neural_nodes")
    pool = NodeWorkerPool(client, settings, interval=0.05)
    outcomes: list[bool] = []
    sync = pool.sync

    async def counted_sync() -> None:
        try:
            await sync()
        except Exception:
            outcomes.append(False)
            raise
        outcomes.append(True)

    pool.sync = counted_sync  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(pool.run(stop))
    try:
        async with postgres_stopped(restartable):
            await wait_until(lambda: outcomes.count(False) >= 5, "5 failed syncs")
        await wait_until(lambda: outcomes[-1], "a sync worked")
    finally:
        stop.set()
        await running
    records = [r for r in caplog.records if r.name == "workers.neural_nodes"]
    tracebacks = [r for r in records if r.exc_info is not None]
    recovered = [r.getMessage() for r in records if "works again" in r.getMessage()]
    assert len(tracebacks) == 1
    assert tracebacks[0].getMessage() == (
        "the sync of neural node workers failed; retrying"
    )
    assert len(recovered) == 1
    assert recovered[0].startswith("the sync of neural node workers works again")
