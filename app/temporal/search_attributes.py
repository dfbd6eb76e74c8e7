"""The project's search attributes and dev-server config, declared once under
`temporal/` in the repository."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio.common import SearchAttributeKey

TEMPORAL_DIR = Path(__file__).resolve().parents[2] / "temporal"

_KEY_FACTORIES: dict[str, Callable[[str], SearchAttributeKey[Any]]] = {
    "Keyword": SearchAttributeKey.for_keyword,
    "Text": SearchAttributeKey.for_text,
    "Int": SearchAttributeKey.for_int,
    "Double": SearchAttributeKey.for_float,
    "Bool": SearchAttributeKey.for_bool,
    "Datetime": SearchAttributeKey.for_datetime,
    "KeywordList": SearchAttributeKey.for_keyword_list,
}


def _read_json(name: str) -> dict[str, object]:
    path = TEMPORAL_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; flow-nexus reads its Temporal configuration from "
            "the repository, so install it with `pip install -e .` from a checkout"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def declared_search_attributes() -> dict[str, str]:
    """Return search attribute names mapped to their Temporal type names."""
    return {str(k): str(v) for k, v in _read_json("search_attributes.json").items()}


def search_attribute_keys() -> list[SearchAttributeKey]:
    return [
        _KEY_FACTORIES[kind](name)
        for name, kind in declared_search_attributes().items()
    ]


def dev_server_args() -> list[str]:
    """Return the `start-dev` flags for search attributes and dynamic config."""
    args: list[str] = []
    for name, kind in declared_search_attributes().items():
        args += ["--search-attribute", f"{name}={kind}"]
    for key, value in _read_json("dynamic_config.json").items():
        args += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
    return args


# Keys used by workflows when they set search attributes.
DEFINITION_ID = SearchAttributeKey.for_keyword("NexusDefinitionId")
DEFINITION_NAME = SearchAttributeKey.for_keyword("NexusDefinitionName")
EXECUTION_KIND = SearchAttributeKey.for_keyword("NexusExecutionKind")
SWARM_ID = SearchAttributeKey.for_keyword("NexusSwarmId")
SANDBOX_ID = SearchAttributeKey.for_keyword("NexusSandboxId")
CLUSTER_ID = SearchAttributeKey.for_keyword("NexusClusterId")
BENCHMARK_RUN_ID = SearchAttributeKey.for_keyword("NexusBenchmarkRunId")
