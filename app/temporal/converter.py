"""The data converter of every client and worker: the SDK's pydantic JSON
converter, with pydantic-core's string cache limited to keys.

pydantic-core's JSON parser keeps up to 16,384 parsed strings of at most 64
characters in one cache per process, keys and values alike, by default. A
worker decodes new ids (sandbox, task, call, workflow ids) in every payload,
so each process's cache fills with values that never come back. In a
20,000-payload loop of unique ids the cache held 1.2 MB after 10,000
payloads, and the soak's workers grew by that much over hours of a run. Keys
are the field names of the contracts, so caching them alone keeps the speed
of repeated names and ends that growth.
"""

from __future__ import annotations

import functools
from typing import Any

import temporalio.api.common.v1
from pydantic import TypeAdapter
from pydantic_core import CoreConfig, SchemaValidator
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)

# As many validators as the SDK's converter caches type adapters.
MAX_CACHED_VALIDATORS = 1024


def keys_cached_validator(type_hint: Any) -> SchemaValidator:
    """Return a validator of `type_hint` whose JSON parsing caches keys only.

    A model's validator is built with the model's own configuration; this one
    keeps that configuration and changes its string cache alone.
    """
    schema = TypeAdapter(type_hint).core_schema
    config: dict[str, Any] = {}
    if schema["type"] in ("model", "dataclass"):
        config.update(schema.get("config") or {})
    config["cache_strings"] = "keys"
    return SchemaValidator(schema, CoreConfig(**config))  # type: ignore[typeddict-item]


class KeysCachedJSONPayloadConverter(PydanticJSONPlainPayloadConverter):
    """The SDK's pydantic JSON converter, decoding with keys-only caching."""

    def __init__(self) -> None:
        super().__init__()
        self._validators = functools.lru_cache(maxsize=MAX_CACHED_VALIDATORS)(
            keys_cached_validator
        )

    def from_payload(
        self,
        payload: temporalio.api.common.v1.Payload,
        type_hint: type | None = None,
    ) -> Any:
        hint = type_hint if type_hint is not None else Any
        try:
            hash(hint)
        except TypeError:
            validator = keys_cached_validator(hint)
        else:
            validator = self._validators(hint)
        return validator.validate_json(payload.data)


class NexusPayloadConverter(CompositePayloadConverter):
    """The SDK's default payload converters, with JSON through pydantic."""

    def __init__(self) -> None:
        json_converter = KeysCachedJSONPayloadConverter()
        defaults = DefaultPayloadConverter.default_encoding_payload_converters
        super().__init__(
            *(
                json_converter if isinstance(each, JSONPlainPayloadConverter) else each
                for each in defaults
            )
        )


nexus_data_converter = DataConverter(payload_converter_class=NexusPayloadConverter)
