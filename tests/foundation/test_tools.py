import typing

import pytest
from temporalio.client import Client

from app.services.audit import list_calls
from app.settings import Settings
from app.tools import (
    ToolContext,
    ToolError,
    ToolInputError,
    get_tool,
    invoke_tool,
    load_tools,
)
from app.tools.numbers import boolean_number_errors

load_tools()


async def test_system_health_tool_is_audited(client: Client, workers: Settings) -> None:
    ctx = ToolContext(workers, user_id="tester", temporal_client=client)
    result = await invoke_tool(ctx, "system_health", {})
    assert result["status"] == "healthy"
    assert "heapUsed" in result["memory"]
    events = list_calls(workers.effective_database_url, tool="system_health")
    assert events[0].user_id == "tester"
    assert events[0].outcome == "success"
    assert events[0].duration_ms > 0


async def test_invalid_argument_names_field(settings: Settings) -> None:
    ctx = ToolContext(settings)
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ctx, "audit_log", {"limit": 0})
    assert "limit: 0 is invalid" in caught.value.message
    assert "greater than or equal to 1" in caught.value.message
    assert caught.value.errors[0]["field"] == "limit"
    events = list_calls(settings.effective_database_url, tool="audit_log")
    assert events[0].outcome == "error"
    assert "limit" in (events[0].error or "")


@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), float("-inf")])
async def test_non_finite_number_rejected(settings: Settings, value: object) -> None:
    # pydantic parses "nan" to a float whose every bound check fails, which
    # read as if the value were too large.
    arguments = {"task_id": "task_x", "wait_seconds": value}
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), "task_results", arguments)
    assert caught.value.errors[0]["field"] == "wait_seconds"
    assert "finite number" in caught.value.message
    assert "less than or equal" not in caught.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_number_in_object_rejected(
    settings: Settings, value: float
) -> None:
    # Step params are a free-form object, which no float field types.
    arguments = {
        "name": "nested",
        "steps": [{"name": "a", "type": "echo", "params": {"x": [1, value]}}],
    }
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), "workflow_create", arguments)
    assert caught.value.errors[0]["field"] == "steps.0.params.x.1"
    assert caught.value.errors[0]["value"] == repr(value)
    assert "finite number" in caught.value.message


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("audit_log", {"limit": True}, "limit"),
        ("task_results", {"task_id": "task_x", "wait_seconds": False}, "wait_seconds"),
        (
            "neural_node_deploy",
            {"cluster_id": "c", "model": "custom", "layers": [3, True]},
            "layers.1",
        ),
        (
            "workflow_create",
            {
                "name": "loose",
                "steps": [{"name": "a", "type": "echo", "retry_attempts": True}],
            },
            "steps.0.retry_attempts",
        ),
    ],
)
async def test_boolean_for_number_rejected(
    settings: Settings, tool: str, arguments: dict[str, object], field: str
) -> None:
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), tool, arguments)
    assert [e["field"] for e in caught.value.errors] == [field]
    assert "Input should be a valid" in caught.value.errors[0]["message"]


def test_float_field_still_takes_integer() -> None:
    model = get_tool("neural_train").input_model
    config = {"training": {"learning_rate": 1, "epochs": 2}}
    assert boolean_number_errors(model, {"config": config, "seed": 3}) == []


def test_every_tool_input_rejects_non_finite_numbers() -> None:
    from pydantic import BaseModel

    from app.tools.registry import all_tools

    def nested_models(model: type[BaseModel]) -> set[type[BaseModel]]:
        found = {model}
        for field in model.model_fields.values():
            for kind in _types_in(field.annotation):
                nested = isinstance(kind, type) and issubclass(kind, BaseModel)
                if nested and kind not in found:
                    found |= nested_models(kind)  # type: ignore[arg-type]
        return found

    for spec in all_tools():
        for model in nested_models(spec.input_model):
            config = model.model_config
            assert config.get("allow_inf_nan") is False, (spec.name, model.__name__)


def _types_in(annotation: object) -> list[object]:
    """Return `annotation` and every type argument inside it."""
    found = [annotation]
    for argument in typing.get_args(annotation):
        found += _types_in(argument)
    return found


async def test_unknown_argument_rejected(settings: Settings) -> None:
    with pytest.raises(ToolInputError, match="limt"):
        await invoke_tool(ToolContext(settings), "audit_log", {"limt": 5})


