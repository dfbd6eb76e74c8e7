"""The tool registry: each Flow Nexus tool declared once, with pydantic input
and result models, for the MCP server, the HTTP API and the CLI."""

import importlib

from app.tools.registry import (
    ToolContext,
    ToolError,
    ToolInputError,
    ToolSpec,
    all_tools,
    get_tool,
    invoke_tool,
    known_tool,
    tool,
)

# One module per capability; each registers its tools when imported.
TOOL_MODULES = (
    "app.tools.system",
    "app.tools.workflows",
    "app.tools.sandbox",
    "app.tools.neural",
    "app.tools.neural_cluster",
    "app.tools.swarm",
    "app.tools.realtime",
    "app.tools.storage",
)


def load_tools() -> None:
    """Import every tool module, so the registry is complete."""
    for module in TOOL_MODULES:
        importlib.import_module(module)


__all__ = [
    "TOOL_MODULES",
    "ToolContext",
    "ToolError",
    "ToolInputError",
    "ToolSpec",
    "all_tools",
    "get_tool",
    "invoke_tool",
    "known_tool",
    "load_tools",
    "tool",
]
