"""Sessions with local calls off: every backend call is an activity on the
nexus-sandbox queue, as when its workers run on another machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.client import Client

from app.settings import Settings
from app.tools import ToolContext, invoke_tool
from tests.support.replay import replay_run
from tests.support.sandboxes import sandbox_test_settings
from workflows.sandbox import SandboxSessionWorkflow


@pytest.fixture
def sandbox_settings(tmp_path: Path, temporal_address: str) -> Settings:
    return sandbox_test_settings(
        tmp_path, temporal_address, sandbox_local_calls=False, sandbox_spares=0
    )


async def test_calls_through_sandbox_queue(
    tool_ctx: ToolContext, client: Client
) -> None:
    created = await invoke_tool(tool_ctx, "sandbox_create", {"template": "base"})
    sandbox_id = created["sandbox_id"]
    try:
        uploaded = await invoke_tool(
            tool_ctx,
            "sandbox_upload",
            {"sandbox_id": sandbox_id, "file_path": "a.txt", "content": "queued"},
        )
        assert uploaded["size"] == 6
        result = await invoke_tool(
            tool_ctx,
            "sandbox_execute",
            {"sandbox_id": sandbox_id, "code": "print(open('a.txt').read())"},
        )
        assert result["stdout"] == "queued\n", result
        status = await invoke_tool(
            tool_ctx, "sandbox_status", {"sandbox_id": sandbox_id}
        )
        assert status["live"]["alive"] is True
        home = (
            tool_ctx.settings.resolved_data_dir
            / "sandboxes"
            / status["backend_id"]
            / "home"
        )
        shutil.rmtree(home)
        again = await invoke_tool(
            tool_ctx, "sandbox_execute", {"sandbox_id": sandbox_id, "code": "print(2)"}
        )
        assert again["recreated"] == 1
        assert again["stdout"] == "2\n"
    finally:
        await invoke_tool(tool_ctx, "sandbox_delete", {"sandbox_id": sandbox_id})
    history = await client.get_workflow_handle(f"sandbox-{sandbox_id}").fetch_history()
    scheduled = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
    ]
    for name in ("sandbox_create", "sandbox_upload", "sandbox_execute"):
        assert name in scheduled, scheduled
    await replay_run(client, f"sandbox-{sandbox_id}", [SandboxSessionWorkflow])
