"""A bounded property-based run of schemathesis against /openapi.json."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.api.conftest import ApiServer

# Examples per operation: enough to hit each field's bounds and types, while
# the whole run stays within seconds.
EXAMPLES_PER_OPERATION = 30


def test_openapi_operations_conform(api_server: ApiServer) -> None:
    """Every documented operation responds with a documented status and a body
    that matches its schema, and never with a 5xx."""
    schema = schemathesis.openapi.from_url(f"{api_server.base_url}/openapi.json")
    operations = [
        result.ok()  # type: ignore[union-attr]
        for result in schema.get_all_operations()
    ]
    assert len(operations) >= 3
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=api_server.headers)

        check()
