"""`python -m workers --queue NAME [--queue NAME ...]`: one worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from app.db.migrate import upgrade
from app.logs import configure_logging
from app.processes import worker_identity
from app.settings import get_settings
from app.temporal.client import connect
from workers.registry import QUEUE_LIMITS
from workers.run import run_workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument(
        "--queue",
        action="append",
        choices=sorted(QUEUE_LIMITS),
        required=True,
        help="Task queue to poll; repeat for several queues in one process.",
    )
    parser.add_argument(
        "--connect-wait",
        type=float,
        default=60.0,
        help="Seconds to keep retrying while Temporal is not up yet.",
    )
    options = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    upgrade(settings.effective_database_url)

    async def run() -> None:
        client = await connect(
            settings,
            wait_seconds=options.connect_wait,
            identity=worker_identity(options.queue[0]),
        )
        await run_workers(client, settings, options.queue)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    code = main()
    # The workers have drained; skip interpreter finalization, during which
    # the SDK core's threads can still call into Python and abort the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
