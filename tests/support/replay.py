"""Determinism checks: replay histories of real runs against today's code."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

HISTORIES = Path(__file__).resolve().parents[1] / "histories"


def replayer(client: Client, workflows: Sequence[type]) -> Replayer:
    return Replayer(workflows=list(workflows), data_converter=client.data_converter)


async def replay_run(
    client: Client, workflow_id: str, workflows: Sequence[type]
) -> None:
    """Fetch the history of `workflow_id` from the server and replay it.

    Raises:
        temporalio.workflow.NondeterminismError: the code no longer produces
            the commands that the recorded run produced.
    """
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    await replayer(client, workflows).replay_workflow(history)


async def save_history(client: Client, workflow_id: str, name: str) -> Path:
    """Record the history of a real run under tests/histories/NAME.json."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    path = HISTORIES / f"{name}.json"
    path.write_text(history.to_json())
    return path


async def replay_saved(client: Client, name: str, workflows: Sequence[type]) -> None:
    """Replay the history recorded under tests/histories/NAME.json."""
    path = HISTORIES / f"{name}.json"
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(name, data)
    await replayer(client, workflows).replay_workflow(history)
