"""Sealing of the secret params of workflow steps (`env_vars` values).

A definition is sealed when it is stored, so the database, the start input of
every run and every step's activity input carry only `sealed:v1:` ciphertext.
The associated data binds each value to its definition id, step and env var
name. Only the activity that hands the values to a sandbox unseals them.

A value that contains a `{{...}}` reference stays as written: the workflow
resolves it when the step runs, from input or output that is stored in the
clear anyway. A plain value of a definition stored before sealing existed
still runs; the next write of that definition seals it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from app.contracts.workflows import SECRET_PARAMS, WorkflowDefinition
from app.sandbox.secrets import PREFIX, SealError, seal, unseal

_REFERENCE_START = "{{"


class DefinitionSecretError(ValueError):
    """A sealed value that does not belong to this definition and step."""


def _context(definition_id: str, step: str) -> str:
    return f"workflow:{definition_id}/{step}"


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def _secret_maps(params: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, params[name])
        for name in SECRET_PARAMS
        if isinstance(params.get(name), dict)
    ]


def _keeps_as_written(value: Any) -> bool:
    return not isinstance(value, str) or _REFERENCE_START in value


def seal_definition(
    key: bytes, definition_id: str, definition: WorkflowDefinition
) -> tuple[WorkflowDefinition, str]:
    """Return the definition with every secret value sealed, and its hash.

    The hash covers an HMAC of each plain value under `key`, so an
    unchanged body keeps its version although each sealing differs. For a
    definition without secrets it equals the hash of its JSON.

    Raises:
        DefinitionSecretError: a value is sealed, but not for this definition
            and step (copied from another one).
    """
    sealed = definition.model_copy(deep=True)
    fingerprint = definition.model_dump(mode="json")
    for spec, printed in zip(sealed.steps, fingerprint["steps"], strict=True):
        for param, values in _secret_maps(spec.params):
            context = _context(definition_id, spec.name)
            new_values: dict[str, Any] = {}
            for name, value in values.items():
                if _keeps_as_written(value):
                    new_values[name] = value
                    continue
                plain = value
                if is_sealed(value):
                    try:
                        plain = unseal(key, context, name, value)
                    except SealError:
                        raise DefinitionSecretError(
                            f"step {spec.name!r}: params.{param}.{name} is a sealed "
                            "value of another workflow or step; pass the plain "
                            "value instead"
                        ) from None
                new_values[name] = seal(key, context, name, plain)
                digest = hmac.new(
                    key, f"{context}\0{name}\0{plain}".encode(), hashlib.sha256
                ).hexdigest()
                printed["params"][param][name] = f"hmac:{digest}"
            spec.params[param] = new_values
    text = json.dumps(fingerprint, sort_keys=True)
    return sealed, hashlib.sha256(text.encode()).hexdigest()


def seal_plain_values(
    key: bytes, definition_id: str, definition: WorkflowDefinition
) -> WorkflowDefinition:
    """Seal the plain secret values of a stored definition for one run.

    Values sealed already stay as they are; a legacy definition's plain
    values so never reach a run's history.
    """
    if not has_plain_secrets(definition):
        return definition
    sealed = definition.model_copy(deep=True)
    for spec in sealed.steps:
        for param, values in _secret_maps(spec.params):
            context = _context(definition_id, spec.name)
            spec.params[param] = {
                name: (
                    value
                    if _keeps_as_written(value) or is_sealed(value)
                    else seal(key, context, name, value)
                )
                for name, value in values.items()
            }
    return sealed


def has_plain_secrets(definition: WorkflowDefinition) -> bool:
    return any(
        not (_keeps_as_written(value) or is_sealed(value))
        for spec in definition.steps
        for _, values in _secret_maps(spec.params)
        for value in values.values()
    )


def unseal_values(
    key: bytes, definition_id: str | None, step: str, values: Mapping[str, str]
) -> dict[str, str]:
    """Return the plain values of one step's secret mapping.

    Plain values (a legacy definition, a run started from outside with its
    own definition, a resolved reference) pass as they are.

    Raises:
        SealError: a sealed value that this key, definition and step cannot
            open.
    """
    context = _context(definition_id or "", step)
    return {
        name: unseal(key, context, name, value) if is_sealed(value) else value
        for name, value in values.items()
    }
