"""Which tool of each group the end-to-end tests call, and with what.

A group whose tools all need arguments gets an entry in `EXAMPLE_ARGUMENTS`;
without one the tests call the first tool whose input model accepts `{}`.
"""

from __future__ import annotations

from typing import Any

from app.tools import ToolSpec, all_tools, load_tools

EXAMPLE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "audit_log": {"limit": 5},
}


def _accepts_empty(spec: ToolSpec) -> bool:
    schema = spec.input_model.model_json_schema()
    return not schema.get("required")


def one_call_per_group() -> dict[str, tuple[str, dict[str, Any]]]:
    """Map every tool group to one (tool, arguments) call."""
    load_tools()
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    groups = sorted({spec.group for spec in all_tools()})
    for group in groups:
        specs = [spec for spec in all_tools() if spec.group == group]
        chosen = next(
            (
                (s.name, EXAMPLE_ARGUMENTS[s.name])
                for s in specs
                if s.name in EXAMPLE_ARGUMENTS
            ),
            None,
        ) or next(((s.name, {}) for s in specs if _accepts_empty(s)), None)
        if chosen is None:
            raise AssertionError(
                f"group {group} has no tool callable with {{}}; add one of "
                f"{[s.name for s in specs]} to EXAMPLE_ARGUMENTS"
            )
        calls[group] = chosen
    return calls
