"""`{{input.FIELD}}` and `{{steps.NAME.output.FIELD}}` references in params.

A string that is exactly one reference becomes the referenced value with its
JSON type; a reference inside a longer string is replaced by its text (JSON
for objects and lists). FIELD may be a dotted path; list items are addressed
by index (`items.0`). Pure functions, used inside the workflow sandbox.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_REFERENCE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class TemplateError(ValueError):
    """A reference that is malformed or names a value that does not exist."""


@dataclass(frozen=True)
class Reference:
    text: str
    source: str  # "input" or "steps"
    step: str | None
    path: tuple[str, ...]


def parse_reference(text: str) -> Reference:
    """Parse the inside of one `{{...}}`.

    Raises:
        TemplateError: it is neither `input.FIELD` nor `steps.NAME.output...`.
    """
    parts = text.split(".")
    if parts[0] == "input" and len(parts) >= 2 and all(parts[1:]):
        return Reference(text, "input", None, tuple(parts[1:]))
    if (
        parts[0] == "steps"
        and len(parts) >= 3
        and parts[1]
        and parts[2] == "output"
        and all(parts[3:])
    ):
        return Reference(text, "steps", parts[1], tuple(parts[3:]))
    raise TemplateError(
        f"invalid reference {{{{{text}}}}}: use {{{{input.FIELD}}}} or "
        "{{steps.NAME.output.FIELD}}"
    )


def find_references(value: Any) -> list[Reference]:
    """Return every reference in `value`, searching nested dicts and lists."""
    found: list[Reference] = []
    if isinstance(value, str):
        found += [parse_reference(m.group(1)) for m in _REFERENCE.finditer(value)]
    elif isinstance(value, dict):
        for key, item in value.items():
            found += find_references(key)
            found += find_references(item)
    elif isinstance(value, list):
        for item in value:
            found += find_references(item)
    return found


def unclosed_reference(value: Any, path: str = "") -> tuple[str, str] | None:
    """Return (dotted path, text) of the first string in `value` with a `{{`
    that no `}}` closes, or None.

    Such text is not a reference, so `render` would pass it on unchanged and
    the step would get the braces instead of a value.
    """
    if isinstance(value, str):
        return (path, value) if "{{" in _REFERENCE.sub("", value) else None
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            items += [(child, key), (child, item)]
    elif isinstance(value, list):
        items = [(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value)]
    for item_path, item in items:
        found = unclosed_reference(item, item_path)
        if found is not None:
            return found
    return None


def _lookup(reference: Reference, root: Any, where: str) -> Any:
    current = root
    for part in reference.path:
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise TemplateError(
                f"{{{{{reference.text}}}}}: {part!r} not found in {where}"
            )
    return current


def resolve(
    reference: Reference,
    input_data: dict[str, Any],
    outputs: dict[str, dict[str, Any]],
) -> Any:
    if reference.source == "input":
        return _lookup(reference, input_data, "the execution's input_data")
    assert reference.step is not None
    if reference.step not in outputs:
        raise TemplateError(
            f"{{{{{reference.text}}}}}: step {reference.step!r} has no output "
            "(it did not complete)"
        )
    return _lookup(
        reference, outputs[reference.step], f"the output of step {reference.step!r}"
    )


def render(
    value: Any, input_data: dict[str, Any], outputs: dict[str, dict[str, Any]]
) -> Any:
    """Return `value` with every reference replaced.

    Raises:
        TemplateError: a reference is malformed or its value is missing.
    """
    if isinstance(value, str):
        whole = _REFERENCE.fullmatch(value)
        if whole:
            return resolve(parse_reference(whole.group(1)), input_data, outputs)

        def substitute(match: re.Match[str]) -> str:
            found = resolve(parse_reference(match.group(1)), input_data, outputs)
            if isinstance(found, str):
                return found
            return json.dumps(found, sort_keys=True)

        return _REFERENCE.sub(substitute, value)
    if isinstance(value, dict):
        return {
            render(key, input_data, outputs): render(item, input_data, outputs)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [render(item, input_data, outputs) for item in value]
    return value


def whole_references(value: Any, path: str = "") -> dict[str, str]:
    """Return {dotted path: reference text} for each string in `value` that is
    exactly one reference, the strings that `render` replaces by a typed
    value."""
    if isinstance(value, str):
        whole = _REFERENCE.fullmatch(value)
        return {path: whole.group(1)} if whole else {}
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value)]
    found: dict[str, str] = {}
    for item_path, item in items:
        found.update(whole_references(item, item_path))
    return found
