"""`python -m app.api`: the HTTP API and streamable MCP server under uvicorn."""

from app.api.server import main

main()
