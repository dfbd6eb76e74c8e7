"""Tasks that run on one named swarm agent: how a workflow step assigned to
an agent runs (`sandbox_execution` steps)."""

from __future__ import annotations

import asyncio
import hashlib

from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from app.contracts.swarm import TaskProgress, TaskRecord, TaskSpec, TaskWork

UPDATE_RETRY_SECONDS = 60.0


class AgentTaskError(Exception):
    """Submission to the agent's swarm failed; the message gives the reason."""


def step_task_id(swarm_id: str, execution_id: str, step: str) -> str:
    """Return a task id fixed by the swarm, execution and step, so a retried
    activity finds the task its first attempt submitted. It has the form of
    `service.new_task_id`."""
    digest = hashlib.sha256(f"{execution_id}/{step}".encode()).hexdigest()
    return f"task_{swarm_id}_{digest[:8]}"


async def run_on_agent(
    client: Client, swarm_id: str, agent_id: str, task_id: str, work: TaskWork
) -> TaskProgress:
    """Submit `work` as a task of `swarm_id` pinned to `agent_id` and wait for
    its end.

    Raises:
        AgentTaskError: the swarm rejected the task (the agent left, the swarm
            is destroyed) or cannot be reached.
    """
    spec = TaskSpec(
        task_id=task_id, work=work, strategy="parallel", max_agents=1, agent_id=agent_id
    )
    handle = client.get_workflow_handle(f"swarm-{swarm_id}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UPDATE_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            record = await handle.execute_update(
                "submit_task", spec, id=f"submit-{task_id}", result_type=TaskRecord
            )
            break
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            message = cause.message if isinstance(cause, ApplicationError) else cause
            raise AgentTaskError(
                f"swarm {swarm_id} rejected the task: {message}"
            ) from None
        except RPCError as error:
            # The server admits a bounded number of in-flight updates per
            # workflow, and returns RESOURCE_EXHAUSTED to the others.
            if error.status == RPCStatusCode.RESOURCE_EXHAUSTED and (
                loop.time() < deadline
            ):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if error.status == RPCStatusCode.NOT_FOUND:
                # The update reached a closed swarm workflow.
                raise AgentTaskError(
                    f"swarm {swarm_id} was destroyed or has ended, so its agents "
                    "take no more tasks; resolve the step to an agent of an "
                    "active swarm"
                ) from None
            raise AgentTaskError(
                f"swarm {swarm_id} cannot take tasks: {error.message}"
            ) from None
    task = client.get_workflow_handle(record.workflow_id, result_type=TaskProgress)
    return await task.result()
