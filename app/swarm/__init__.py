"""Swarms: durable multi-agent swarms whose tasks run in agent sandboxes."""
