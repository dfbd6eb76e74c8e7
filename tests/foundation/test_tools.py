import pytest
from temporalio.client import Client

from app.services.audit import list_calls
from app.settings import Settings
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool, load_tools

load_tools()


async def test_system_health_tool_is_audited(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, user_id="tester", temporal_client=client)
    result = await invoke_tool(ctx, "system_health", {})
    assert result["status"] == "healthy"
    assert "heapUsed" in result["memory"]
    events = list_calls(workers.effective_database_url, tool="system_health")
    assert events[0].user_id == "tester"
    assert events[0].outcome == "success"
    assert events[0].duration_ms > 0


async def test_invalid_argument_names_field(settings: Settings) -> None:
    ctx = ToolContext(settings)
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ctx, "audit_log", {"limit": 0})
    assert "limit: 0 is invalid" in caught.value.message
    assert "greater than or equal to 1" in caught.value.message
    assert caught.value.errors[0]["field"] == "limit"
    events = list_calls(settings.effective_database_url, tool="audit_log")
    assert events[0].outcome == "error"
    assert "limit" in (events[0].error or "")


async def test_unknown_argument_rejected(settings: Settings) -> None:
    with pytest.raises(ToolInputError, match="limt"):
        await invoke_tool(ToolContext(settings), "audit_log", {"limt": 5})


async def test_unknown_tool_is_not_found(settings: Settings) -> None:
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ToolContext(settings), "no_such_tool", {})
    assert caught.value.kind == "not_found"
    assert "did you mean" not in caught.value.message


async def test_unknown_tool_suggests_close_name(settings: Settings) -> None:
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ToolContext(settings), "swarm_lst", {})
    assert caught.value.kind == "not_found"
    assert "unknown tool 'swarm_lst'; did you mean swarm_list?" in caught.value.message


async def test_audit_log_tool_filters(client: Client, settings: Settings) -> None:
    ctx = ToolContext(settings, user_id="carol", temporal_client=client)
    await invoke_tool(ctx, "audit_log", {"limit": 1})
    other = ToolContext(settings, user_id="dave", temporal_client=client)
    await invoke_tool(other, "audit_log", {"limit": 1})
    result = await invoke_tool(ctx, "audit_log", {"user_id": "carol"})
    assert result["count"] >= 1
    assert {e["user_id"] for e in result["events"]} == {"carol"}
