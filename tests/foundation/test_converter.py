"""The data converter: the SDK's pydantic JSON round trip, without caching
the string values of decoded payloads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter

from app.contracts.swarm import AgentState, TaskWork
from app.temporal.converter import nexus_data_converter


@dataclass
class Window:
    name: str
    length: timedelta


class Holder(BaseModel):
    work: TaskWork
    agents: list[AgentState]
    windows: dict[str, Window]
    when: datetime


def holder() -> Holder:
    return Holder(
        work=TaskWork(kind="code", task="count", code="print(1)"),
        agents=[
            AgentState(
                agent_id="agent_1",
                type="coder",
                name="coder-0",
                joined_at=datetime(2026, 1, 2, tzinfo=UTC),
                seq=0,
            )
        ],
        windows={"w": Window("w", timedelta(seconds=90))},
        when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (holder(), Holder),
        ([holder(), holder()], list[Holder]),
        ({"a": [1, 2], "b": None}, dict[str, Any]),
        (Window("x", timedelta(minutes=2)), Window),
        ("text", None),
        (None, None),
    ],
)
def test_round_trip_matches_sdk_converter(value: Any, hint: Any) -> None:
    ours = nexus_data_converter.payload_converter
    sdk = pydantic_data_converter.payload_converter
    [payload] = ours.to_payloads([value])
    assert payload == sdk.to_payloads([value])[0]
    decoded = ours.from_payloads([payload], [hint] if hint is not None else None)
    assert decoded == sdk.from_payloads([payload], [hint] if hint is not None else None)
    assert decoded == [value]


class Configured(BaseModel):
    model_config = ConfigDict(extra="forbid", str_to_upper=True)
    name: str


def test_model_configuration_kept() -> None:
    # The validator is built again from the model's schema; the model's own
    # configuration must still apply.
    ours = nexus_data_converter.payload_converter
    [payload] = ours.to_payloads([{"name": "abc"}])
    assert ours.from_payloads([payload], [Configured]) == [Configured(name="ABC")]
    [payload] = ours.to_payloads([{"name": "abc", "bogus": 1}])
    with pytest.raises(ValidationError, match="bogus"):
        ours.from_payloads([payload], [Configured])


def test_decoded_values_are_not_cached() -> None:
    # pydantic-core's parser returns the cached object for a string it has
    # seen, so two decodings of one payload share their value strings. A
    # worker's cache would fill with ids that never come back.
    [payload] = pydantic_data_converter.payload_converter.to_payloads(
        [{"sandbox_id": "sbx_value_cache_check"}]
    )

    def decode(converter: Any) -> tuple[str, str]:
        first, second = (
            converter.payload_converter.from_payloads([payload], [dict[str, str]])[0]
            for _ in range(2)
        )
        assert first == second
        return first["sandbox_id"], second["sandbox_id"]

    first, second = decode(pydantic_data_converter)
    assert first is second  # the check can see the cache
    first, second = decode(nexus_data_converter)
    assert first is not second
