"""Errors over HTTP carry no secret, SQL or bound parameter: validation
errors of secret fields, unexpected database errors, concurrent writes."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from sqlmodel import select

from app.db import get_engine
from app.db.models import utc_now
from app.services.audit import list_calls
from app.workflows import store
from app.workflows.models import WorkflowVersionRow
from tests.api.conftest import ApiServer


async def post(server: ApiServer, path: str, body: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        return await http.post(path, json=body, headers=server.headers)


async def audit_rows(server: ApiServer, tool: str, count: int) -> list[Any]:
    # audit_log waits for the server's queued events to be written.
    response = await post(server, "/api/tools/audit_log", {"limit": 1})
    assert response.status_code == 200, response.text
    url = server.settings.effective_database_url
    return list_calls(url, user_id="key:tests", tool=tool, limit=count)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"env_vars": {"1BAD NAME": "SECRET-CCC-badname"}}, "env_vars"),
        ({"anthropic_key": ["SECRET-FFF-list"]}, "anthropic_key"),
        ({"env_vars": ["SECRET-GGG-list"]}, "env_vars"),
        ({"env_vars": {"GOOD": ["SECRET-HHH-nested"]}}, "env_vars.GOOD"),
    ],
)
async def test_validation_errors_mask_secrets(
    api_server: ApiServer, arguments: dict[str, Any], field: str
) -> None:
    body = {"template": "base", **arguments}
    secret = json.dumps(arguments).split("SECRET-")[1].split('"')[0]
    for path, payload in (
        ("/api/tools/sandbox_create", body),
        ("/mcp", {"tool": "sandbox_create", "args": body}),
    ):
        response = await post(api_server, path, payload)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert secret not in response.text
        assert error["errors"][0]["field"] == field
        assert "********" in json.dumps(error["errors"][0]["value"])
        assert f"{field}: " in error["message"]
    rows = await audit_rows(api_server, "sandbox_create", 2)
    for row in rows:
        text = json.dumps([row.arguments, row.error])
        assert secret not in text
        assert row.error is not None and field in row.error


async def test_database_error_hides_sql(
    api_server: ApiServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real IntegrityError from the engine, raised while storing."""
    url = api_server.settings.effective_database_url

    def duplicate_version(*_: Any, **__: Any) -> Any:
        with get_engine(url).begin() as connection:
            row = connection.execute(select(WorkflowVersionRow).limit(1)).first()
            assert row is not None
            connection.execute(
                WorkflowVersionRow.__table__.insert(),  # type: ignore[attr-defined]
                {
                    "definition_id": row.definition_id,
                    "version": row.version,
                    "spec": {"env_vars": {"DB_PASSWORD": "SECRET-SQL-param"}},
                    "spec_hash": "x",
                    "created_at": utc_now(),
                },
            )

    created = await post(
        api_server,
        "/api/tools/workflow_create",
        {"name": "db-error-seed", "steps": [{"name": "a", "type": "echo"}]},
    )
    assert created.status_code == 200, created.text
    monkeypatch.setattr(store, "save_definition", duplicate_version)
    caplog.set_level(logging.INFO)
    response = await post(
        api_server,
        "/api/tools/workflow_create",
        {"name": "db-error", "steps": [{"name": "a", "type": "echo"}]},
    )
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "unexpected IntegrityError" in message
    assert "retry the call" in message
    for leaked in ("SECRET-SQL-param", "INSERT", "[SQL", "parameters"):
        assert leaked not in response.text
    (row,) = await audit_rows(api_server, "workflow_create", 1)
    assert row.error == message
    # The log has the SQL statement for the operator, not its values.
    assert "INSERT INTO workflow_definition_versions" in caplog.text
    assert "SECRET-SQL-param" not in caplog.text


async def test_lost_race_is_conflict(api_server: ApiServer) -> None:
    """A version row beyond the definition's latest_version is what a
    concurrent writer that wins every attempt leaves."""
    body: dict[str, Any] = {
        "name": "always-loses",
        "steps": [{"name": "a", "type": "echo", "params": {"v": 1}}],
    }
    created = await post(api_server, "/api/tools/workflow_create", body)
    assert created.status_code == 200, created.text
    with get_engine(api_server.settings.effective_database_url).begin() as connection:
        connection.execute(
            WorkflowVersionRow.__table__.insert(),  # type: ignore[attr-defined]
            {
                "definition_id": created.json()["workflow_id"],
                "version": 2,
                "spec": {},
                "spec_hash": "x",
                "created_at": utc_now(),
            },
        )
    body["steps"][0]["params"] = {"v": 2}
    response = await post(api_server, "/api/tools/workflow_create", body)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["kind"] == "conflict"
    assert "send it again" in error["message"]
    assert "INSERT" not in error["message"]


async def test_concurrent_creates_over_http(api_server: ApiServer) -> None:
    def body(index: int) -> dict[str, Any]:
        return {
            "name": "race-http",
            "steps": [
                {
                    "name": "run",
                    "type": "sandbox_execution",
                    "params": {
                        "code": f"print({index})",
                        "env_vars": {"DB_PASSWORD": f"SECRET-RACE-{index}"},
                    },
                }
            ],
        }

    responses = await asyncio.gather(
        *(post(api_server, "/api/tools/workflow_create", body(i)) for i in range(8))
    )
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    versions = sorted(r.json()["version"] for r in responses)
    assert versions == list(range(1, 9))
    assert "SECRET-RACE" not in "".join(r.text for r in responses)
