"""Built-in actions that an agent can run: platform tools called by name.

Each action maps to a tool. An action is available when its tool is
registered in this deployment, so actions of capabilities that are not
installed fail with "not available" and light up once they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temporalio.client import Client

from app.settings import Settings


@dataclass(frozen=True)
class BuiltinAction:
    name: str
    tool: str
    description: str


BUILTIN_ACTIONS: dict[str, BuiltinAction] = {
    action.name: action
    for action in (
        BuiltinAction("system_health", "system_health", "read platform health"),
        BuiltinAction("audit_log", "audit_log", "list recent tool calls"),
        BuiltinAction("run_workflow", "workflow_execute", "run a stored workflow"),
        BuiltinAction("train_model", "neural_train", "train a neural network"),
        BuiltinAction("sandbox_execute", "sandbox_execute", "run code in a sandbox"),
        BuiltinAction("storage_upload", "storage_upload", "store a file"),
        BuiltinAction(
            "realtime_subscribe", "realtime_subscribe", "subscribe to changes"
        ),
    )
}


class ActionNotAvailableError(Exception):
    """The action is unknown, or its capability is not installed here."""


def available_actions() -> dict[str, bool]:
    """Map every action name to whether its tool is registered here."""
    from app.tools import all_tools, load_tools

    load_tools()
    registered = {spec.name for spec in all_tools()}
    return {name: a.tool in registered for name, a in BUILTIN_ACTIONS.items()}


def check_action(name: str) -> BuiltinAction:
    """Return the action, or raise when it cannot run in this deployment.

    Raises:
        ActionNotAvailableError: unknown name, or its tool is not registered.
    """
    action = BUILTIN_ACTIONS.get(name)
    if action is None:
        raise ActionNotAvailableError(
            f"unknown action {name!r}; choose one of {', '.join(BUILTIN_ACTIONS)}"
        )
    if not available_actions()[name]:
        raise ActionNotAvailableError(
            f"action {name!r} is not available: its tool {action.tool!r} is not "
            "installed in this deployment"
        )
    return action


async def run_action(
    settings: Settings,
    client: Client | None,
    name: str,
    arguments: dict[str, Any],
    *,
    caller: str,
) -> dict[str, Any]:
    """Run a built-in action through the tool layer, audited like any call.

    Raises:
        ActionNotAvailableError: see `check_action`.
        app.tools.ToolError: the tool failed.
    """
    from app.tools import ToolContext, invoke_tool

    action = check_action(name)
    ctx = ToolContext(settings, user_id=caller, temporal_client=client)
    return await invoke_tool(ctx, action.tool, arguments)