async def test_unknown_argument_suggests_field(settings: Settings) -> None:
    arguments = {"topology": "mesh", "maxAgent": 5}
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), "swarm_init", arguments)
    assert "maxAgent: 5 is invalid" in caught.value.message
    assert "did you mean maxAgents?" in caught.value.message
    assert caught.value.errors[0]["field"] == "maxAgent"
    assert "did you mean maxAgents?" in caught.value.errors[0]["message"]


async def test_both_spellings_of_argument(settings: Settings) -> None:
    arguments = {"topology": "mesh", "max_agents": 3, "maxAgents": 4}
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), "swarm_init", arguments)
    expected = (
        "max_agents and maxAgents are two spellings of one argument, and both "
        "were given; send only one"
    )
    assert expected in caught.value.message
    assert "did you mean" not in caught.value.message
    assert caught.value.errors[0]["field"] == "max_agents"
    assert caught.value.errors[0]["message"] == expected


async def test_unknown_argument_far_from_fields(settings: Settings) -> None:
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), "audit_log", {"colour": "red"})
    assert "did you mean" not in caught.value.message


async def test_missing_argument_is_required(settings: Settings) -> None:
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), "task_status", {})
    assert "task_id is required" in caught.value.message
    assert "missing is invalid" not in caught.value.message
    assert caught.value.errors[0]["field"] == "task_id"
    assert caught.value.errors[0]["value"] is None


@pytest.mark.parametrize(
    ("tool", "arguments", "field", "value"),
    [
        (
            "task_orchestrate",
            {
                "task": "x",
                "language": "bash",
                "priority": "medium",
                "strategy": "adaptive",
                "dependencies": [],
            },
            "language",
            "bash",
        ),
        (
            "task_orchestrate",
            {"task": "x", "code": "echo", "command": "ls", "priority": "high"},
            "code, command",
            {"code": "echo", "command": "ls"},
        ),
        (
            "task_orchestrate",
            {"task": "x", "action_args": {"limit": 1}},
            "action_args",
            {"limit": 1},
        ),
        ("execution_stream_subscribe", {}, "sandbox_id, execution_id", None),
        (
            "execution_stream_subscribe",
            {"sandbox_id": "s", "workflow_id": "w"},
            "sandbox_id, execution_id",
            {"sandbox_id": "s", "workflow_id": "w"},
        ),
    ],
)
async def test_cross_field_error_names_fields(
    settings: Settings,
    tool: str,
    arguments: dict[str, object],
    field: str,
    value: object,
) -> None:
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(settings), tool, arguments)
    error = caught.value.errors[0]
    assert error["field"] == field
    assert error["value"] == value
    assert f"{tool}: {field}: " in caught.value.message
    assert "(arguments)" not in caught.value.message
    assert "priority" not in caught.value.message
    assert "Value error" not in error["message"]


async def test_unknown_tool_is_not_found(settings: Settings) -> None:
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ToolContext(settings), "no_such_tool", {})
    assert caught.value.kind == "not_found"
    assert "did you mean" not in caught.value.message


async def test_unknown_tool_suggests_close_name(settings: Settings) -> None:
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ToolContext(settings), "swarm_lst", {})
    assert caught.value.kind == "not_found"
    assert "unknown tool 'swarm_lst'; did you mean swarm_list?" in caught.value.message


async def test_audit_log_tool_filters(client: Client, settings: Settings) -> None:
    ctx = ToolContext(settings, user_id="carol", temporal_client=client)
    await invoke_tool(ctx, "audit_log", {"limit": 1})
    other = ToolContext(settings, user_id="dave", temporal_client=client)
    await invoke_tool(other, "audit_log", {"limit": 1})
    result = await invoke_tool(ctx, "audit_log", {"user_id": "carol"})
    assert result["count"] >= 1
    assert {e["user_id"] for e in result["events"]} == {"carol"}


async def test_boolean_and_other_errors_reported_together(settings: Settings) -> None:
    ctx = ToolContext(settings)
    arguments = {
        "name": "both",
        "priority": "7",
        "steps": [
            {
                "name": "a",
                "type": "echo",
                "retry_attempts": True,
                "continue_on_failure": 1,
            }
        ],
    }
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ctx, "workflow_create", arguments)
    fields = [detail["field"] for detail in caught.value.errors]
    assert fields == [
        "steps.0.retry_attempts",
        "priority",
        "steps.0.continue_on_failure",
    ]
    for field in fields:
        assert f"{field}: " in caught.value.message
