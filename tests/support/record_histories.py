"""Record the histories that replay tests check, from real runs.

Run with a dev server and workers up (`nexus up`):
    python -m tests.support.record_histories
"""

from __future__ import annotations

import asyncio
import uuid

from app.contracts.queues import ALL_QUEUES, ORCHESTRATION
from app.contracts.system import ProbeRequest
from app.settings import get_settings
from app.temporal.client import connect
from tests.support.replay import save_history
from workflows.system import SystemCheckResult, SystemCheckWorkflow


async def main() -> None:
    client = await connect(get_settings())
    workflow_id = f"system-check-{uuid.uuid4().hex[:8]}"
    await client.execute_workflow(
        SystemCheckWorkflow.run,
        ProbeRequest(queues=list(ALL_QUEUES)),
        id=workflow_id,
        task_queue=ORCHESTRATION,
        result_type=SystemCheckResult,
    )
    print(await save_history(client, workflow_id, "system_check"))


if __name__ == "__main__":
    asyncio.run(main())
