"""Built-in actions that an agent can run: platform tools called by name.

Each action maps to a tool. An action is available when its tool is
registered in this deployment, so actions of capabilities that are not
installed fail with "not available" and light up once they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temporalio.client import Client

from app.sandbox.secrets import PREFIX, load_key, seal, unseal
from app.settings import Settings

# The action argument whose values are secrets: a sandbox's env vars.
_SECRET_MAP = "env_vars"


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


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


def _sealed_context(task_id: str) -> str:
    return f"swarm-task:{task_id}"


def seal_action_args(
    key: bytes, task_id: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    """Return `arguments` with the values of `env_vars` sealed, so that the
    task's submission, its workflows' inputs and the swarm's state carry only
    `sealed:v1:` ciphertext. Every env var of an action is a secret, as in a
    workflow step."""
    env = arguments.get(_SECRET_MAP)
    if not isinstance(env, dict) or not env:
        return arguments
    context = _sealed_context(task_id)
    return {
        **arguments,
        _SECRET_MAP: {
            name: value
            if not isinstance(value, str) or is_sealed(value)
            else seal(key, context, name, value)
            for name, value in env.items()
        },
    }


def unseal_action_args(
    key: bytes, task_id: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    """Open what `seal_action_args` sealed, and have the sandbox mask every env
    var's value in the output, which the task's result keeps.

    Raises:
        app.sandbox.secrets.SealError: a value sealed for another task or key.
    """
    env = arguments.get(_SECRET_MAP)
    if not isinstance(env, dict) or not env:
        return arguments
    context = _sealed_context(task_id)
    plain = {
        name: unseal(key, context, name, value) if is_sealed(value) else value
        for name, value in env.items()
    }
    masked = sorted({*(arguments.get("mask_env_vars") or ()), *plain})
    return {**arguments, _SECRET_MAP: plain, "mask_env_vars": masked}


async def run_action(
    settings: Settings,
    client: Client | None,
    name: str,
    arguments: dict[str, Any],
    *,
    caller: str,
    task_id: str,
    groups: list[str] | None = None,
) -> dict[str, Any]:
    """Run a built-in action through the tool layer, audited like any call,
    with the tool groups of the key that submitted it.

    Raises:
        ActionNotAvailableError: see `check_action`.
        app.tools.ToolError: the tool failed, or its group is not in `groups`.
    """
    from app.tools import ToolContext, invoke_tool

    action = check_action(name)
    if action.tool == "sandbox_execute":
        arguments = unseal_action_args(load_key(settings), task_id, arguments)
    ctx = ToolContext(
        settings,
        user_id=caller,
        groups=None if groups is None else tuple(groups),
        temporal_client=client,
    )
    return await invoke_tool(ctx, action.tool, arguments)
