"""A tool registered later appears in HTTP, OpenAPI and MCP without code in
app/api."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from mcp import Client
from pydantic import BaseModel, ConfigDict, Field

from app.api.calls import ToolRunner
from app.api.http import create_app
from app.api.mcp_server import build_mcp_server
from app.tools import ToolContext, ToolError, registry, tool
from tests.api.conftest import ApiServer


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    text: str = Field(min_length=1, max_length=20)
    repeat_count: int = Field(1, ge=1, le=3, alias="repeatCount")


class EchoResult(BaseModel):
    echoed: str


@pytest.fixture
def echo_tool() -> Iterator[str]:
    async def echo(ctx: ToolContext, args: EchoInput) -> EchoResult:
        """Repeat a text."""
        if args.text == "missing":
            raise ToolError("no record named 'missing'", kind="not_found")
        if args.text == "boom":
            raise RuntimeError("disk full")
        if args.text == "busy":
            raise ToolError("Temporal is down; start it", kind="unavailable")
        return EchoResult(echoed=args.text * args.repeat_count)

    tool("test_echo", group="testing")(echo)
    try:
        yield "test_echo"
    finally:
        registry._registry.pop("test_echo", None)


async def test_later_tool_served_everywhere(
    api_server: ApiServer, echo_tool: str
) -> None:
    application = create_app(api_server.settings)
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", headers=api_server.headers
    ) as http:
        schema = (await http.get("/openapi.json")).json()
        ok = await http.post(
            f"/api/tools/{echo_tool}", json={"text": "ab", "repeatCount": 2}
        )
        missing = await http.post(f"/api/tools/{echo_tool}", json={"text": "missing"})
        busy = await http.post(f"/api/tools/{echo_tool}", json={"text": "busy"})
        boom = await http.post(f"/api/tools/{echo_tool}", json={"text": "boom"})
        too_long = await http.post(f"/api/tools/{echo_tool}", json={"text": "x" * 21})
    assert f"/api/tools/{echo_tool}" in schema["paths"]
    assert "repeatCount" in schema["components"]["schemas"]["EchoInput"]["properties"]
    assert ok.json() == {"echoed": "abab"}
    assert missing.status_code == 404
    assert busy.status_code == 503
    assert boom.status_code == 500
    # An unexpected exception's text can carry SQL or secrets: only its class.
    assert "unexpected RuntimeError" in boom.json()["error"]["message"]
    assert "disk full" not in boom.text
    assert "Traceback" not in boom.text
    assert too_long.status_code == 422
    assert too_long.json()["error"]["errors"][0]["field"] == "text"

    server = build_mcp_server(ToolRunner(api_server.settings), require_principal=False)
    async with Client(server) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        result = await client.call_tool(echo_tool, {"text": "c", "repeatCount": 3})
        failed = await client.call_tool(echo_tool, {"text": "busy"})
    assert "repeatCount" in listed[echo_tool].input_schema["properties"]
    assert result.structured_content == {"echoed": "ccc"}
    assert failed.is_error
