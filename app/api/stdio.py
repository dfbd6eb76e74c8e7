"""MCP over stdio: stdout carries protocol messages only."""

from __future__ import annotations

import logging

from mcp.server.stdio import stdio_server

from app.api.calls import ToolRunner
from app.api.mcp_server import build_mcp_server
from app.settings import Settings
from app.tools import all_tools, load_tools

logger = logging.getLogger(__name__)


async def serve_stdio(settings: Settings) -> None:
    """Serve MCP on this process's stdin and stdout until stdin closes."""
    load_tools()
    server = build_mcp_server(ToolRunner(settings), require_principal=False)
    logger.info("MCP server on stdio with %d tools", len(all_tools()))
    async with stdio_server() as (read_stream, write_stream):
        await server.run(
            read_stream, write_stream, server.create_initialization_options()
        )
    logger.info("MCP server on stdio stopped: stdin closed")
