"""The worker process that `python -m workers` runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvloop

from app.db.migrate import upgrade
from app.logs import configure_logging
from app.processes import worker_identity
from app.settings import settings_or_exit
from app.temporal.client import connect
from workers.allocator import jemalloc_loaded
from workers.malloc import fix_mmap_threshold, limit_malloc_arenas
from workers.registry import QUEUE_LIMITS
from workers.run import run_node_workers, run_workers, worker_audit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument(
        "--queue",
        action="append",
        choices=sorted(QUEUE_LIMITS),
        default=[],
        help="Task queue to poll; repeat for several queues in one process.",
    )
    parser.add_argument(
        "--neural-node",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="Run the worker of this neural cluster node (queue "
        "nexus-neural-NODE_ID); repeatable.",
    )
    parser.add_argument(
        "--connect-wait",
        type=float,
        default=60.0,
        help="Seconds to keep retrying while Temporal is not up yet.",
    )
    options = parser.parse_args(argv)
    if not options.queue and not options.neural_node:
        parser.error("give at least one --queue or --neural-node")
    settings = settings_or_exit()
    glibc_malloc = not jemalloc_loaded()
    if glibc_malloc:
        # Before the SDK core and the thread pools start their threads.
        limit_malloc_arenas(settings.worker_malloc_arena_max)
        fix_mmap_threshold(settings.worker_malloc_mmap_threshold)
    configure_logging(settings.log_level)
    python_objects = (
        "pymalloc"
        if os.environ.get("PYTHONMALLOC", "pymalloc").startswith("pymalloc")
        else f"PYTHONMALLOC={os.environ['PYTHONMALLOC']}"
    )
    logging.getLogger(__name__).info(
        "memory allocator: %s, Python objects: %s",
        "glibc malloc" if glibc_malloc else "jemalloc",
        python_objects,
    )
    upgrade(settings.effective_database_url)
    if options.neural_node:
        # Imported here, because it loads JAX, which the other queues'
        # workers do not need.
        from workers.neural_nodes import node_problem
    for node_id in options.neural_node:
        # A worker for a node that does not exist, or no longer trains,
        # would poll a queue that no session ever uses.
        problem = node_problem(settings, node_id)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 1

    async def run() -> None:
        client = await connect(
            settings,
            wait_seconds=options.connect_wait,
            identity=worker_identity(
                options.queue[0] if options.queue else f"node-{options.neural_node[0]}"
            ),
        )
        async with worker_audit(settings):
            if options.neural_node:
                await run_node_workers(
                    client, settings, options.queue, options.neural_node
                )
            else:
                await run_workers(client, settings, options.queue)

    # uvloop's faster wake-ups matter here, because a sandbox call crosses
    # the loop many times (SDK core to Python and back, the runner's socket
    # and pipes). An update running a local activity took about 8% less in
    # three alternated runs on the 2-core development machine.
    uvloop.run(run())
    return 0
