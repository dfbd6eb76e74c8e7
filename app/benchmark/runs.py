"""The benchmark runs open on a Temporal server, for the rule that one run
goes at a time: each would measure the other's load as its own."""

from __future__ import annotations

import asyncio
from datetime import datetime

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from app.benchmark import recording

_BENCHMARK_RUNNING = (
    'WorkflowType="ExtendedDurationBenchmarkWorkflow" AND ExecutionStatus="Running"'
)


async def open_benchmarks(client: Client) -> list[tuple[datetime, str]]:
    """Return the start time and id of each benchmark run open on the server,
    oldest first. The start time is that of the run's current execution,
    which a continue-as-new moves on.

    The visibility store can list a run as Running for a moment after it has
    closed, so each listed run is confirmed from its own state."""
    runs = [
        (execution.start_time, execution.id)
        async for execution in client.list_workflows(_BENCHMARK_RUNNING)
    ]
    open_runs = []
    for start_time, run_id in sorted(runs):
        try:
            described = await client.get_workflow_handle(run_id).describe()
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                continue  # removed since it was listed
            raise
        if described.status == WorkflowExecutionStatus.RUNNING:
            open_runs.append((start_time, run_id))
    return open_runs


async def running_benchmarks(client: Client) -> list[str]:
    """Return the ids of the benchmark runs open on the server, oldest first."""
    return [run_id for _, run_id in await open_benchmarks(client)]


async def runs_in_the_way(client: Client, url: str, run_id: str) -> list[str]:
    """Return the open benchmark runs that keep run `run_id` from starting.

    A run in the way has passed its first step (its row in `url` has the
    status `running`), or is in that step too and started before this one.
    Two scheduled runs that start at the same moment therefore agree on
    which of them goes on. A run past its first step can have continued as
    new, so its start time decides nothing.

    NOTE: a run that this one does not see yet in the visibility store is
    not in the way, so two runs started within that lag can both pass this
    check. The claim in `benchmark_claims` then decides between runs that
    record to the same database, but two runs on different databases can
    both go on.
    """
    open_runs = await open_benchmarks(client)
    own = next((start for start, other in open_runs if other == run_id), None)
    if own is None:
        own = await _start_time(client, run_id)
    in_the_way = []
    for start, other in open_runs:
        if other == run_id:
            continue
        try:
            status = await asyncio.to_thread(recording.run_status, url, other)
        except LookupError:
            status = None  # in its first step, or on another database
        if status == "running" or own is None or (start, other) < (own, run_id):
            in_the_way.append(other)
    return in_the_way


async def _start_time(client: Client, run_id: str) -> datetime | None:
    """Return the start time of run `run_id` from its own state, which does
    not lag like the visibility store; None when the server has no such run."""
    try:
        described = await client.get_workflow_handle(run_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return described.start_time
