"""A bounded property-based run of schemathesis against /openapi.json."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

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
            # A tool may reject with 422 a value that its JSON schema cannot
            # express (an id of the wrong shape), so schema-valid data is
            # not required to succeed. Every other default check runs.
            case.call_and_validate(
                headers=api_server.headers,
                excluded_checks=[positive_data_acceptance],
            )

        check()
