"""Secret env var values of workflow steps: sealed in the database and in
every Temporal history, unsealed only for the sandbox, masked in errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import Any

import pytest
from sqlmodel import select
from temporalio.client import Client

from activities.integration import step_call_id
from app.contracts.workflows import StepRequest
from app.db import session_scope
from app.realtime.models import ExecutionOutput
from app.settings import Settings
from app.tools import ToolContext, ToolError
from app.workflows import store
from app.workflows.models import WorkflowDefinitionRow, WorkflowVersionRow
from tests.workflows.conftest import call

SECRET = "SECRET-WF-envvar-4711"
# The program compares a digest, since its code is stored in the clear. The
# names do not look secret, so only the workflow's own rule masks the value.
CHECK = (
    'if [ "$(printf %s "$TOK_X" | sha256sum | cut -c1-64)" = "'
    + hashlib.sha256(SECRET.encode()).hexdigest()
    + '" ]; then echo match; fi; '
    'echo "out $TOK_X"; echo "oops $TOK_X" >&2; exit $CODE'
)


def sandbox_step(name: str, code: str = "0", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "sandbox_execution",
        "retry_attempts": 0,
        "params": {
            "template": "base",
            "language": "bash",
            "code": CHECK,
            "env_vars": {"TOK_X": SECRET, "CODE": code},
        },
        **extra,
    }


def history_text(events_json: str) -> str:
    """The history's JSON with its base64 payloads decoded next to it."""
    decoded = "\n".join(
        base64.b64decode(data).decode("utf-8", errors="replace")
        for data in re.findall(r'"data": "([A-Za-z0-9+/=]+)"', events_json)
    )
    return events_json + "\n" + decoded


def payload_bytes(events: Any) -> bytes:
    """Every event of a history serialized, so every payload's bytes are
    searched as they are stored: update requests and results, local activity
    markers, activity inputs and results."""
    return b"".join(event.SerializeToString() for event in events)


def stored_specs(settings: Settings, workflow_id: str) -> list[dict[str, Any]]:
    with session_scope(settings.effective_database_url) as session:
        rows = session.exec(
            select(WorkflowVersionRow).where(
                WorkflowVersionRow.definition_id == workflow_id
            )
        ).all()
        return [row.spec for row in rows]


async def test_step_env_sealed_everywhere(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, temporal_client=client)
    created = await call(
        ctx,
        "workflow_create",
        name="sealed-steps",
        steps=[sandbox_step("ok"), sandbox_step("bad", code="1")],
    )
    workflow_id = created["workflow_id"]
    specs = stored_specs(workers, workflow_id)
    assert SECRET not in json.dumps(specs)
    env = specs[0]["steps"][0]["params"]["env_vars"]
    assert sorted(env) == ["CODE", "TOK_X"]
    assert env["TOK_X"].startswith("sealed:v1:")

    with pytest.raises(ToolError) as caught:
        await call(ctx, "workflow_execute", workflow_id=workflow_id, **{"async": False})
    message = caught.value.message
    assert "oops ********" in message
    assert SECRET not in message

    execution_id = re.search(r"execution (wfx_\w+)", message)
    assert execution_id is not None
    status = await call(ctx, "workflow_status", execution_id=execution_id.group(1))
    steps = {s["name"]: s for s in status["execution"]["steps"]}
    # The sandbox got the plain value: the program compared it.
    assert steps["ok"]["status"] == "completed"
    assert steps["ok"]["output"]["stdout"] == "match\nout ********\n"
    assert steps["bad"]["status"] == "failed"
    assert "oops ********" in steps["bad"]["error"]
    assert SECRET not in json.dumps(status)

    history = await client.get_workflow_handle(execution_id.group(1)).fetch_history()
    text = history_text(history.to_json())
    assert "sealed:v1:" in text
    assert "TOK_X" in text
    assert SECRET not in text
    audit = await call(ctx, "workflow_audit_trail", workflow_id=workflow_id)
    assert SECRET not in json.dumps(audit)


