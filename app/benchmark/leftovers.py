"""Clean-up after a benchmark run cut short in its orchestration phase: the
phase's `FlowNexusWorkflow` executions left open, and the swarms that their
swarm steps created.

The phase starts those executions through `workflow_execute`, not as child
workflows, so the run's cancellation does not reach them when the worker
that waits on them is gone (a second Ctrl-C, a killed process). They then
run on at the next start of the workers, and a swarm step whose worker
died leaves its swarms, with an agent sandbox each, until their timeout.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from app.services.audit import list_calls
from app.settings import Settings

logger = logging.getLogger(__name__)


_OPEN_EXECUTIONS = 'WorkflowType = "FlowNexusWorkflow" AND ExecutionStatus = "Running"'


def phase_executions_query(run_id: str) -> str:
    """Return the visibility query of a run's open orchestration executions,
    whose definitions the phase names `benchmark-orchestration-<run id>-<cycle>`."""
    return (
        f"{_OPEN_EXECUTIONS} AND "
        f'NexusDefinitionName STARTS_WITH "benchmark-orchestration-{run_id}-"'
    )


def definition_executions_query(name: str) -> str:
    """Return the visibility query of the open executions of definition `name`."""
    return f'{_OPEN_EXECUTIONS} AND NexusDefinitionName = "{name}"'


async def cancel_executions(client: Client, query: str) -> list[str]:
    """Request cancellation of every execution that `query` lists, and
    return their ids.

    NOTE: the visibility store lists an execution a moment after its start,
    so one started just before this call can be missed."""
    executions = [execution.id async for execution in client.list_workflows(query)]
    for execution_id in executions:
        try:
            await client.get_workflow_handle(execution_id).cancel()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            # It closed after it was listed.
    return executions


def swarms_started_by(database_url: str, execution_id: str) -> list[str]:
    """Return the swarms that an execution's steps created, from the audit
    log: a step's tool calls run as user `workflow:<execution id>/<step>`
    (`workflow:<execution id>` before steps had users of their own), and the
    audit row of a `swarm_init` is written before its result returns, so a
    swarm is found even when its step died right after."""
    user = f"workflow:{execution_id}"
    calls = list_calls(database_url, user_prefix=user, tool="swarm_init", limit=10_000)
    own = [c for c in calls if c.user_id == user or c.user_id.startswith(f"{user}/")]
    return [
        call.ids["swarm_id"]
        for call in own
        if call.outcome == "success" and "swarm_id" in call.ids
    ]


async def end_phase_leftovers(
    client: Client, settings: Settings, run_id: str
) -> tuple[list[str], list[str]]:
    """Cancel run `run_id`'s open orchestration executions and destroy the
    active swarms that they created. Return the ids of both."""
    executions = await cancel_executions(client, phase_executions_query(run_id))
    created: list[str] = []
    for execution_id in executions:
        created += await asyncio.to_thread(
            swarms_started_by, settings.effective_database_url, execution_id
        )
    if not created:
        return executions, []
    # Imported here: the tools load every capability, which `nexus benchmark`
    # does not need for anything else.
    from app.tools import ToolContext, ToolError, invoke_tool, load_tools

    load_tools()
    ctx = ToolContext(
        settings, user_id=f"benchmark:{run_id}:clean-up", temporal_client=client
    )
    listed = await invoke_tool(ctx, "swarm_list", {"status": "active"})
    active = {swarm["swarm_id"] for swarm in listed["swarms"]}
    destroyed = []
    for swarm_id in created:
        if swarm_id not in active:
            continue  # destroyed by its step, or by the cancel just sent
        try:
            await invoke_tool(ctx, "swarm_destroy", {"swarm_id": swarm_id})
        except ToolError as error:
            logger.warning(
                "swarm_destroy of swarm %s, left by benchmark run %s, failed: %s",
                swarm_id,
                run_id,
                error.message,
            )
            continue
        destroyed.append(swarm_id)
    return executions, destroyed
