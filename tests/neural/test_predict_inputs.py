"""Feature values that predictions reject, and outputs that are never NaN."""

from __future__ import annotations

import io
import json
import math

import jax
import numpy as np
import pytest

from app.neural import data, jobs, store
from app.neural.models import NeuralModel
from app.neural.nets import ModelSpec, init_params
from app.settings import Settings
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool, load_tools

load_tools()


def _stored_model(settings: Settings, *, diverged: bool = False) -> str:
    """Store an untrained iris model; `diverged` gives it NaN weights, as a
    training run whose loss exploded leaves them."""
    dataset = data.prepare("iris", settings)
    spec = ModelSpec("feedforward", dataset.features, dataset.classes, (8,))
    params = init_params(spec, 0)
    if diverged:
        params = jax.tree_util.tree_map(lambda leaf: leaf * np.nan, params)
    model_id = store.new_id("model_")
    path = store.save_model_params(
        settings, jobs.model_path(model_id), params, dataset.mean, dataset.std
    )
    store.add_record(
        settings,
        NeuralModel(
            id=model_id,
            architecture="feedforward",
            spec={**spec.to_dict(), "label_names": dataset.label_names},
            dataset="iris",
            storage_path=path,
        ),
    )
    return model_id


INVALID_FEATURES = [
    ([[None, None, None, None]], "0.0", None, "not null"),
    ([[None, 1, 2, 3]], "0.0", None, "not null"),
    ([[5.1, 3.5, 1.4, 0.2], [1, None, 2, 3]], "1.1", None, "not null"),
    ([None, 1, 2, 3], "0", None, "not null"),
    ([[True, False, 1, 2]], "0.0", True, "not a boolean; send 1 or 0"),
    ([[1, 2, 3, "4"]], "0.3", "4", "not a string"),
    ([[1, 2, {"x": 1}, 3]], "0.2", {"x": 1}, "Input should be a number"),
    ([[1e39, 1, 2, 3]], "0.0", 1e39, "float32 range"),
]


@pytest.mark.parametrize(("values", "index", "value", "problem"), INVALID_FEATURES)
async def test_predict_rejects_non_numbers(
    values: list, index: str, value: object, problem: str, offline_settings: Settings
) -> None:
    model_id = _stored_model(offline_settings)
    ctx = ToolContext(offline_settings)
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(
            ctx, "neural_predict", {"model_id": model_id, "input": values}
        )
    error = caught.value
    assert error.kind == "invalid_argument"
    assert error.errors[0]["field"] == f"input.{index}"
    assert error.errors[0]["value"] == value
    assert problem in error.errors[0]["message"]
    if value is None or isinstance(value, bool):
        # Written as JSON's null, true and false, as the caller sent them.
        shown = json.dumps(value)
    else:
        shown = repr(value)
    assert f"input.{index}: {shown} is invalid" in error.message


@pytest.mark.parametrize(("values", "index", "value", "problem"), INVALID_FEATURES)
async def test_predict_distributed_rejects_non_numbers(
    values: list, index: str, value: object, problem: str, offline_settings: Settings
) -> None:
    ctx = ToolContext(offline_settings)
    cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "inputs"})
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(
            ctx,
            "neural_predict_distributed",
            {"cluster_id": cluster["cluster_id"], "input_data": values},
        )
    assert caught.value.errors[0]["field"] == f"input_data.{index}"
    assert problem in caught.value.errors[0]["message"]


async def test_predict_empty_input_rejected(offline_settings: Settings) -> None:
    model_id = _stored_model(offline_settings)
    ctx = ToolContext(offline_settings)
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ctx, "neural_predict", {"model_id": model_id, "input": []})
    assert caught.value.kind == "invalid_argument"
    assert caught.value.message == (
        f"invalid input for model {model_id}: input has no samples; give one "
        "sample of 4 numbers, or a list of such samples"
    )


def test_parse_input_rejects_non_numbers() -> None:
    # Callers other than the tools get the same check.
    with pytest.raises(jobs.InvalidFeatureError, match=r"input\[0\]\[0\] = null"):
        jobs.parse_input([[None, 1, 2, 3]], 4)
    with pytest.raises(jobs.InvalidFeatureError, match=r"input\[2\] = true"):
        jobs.parse_input([1, 2, True, 3], 4)


async def test_predict_valid_input_is_finite(offline_settings: Settings) -> None:
    model_id = _stored_model(offline_settings)
    ctx = ToolContext(offline_settings)
    result = await invoke_tool(
        ctx,
        "neural_predict",
        {"model_id": model_id, "input": [[5.1, 3.5, 1.4, 0.2], [6, 3, 5, 2]]},
    )
    assert len(result["probabilities"]) == 2
    for row in result["probabilities"]:
        assert all(math.isfinite(p) for p in row)
        assert sum(row) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize(
    ("diverged", "values"),
    [
        (True, [[5.1, 3.5, 1.4, 0.2]]),
        # Finite in float32, but standardizing overflows to infinity.
        (False, [[3e38, -3e38, 3e38, -3e38]]),
    ],
)
async def test_predict_non_finite_output_rejected(
    diverged: bool, values: list, offline_settings: Settings
) -> None:
    model_id = _stored_model(offline_settings, diverged=diverged)
    ctx = ToolContext(offline_settings)
    with pytest.raises(
        ToolError, match=r"outputs for input\[0\] are not finite"
    ) as caught:
        await invoke_tool(
            ctx, "neural_predict", {"model_id": model_id, "input": values}
        )
    assert caught.value.kind == "invalid_argument"


# Stands for a model file rewritten with one array of the wrong shape.
RESHAPED = b"reshaped"


@pytest.mark.parametrize(
    ("content", "kind", "problem"),
    [
        (None, "not_found", "are missing"),
        (b"garbage", "failed", "cannot be read as a model file"),
        (b"PK\x03\x04truncated", "failed", "cannot be read as a model file"),
        (b"", "failed", "cannot be read as a model file"),
        (RESHAPED, "failed", "cannot be read as a model file"),
    ],
)
async def test_predict_broken_model_file(
    content: bytes | None, kind: str, problem: str, offline_settings: Settings
) -> None:
    """A missing or corrupt weights file is the server's fault, not the
    input's, and numpy's advice on pickled data is not passed on."""
    model_id = _stored_model(offline_settings)
    path = jobs.model_path(model_id)
    if content is None:
        store.delete_object(offline_settings, path)
    elif content == RESHAPED:
        # A readable archive whose first weight array has the wrong shape.
        with np.load(io.BytesIO(store.get_object(offline_settings, path))) as archive:
            arrays = {name: archive[name] for name in archive.files}
        first = next(name for name in arrays if not name.startswith("__"))
        arrays[first] = np.zeros((1, 1), dtype=np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        store.put_object(offline_settings, path, buffer.getvalue())
    else:
        store.put_object(offline_settings, path, content)
    ctx = ToolContext(offline_settings)
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx, "neural_predict", {"model_id": model_id, "input": [5.1, 3.5, 1.4, 0.2]}
        )
    assert caught.value.kind == kind
    assert caught.value.message == (
        f"the stored weights of model {model_id} at {path!r} in bucket 'models' "
        f"{problem}; train the model again"
    )
    assert "pickle" not in caught.value.message
    assert "invalid input" not in caught.value.message