async def test_step_secret_kept_out_of_session(
    client: Client, workers: Settings
) -> None:
    """The sandbox session and its logs get masked output only, also for env
    var names that the sandboxes' own rule does not mask."""
    given_secret = "Tt4RunOnly-given-sandbox"
    own_secret = "Zq9SuperSecretValue-own"
    program = 'echo "out $PLAIN_NAME"; echo "err $PLAIN_NAME" >&2'
    ctx = ToolContext(workers, temporal_client=client)
    given = await call(ctx, "sandbox_create", template="base")
    given_id = given["sandbox_id"]
    try:
        created = await call(
            ctx,
            "workflow_create",
            name="secrets-in-session",
            steps=[
                {
                    "name": "given",
                    "type": "sandbox_execution",
                    "retry_attempts": 0,
                    "params": {
                        "sandbox_id": "{{input.sid}}",
                        "language": "bash",
                        "code": program,
                        "env_vars": {"PLAIN_NAME": given_secret},
                    },
                },
                {
                    "name": "own",
                    "type": "sandbox_execution",
                    "retry_attempts": 0,
                    "params": {
                        "template": "base",
                        "language": "bash",
                        "code": program,
                        "env_vars": {"PLAIN_NAME": own_secret},
                    },
                },
            ],
        )
        run = await call(
            ctx,
            "workflow_execute",
            workflow_id=created["workflow_id"],
            input_data={"sid": given_id},
            **{"async": False},
        )
        assert run["status"] == "completed"
        outputs = {s["name"]: s["output"] for s in run["result"]["steps"]}
        assert outputs["given"]["stdout"] == "out ********\n"
        assert outputs["own"]["stdout"] == "out ********\n"
        own_id = outputs["own"]["sandbox_id"]
        assert own_id != given_id
        # Every attempt of the step sends one call id, so a retry after its
        # worker died gets the run that the session goes on with.
        step = StepRequest(
            execution_id=run["execution_id"], step="given", type="sandbox_execution"
        )
        given_history = await client.get_workflow_handle(
            f"sandbox-{given_id}"
        ).fetch_history()
        assert step_call_id(step).encode() in payload_bytes(given_history.events)

        for sandbox_id, secret in ((given_id, given_secret), (own_id, own_secret)):
            logs = await call(ctx, "sandbox_logs", sandbox_id=sandbox_id)
            assert "[stdout] out ********" in logs["lines"]
            assert "[stderr] err ********" in logs["lines"]
            assert secret not in json.dumps(logs)
            handle = client.get_workflow_handle(f"sandbox-{sandbox_id}")
            history = await handle.fetch_history()
            stored = payload_bytes(history.events)
            assert b"out ********" in stored
            assert b"PLAIN_NAME" in stored
            assert secret.encode() not in stored
            streamed = await streamed_text(workers, sandbox_id)
            assert "out ********" in streamed["stdout"]
            assert "err ********" in streamed["stderr"]
            assert secret not in json.dumps(streamed)
    finally:
        await call(ctx, "sandbox_delete", sandbox_id=given_id)


async def streamed_text(settings: Settings, sandbox_id: str) -> dict[str, str]:
    """Return a sandbox's output stream by `stream` (stdout, stderr, the
    start and exit events) once its last chunk is written, since the writes
    go out after the call returns."""
    query = select(ExecutionOutput).where(
        ExecutionOutput.stream_kind == "sandbox",
        ExecutionOutput.stream_id == sandbox_id,
    )
    for _ in range(100):
        with session_scope(settings.effective_database_url) as session:
            rows = session.exec(query.order_by(ExecutionOutput.id)).all()
            if rows and rows[-1].final:
                texts: dict[str, str] = {}
                for row in rows:
                    texts[row.stream] = texts.get(row.stream, "") + row.text
                return texts
        await asyncio.sleep(0.1)
    raise AssertionError(f"the stream of {sandbox_id} has no final chunk")


