"""The HTTP API and the MCP server, both generated from the tool registry."""
