"""Which tool of each group the end-to-end tests call, and with what.

A group whose tools all need arguments gets an entry in `EXAMPLE_ARGUMENTS`;
without one the tests call the first tool whose input model accepts `{}`.
"""

from __future__ import annotations

from typing import Any

from app.tools import ToolSpec, all_tools, load_tools

EXAMPLE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "audit_log": {"limit": 5},
    "storage_list": {"bucket": "examples"},
    "realtime_list": {},
}


def _accepts_empty(spec: ToolSpec) -> bool:
    schema = spec.input_model.model_json_schema()
    return not schema.get("required")


# Name parts of tools that only read, preferred so that the end-to-end tests
# do not create clusters or sandboxes.
READ_ONLY_WORDS = ("list", "status", "health", "audit")


def one_call_per_group() -> dict[str, tuple[str, dict[str, Any]]]:
    """Map every tool group to one (tool, arguments) call: an entry of
    EXAMPLE_ARGUMENTS, else a read-only tool that accepts {}, else any tool
    that accepts {}."""
    load_tools()
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    groups = sorted({spec.group for spec in all_tools()})
    for group in groups:
        specs = [spec for spec in all_tools() if spec.group == group]
        examples = [
            (s.name, EXAMPLE_ARGUMENTS[s.name])
            for s in specs
            if s.name in EXAMPLE_ARGUMENTS
        ]
        empty = [s for s in specs if _accepts_empty(s)]
        read_only: list[tuple[str, dict[str, Any]]] = [
            (s.name, {}) for s in empty if any(w in s.name for w in READ_ONLY_WORDS)
        ]
        others: list[tuple[str, dict[str, Any]]] = [(s.name, {}) for s in empty]
        candidates = examples + read_only + others
        if not candidates:
            raise AssertionError(
                f"group {group} has no tool callable with {{}}; add one of "
                f"{[s.name for s in specs]} to EXAMPLE_ARGUMENTS"
            )
        calls[group] = candidates[0]
    return calls
