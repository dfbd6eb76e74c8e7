"""The source of a running activity's cancel: its worker's shutdown or the
server."""

from __future__ import annotations

import asyncio

from temporalio import activity


def current_task_cancelling() -> bool:
    """Return whether the running asyncio task is being cancelled.

    The Temporal client raises `WorkflowUpdateRPCTimeoutOrCancelledError`
    both when its caller is cancelled and when the update's RPC deadline
    passes. This tells the two apart."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def cancelled_by_worker_shutdown() -> bool:
    """Return whether the current activity was cancelled by its own worker's
    shutdown rather than by the server (a cancel request, a closed workflow,
    a timeout). False outside an activity.

    A worker that shuts down waits its `graceful_shutdown_timeout`, then
    cancels the activities still running, and the server retries them on
    another worker. The cancel's details mark that case. A cancel without
    details did not come through the worker, so it counts as a shutdown
    only while one is in progress.
    """
    if not activity.in_activity():
        return False
    details = activity.cancellation_details()
    if details is not None:
        return details.worker_shutdown
    return activity.is_worker_shutdown()
