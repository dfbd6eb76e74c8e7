"""MCP with the official client: stdio (`python -m app mcp`) and streamable
HTTP at /mcp."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from app.settings import Settings
from app.tools import all_tools
from tests.api.conftest import REPO_ROOT, ApiServer, server_env
from tests.api.examples import one_call_per_group


def stdio_parameters(settings: Settings) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "app", "mcp"],
        env=server_env(settings),
        cwd=str(REPO_ROOT),
    )


def check_listing(listed: types.ListToolsResult) -> None:
    by_name = {tool.name: tool for tool in listed.tools}
    assert sorted(by_name) == sorted(spec.name for spec in all_tools())
    for spec in all_tools():
        tool = by_name[spec.name]
        expected = spec.input_model.model_json_schema(by_alias=True)
        assert tool.input_schema == expected, (spec.name, tool.input_schema, expected)
        assert tool.output_schema is not None
        assert tool.description == spec.description


async def check_calls(client: Client) -> None:
    for group, (name, arguments) in one_call_per_group().items():
        result = await client.call_tool(name, arguments)
        assert not result.is_error, (group, result.content)
        assert result.structured_content is not None
        spec = next(spec for spec in all_tools() if spec.name == name)
        spec.result_model.model_validate(result.structured_content)


async def check_invalid_arguments(client: Client) -> None:
    result = await client.call_tool("audit_log", {"limit": "many"})
    assert result.is_error
    text = result.content[0]
    assert isinstance(text, types.TextContent)
    assert "limit: 'many' is invalid" in text.text


async def test_stdio_lists_and_calls(api_server: ApiServer) -> None:
    async with Client(stdio_parameters(api_server.settings)) as client:
        check_listing(await client.list_tools())
        await check_calls(client)
        await check_invalid_arguments(client)
        unknown = await client.call_tool("no_such_tool", {})
        assert unknown.is_error
        mistyped = await client.call_tool("swarm_lst", {})
        assert mistyped.is_error
        text = mistyped.content[0]
        assert isinstance(text, types.TextContent)
        assert "did you mean swarm_list?" in text.text


def _exchange(process: subprocess.Popen[str], message: dict[str, Any]) -> None:
    assert process.stdin is not None
    process.stdin.write(json.dumps(message) + "\n")
    process.stdin.flush()


def test_stdio_stdout_only_jsonrpc(api_server: ApiServer) -> None:
    messages: list[dict[str, Any]] = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "system_health", "arguments": {}},
        },
        {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "audit_log", "arguments": {"limit": -1}},
        },
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "mcp"],
        cwd=REPO_ROOT,
        env=server_env(api_server.settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for message in messages:
            _exchange(process, message)
            if "id" in message:
                # Read until the response to this request arrives.
                while True:
                    line = process.stdout.readline()
                    assert line, "the server closed stdout"
                    lines.append(line)
                    if json.loads(line).get("id") == message["id"]:
                        break
        # communicate() closes stdin, which ends the server.
        rest, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    lines += rest.splitlines(keepends=True)
    assert len(lines) >= 4
    for line in lines:
        parsed = json.loads(line)
        assert parsed["jsonrpc"] == "2.0", line
    responses = {json.loads(line).get("id"): json.loads(line) for line in lines}
    assert responses[3]["result"]["structuredContent"]["database"]["status"]
    assert responses[4]["result"]["isError"] is True
    assert "MCP server on stdio" in stderr


def _http_transport(server: ApiServer, http: httpx2.AsyncClient) -> Any:
    return streamable_http_client(f"{server.base_url}/mcp", http_client=http)


async def test_streamable_http_lists_and_calls(api_server: ApiServer) -> None:
    async with (
        create_mcp_http_client(headers=api_server.headers) as http,
        Client(_http_transport(api_server, http)) as client,
    ):
        check_listing(await client.list_tools())
        await check_calls(client)
        await check_invalid_arguments(client)


async def test_streamable_http_group_filter(
    api_server: ApiServer, key_factory: Any
) -> None:
    token, _ = key_factory("mcp-other-group", ["no-such-group"])
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        create_mcp_http_client(headers=headers) as http,
        Client(_http_transport(api_server, http)) as client,
    ):
        assert (await client.list_tools()).tools == []
        result = await client.call_tool("audit_log", {})
        assert result.is_error


async def test_jsonrpc_without_key_rejected(api_server: ApiServer) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with httpx.AsyncClient(base_url=api_server.base_url) as http:
        response = await http.post(
            "/mcp",
            json=request,
            headers={"Accept": "application/json, text/event-stream"},
        )
    assert response.status_code == 401


async def test_streamable_http_origin_policy(api_server: ApiServer) -> None:
    local = {**api_server.headers, "Origin": "http://localhost:8080"}
    async with (
        create_mcp_http_client(headers=local) as http,
        Client(_http_transport(api_server, http)) as client,
    ):
        assert len((await client.list_tools()).tools) == len(all_tools())
    evil = {**api_server.headers, "Origin": "http://evil.example"}
    with pytest.RaisesGroup(MCPError, flatten_subgroups=True):
        async with (
            create_mcp_http_client(headers=evil) as http,
            Client(_http_transport(api_server, http)) as client,
        ):
            await client.list_tools()