async def test_unchanged_body_keeps_its_version(
    client: Client, settings: Settings
) -> None:
    ctx = ToolContext(settings, temporal_client=client)
    steps = [sandbox_step("ok")]
    first = await call(ctx, "workflow_create", name="sealed-same", steps=steps)
    again = await call(ctx, "workflow_create", name="sealed-same", steps=steps)
    assert (again["version"], again["new_version"]) == (1, False)
    changed = [sandbox_step("ok")]
    changed[0]["params"]["env_vars"]["TOK_X"] = SECRET + "-2"
    other = await call(ctx, "workflow_create", name="sealed-same", steps=changed)
    assert (other["version"], other["new_version"]) == (2, True)
    assert first["workflow_id"] == other["workflow_id"]


async def test_foreign_sealed_value_rejected(
    client: Client, settings: Settings
) -> None:
    ctx = ToolContext(settings, temporal_client=client)
    created = await call(
        ctx, "workflow_create", name="sealed-source", steps=[sandbox_step("ok")]
    )
    sealed = stored_specs(settings, created["workflow_id"])[0]["steps"][0]
    with pytest.raises(ToolError) as caught:
        await call(ctx, "workflow_create", name="sealed-copy", steps=[sealed])
    assert caught.value.kind == "invalid_argument"
    assert "params.env_vars.TOK_X" in caught.value.message
    assert "pass the plain value" in caught.value.message
    listed = await call(ctx, "workflow_list", limit=100)
    assert "sealed-copy" not in [w["name"] for w in listed["workflows"]]


async def test_legacy_plain_definition_sealed(
    client: Client, workers: Settings
) -> None:
    """A definition stored in the clear before sealing existed."""
    url = workers.effective_database_url
    steps = [sandbox_step("ok")]
    spec = {"name": "legacy-plain", "steps": steps}
    with session_scope(url) as session:
        session.add(WorkflowDefinitionRow(id="wf_legacy00001", name="legacy-plain"))
        session.flush()
        session.add(
            WorkflowVersionRow(
                definition_id="wf_legacy00001", version=1, spec=spec, spec_hash="x"
            )
        )
    ctx = ToolContext(workers, temporal_client=client)
    run = await call(
        ctx, "workflow_execute", workflow_id="wf_legacy00001", **{"async": False}
    )
    assert run["status"] == "completed"
    assert run["result"]["steps"][0]["output"]["stdout"] == "match\nout ********\n"
    history = await client.get_workflow_handle(run["execution_id"]).fetch_history()
    text = history_text(history.to_json())
    assert "sealed:v1:" in text
    assert SECRET not in text

    rewritten = await call(ctx, "workflow_create", name="legacy-plain", steps=steps)
    assert (rewritten["version"], rewritten["new_version"]) == (2, True)
    latest = store.get_definition(url, "wf_legacy00001")[2]
    assert latest.steps[0].params["env_vars"]["TOK_X"].startswith("sealed:v1:")
    assert SECRET in json.dumps(stored_specs(workers, "wf_legacy00001")[0])
    assert SECRET not in json.dumps(stored_specs(workers, "wf_legacy00001")[1])


async def test_concurrent_creates_all_stored(
    client: Client, settings: Settings
) -> None:
    ctx = ToolContext(settings, temporal_client=client)

    async def create(index: int) -> dict[str, Any]:
        return await call(
            ctx,
            "workflow_create",
            name="race-secrets",
            steps=[
                {
                    "name": "run",
                    "type": "sandbox_execution",
                    "params": {
                        "code": "print(1)",
                        "env_vars": {"DB_PASSWORD": f"SECRET-RACE-{index}"},
                    },
                }
            ],
        )

    results = await asyncio.gather(*(create(i) for i in range(8)))
    assert sorted(r["version"] for r in results) == list(range(1, 9))
    assert len({r["workflow_id"] for r in results}) == 1
    specs = stored_specs(settings, results[0]["workflow_id"])
    assert len(specs) == 8
    assert "SECRET-RACE" not in json.dumps(specs)
