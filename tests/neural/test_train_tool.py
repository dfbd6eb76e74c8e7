"""neural_train through the tool, with workers in this process."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from sqlmodel import select
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from app.contracts.neural import TrainJobInput, TrainJobResult
from app.contracts.queues import NEURAL, ORCHESTRATION
from app.db import session_scope
from app.neural import jobs, store
from app.neural.data import load_arrays
from app.neural.models import NeuralJob, NeuralSession
from app.settings import Settings
from app.storage import storage_for
from app.tools import ToolContext, ToolError, ToolInputError, invoke_tool, load_tools
from tests.conftest import running_workers, wait_for_pollers
from tests.support.replay import replay_run
from workers.registry import all_workflows

load_tools()


def _config(
    architecture: str = "feedforward", epochs: int = 3, batch_size: int = 64
) -> dict:
    return {
        "architecture": {"type": architecture, "layers": [32]},
        "training": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 0.01},
    }


async def test_train_predict_status(client: Client, settings: Settings) -> None:
    async with running_workers(client, settings, [ORCHESTRATION, NEURAL]):
        ctx = ToolContext(settings, temporal_client=client)
        result = await invoke_tool(
            ctx, "neural_train", {"config": _config(), "tier": "nano"}
        )
        assert result["status"] == "completed"
        assert result["epochs_completed"] == 3
        assert result["accuracy"] > 0.8
        assert result["jit"] is True
        status = await invoke_tool(
            ctx, "neural_training_status", {"job_id": result["job_id"]}
        )
        assert status["status"] == "completed"
        assert [e["epoch"] for e in status["epochs"]] == [1, 2, 3]
        assert status["epochs"][-1]["loss"] < status["epochs"][0]["loss"]
        # Every tool pairs loss with accuracy on the same (test) split, and
        # names the last epoch's training loss apart.
        last = status["epochs"][-1]
        assert result["train_loss"] == last["loss"]
        assert result["test_loss"] == result["loss"]
        assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
        assert result["accuracy"] == pytest.approx(last["val_accuracy"], rel=1e-5)
        assert result["train_loss"] != result["test_loss"]
        for key in ("loss", "accuracy", "train_loss", "test_loss"):
            assert status[key] == result[key], key
        models = await invoke_tool(ctx, "neural_list_models", {})
        record = next(
            m for m in models["models"] if m["model_id"] == result["model_id"]
        )
        assert record["evaluated_on"] == "test"
        for key in ("loss", "accuracy", "train_loss", "test_loss"):
            assert record[key] == result[key], key

        from sklearn.datasets import load_digits

        bunch = load_digits()
        samples = bunch.data[:20].tolist()
        predicted = await invoke_tool(
            ctx, "neural_predict", {"model_id": result["model_id"], "input": samples}
        )
        _, spec, params, mean, std = store.load_model(settings, result["model_id"])
        expected = jobs.predict_logits(spec, params, mean, std, samples).argmax(axis=1)
        assert predicted["classes"] == expected.tolist()
        assert np.mean(np.asarray(predicted["classes"]) == bunch.target[:20]) > 0.7
        await replay_run(client, f"neural-train-{result['job_id']}", all_workflows())


async def test_eager_training_says_so(client: Client, neural_workers: Settings) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    result = await invoke_tool(
        ctx,
        "neural_train",
        {
            "config": _config(epochs=1, batch_size=128),
            "dataset": "iris",
            "tier": "nano",
            "wasmOptimization": False,
        },
    )
    assert result["jit"] is False
    assert result["compilation"] == "eager (not jit-compiled)"


async def test_inline_dataset_goes_to_storage(
    client: Client, neural_workers: Settings
) -> None:
    ctx = ToolContext(neural_workers, temporal_client=client)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(int)
    result = await invoke_tool(
        ctx,
        "neural_train",
        {
            "config": _config(epochs=2, batch_size=16),
            "dataset": {"X": x.tolist(), "y": y.tolist()},
        },
    )
    assert result["status"] == "completed"
    history = await client.get_workflow_handle(
        f"neural-train-{result['job_id']}"
    ).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    payload = started.input.payloads[0].data.decode()
    # The workflow input carries a storage reference, not the samples.
    assert '"bucket":"datasets"' in payload
    assert f'"path":"inline/{result["job_id"]}.npz"' in payload
    assert '"X"' not in payload


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"config": {"architecture": {"type": "resnet"}}},
            "unknown architecture 'resnet'",
        ),
        (
            {
                "config": {
                    "architecture": {"type": "cnn"},
                    "training": {"batch_size": 0},
                }
            },
            "config.training.batch_size: 0",
        ),
        (
            {"config": {"architecture": {"type": "cnn"}}, "dataset": "cifar"},
            "unknown data set 'cifar'",
        ),
        (
            {
                "config": {"architecture": {"type": "cnn"}},
                "dataset": {"X": [[1], [2], [3], [4]], "y": [0, 1]},
            },
            "X has 4 samples but y has 2",
        ),
        (
            {
                "config": {"architecture": {"type": "cnn"}},
                "dataset": {"X": [[1], [2], [3], [4]], "y": [0, 0, 0, 0]},
            },
            r"labels have a single class 0;",
        ),
        (
            {"config": {"architecture": {"type": "feedforward", "layers": [0]}}},
            r"config\.architecture\.layers: \[0\] is invalid: .*layers\[0\]=0 has "
            "no positive width",
        ),
        (
            {
                "config": {
                    "architecture": {"type": "feedforward", "layers": [64, 100000000]}
                }
            },
            r"config\.architecture\.layers: \[64, 100000000\] is invalid: .*"
            r"layers\[1\]=100000000 is wider than the maximum of 4096 units; give at "
            "most 4096",
        ),
        (
            {
                "config": {"architecture": {"type": "cnn", "layers": [4096, 4096]}},
                "dataset": "iris",
            },
            r"config\.architecture\.layers: \[4096, 4096\] is invalid: the cnn "
            "model with layers \\[4096, 4096\\] on 4 features and 3 classes has "
            "151,052,291 parameters, more than the maximum of 20,000,000; use "
            "fewer or narrower layers",
        ),
    ],
)
async def test_bad_inputs_rejected(
    arguments: dict, message: str, neural_settings: Settings
) -> None:
    ctx = ToolContext(neural_settings)
    with pytest.raises(ToolError, match=message) as caught:
        await invoke_tool(ctx, "neural_train", arguments)
    if "config" in message:
        # Validation errors list each field under `errors`.
        assert caught.value.errors[0]["field"].startswith("config.")  # type: ignore[attr-defined]


_INLINE = {"X": [[1, 2], [3, 4], [5, 6], [7, 8], [1, 1]], "y": [0, 1, 0, 1, 0]}
_CSV = b"1,2,0\n3,4,1\n5,6,0\n7,8,1\n1,1,0\n2,2,1\n"
_SEMICOLONS = _CSV.replace(b",", b";")


def _leftovers(settings: Settings) -> dict[str, list[str]]:
    """Job and session rows and stored data sets: what a failed call must
    not leave behind."""
    with session_scope(settings.effective_database_url) as session:
        jobs_left = [job.id for job in session.exec(select(NeuralJob))]
        sessions_left = [row.id for row in session.exec(select(NeuralSession))]
    return {
        "jobs": jobs_left,
        "sessions": sessions_left,
        "datasets": storage_for(settings).list("datasets"),
    }


_NOTHING: dict[str, list[str]] = {"jobs": [], "sessions": [], "datasets": []}


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            {**_INLINE, "y": ["a", "b", "a", "b", None]},
            r"invalid dataset: y\[4\] = None is neither an integer nor a string; "
            "labels must be all integers or all strings",
        ),
        (
            {**_INLINE, "y": [0, "b", 0, 1, [1]]},
            r"invalid dataset: y\[1\] = 'b' is a string but y\[0\] = 0 is an "
            "integer",
        ),
        (
            {**_INLINE, "X": [[1, 2], [3, True], [5, 6], [7, 8], [1, 1]]},
            r"invalid dataset: X\[1\]\[1\] = true is invalid",
        ),
        (
            {"bucket": "uploads", "path": "semicolons.csv", "label_col": "label"},
            "invalid dataset: dataset has the unknown key 'label_col'; did you mean "
            "'label_column'\\? an object in storage takes only the keys bucket, "
            "label_column, path",
        ),
        (
            {**_INLINE, "label_column": 0},
            "invalid dataset: dataset has the unknown key 'label_column'; an "
            "inline data set takes only the keys X, data, labels, y",
        ),
        (
            {"bucket": "datasets", "path": "junk.npz"},
            "invalid dataset: NPZ object datasets/junk.npz cannot be read: it is not "
            r"an NPZ \(ZIP\) archive",
        ),
        (
            {**_INLINE, "X": [[], [], [], [], []]},
            r"invalid dataset: X has 0 features per sample \(X\[0\] = \[\]\); give "
            "every sample at least one feature value",
        ),
        (
            {"bucket": "uploads", "path": "semicolons.csv"},
            "invalid dataset: CSV object uploads/semicolons.csv has 1 column, so "
            "each row is a label without features; separate the values with commas",
        ),
    ],
)
async def test_bad_dataset_writes_nothing(
    dataset: dict, message: str, offline_settings: Settings
) -> None:
    storage_for(offline_settings).put("datasets", "junk.npz", b"not a zip")
    storage_for(offline_settings).put("uploads", "semicolons.csv", _SEMICOLONS)
    ctx = ToolContext(offline_settings)
    arguments = {"config": _config(epochs=1), "dataset": dataset, "tier": "nano"}
    with pytest.raises(ToolError, match=message) as caught:
        await invoke_tool(ctx, "neural_train", arguments)
    assert caught.value.kind == "invalid_argument"
    cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "bad data"})
    await invoke_tool(ctx, "neural_node_deploy", {"cluster_id": cluster["cluster_id"]})
    with pytest.raises(ToolError, match=message) as caught:
        await invoke_tool(
            ctx,
            "neural_train_distributed",
            {"cluster_id": cluster["cluster_id"], "dataset": dataset},
        )
    assert caught.value.kind == "invalid_argument"
    assert _leftovers(offline_settings) == {**_NOTHING, "datasets": ["junk.npz"]}


_COLUMN_FIX = (
    r"give a column index from 0 to 2 \(or -3 to -1 from the end\) or a header name"
)


@pytest.mark.parametrize(
    ("label_column", "problem"),
    [
        (7, "uploads/a.csv has 3 columns"),
        (3, "uploads/a.csv has 3 columns"),
        (-4, "uploads/a.csv has 3 columns"),
        (1.5, "it is neither an integer column index nor a header name"),
        (None, "it is neither an integer column index nor a header name"),
        ([0], "it is neither an integer column index nor a header name"),
        (True, "a boolean is not a column index"),
    ],
)
async def test_bad_label_column_rejected(
    label_column: Any, problem: str, offline_settings: Settings
) -> None:
    storage_for(offline_settings).put("uploads", "a.csv", _CSV)
    ctx = ToolContext(offline_settings)
    dataset = {"bucket": "uploads", "path": "a.csv", "label_column": label_column}
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx,
            "neural_train",
            {"config": _config(epochs=1), "dataset": dataset, "tier": "nano"},
        )
    assert caught.value.kind == "invalid_argument"
    # A boolean is written as JSON's true, as the caller sent it.
    shown = "true" if label_column is True else repr(label_column)
    assert re.fullmatch(
        rf"invalid dataset: label_column {re.escape(shown)} is "
        rf"invalid: {problem}; {_COLUMN_FIX}",
        caught.value.message,
    ), caught.value.message
    assert _leftovers(offline_settings) == _NOTHING


@pytest.mark.parametrize(
    ("label_column", "labels"),
    # Whole-number labels are read as numbers.
    [(-1, [0, 1, 0]), (0, [1, 3, 5]), (1.0, [2, 4, 6])],
)
def test_label_column_picks_column(
    label_column: Any, labels: list[int], offline_settings: Settings
) -> None:
    storage_for(offline_settings).put("uploads", "a.csv", _CSV)
    source = {"bucket": "uploads", "path": "a.csv", "label_column": label_column}
    x, y = load_arrays(source, offline_settings)
    assert y[:3].tolist() == labels
    assert x.shape == (6, 2)


async def _train_both(ctx: ToolContext) -> list[ToolError]:
    """Call neural_train and neural_train_distributed with an inline data set
    and return their errors."""
    errors = []
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx,
            "neural_train",
            {"config": _config(epochs=1), "dataset": _INLINE, "tier": "nano"},
        )
    errors.append(caught.value)
    cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "no temporal"})
    await invoke_tool(ctx, "neural_node_deploy", {"cluster_id": cluster["cluster_id"]})
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx,
            "neural_train_distributed",
            {"cluster_id": cluster["cluster_id"], "dataset": _INLINE},
        )
    errors.append(caught.value)
    return errors


async def test_unreachable_temporal_writes_nothing(
    offline_settings: Settings,
) -> None:
    errors = await _train_both(ToolContext(offline_settings))
    for error in errors:
        assert error.kind == "unavailable"
        assert "cannot reach Temporal at 127.0.0.1:1" in error.message
    assert _leftovers(offline_settings) == _NOTHING


class _StartFails:
    """A Temporal client whose workflow starts fail, to force that fault."""

    async def start_workflow(self, *args: Any, **kwargs: Any) -> Any:
        raise RPCError("frontend went away", RPCStatusCode.UNAVAILABLE, b"")


async def test_failed_start_removes_records(offline_settings: Settings) -> None:
    ctx = ToolContext(offline_settings, temporal_client=_StartFails())  # type: ignore[arg-type]
    errors = await _train_both(ctx)
    assert "workflow NeuralTrainWorkflow could not be started: frontend went away" in (
        errors[0].message
    )
    assert "workflow DistributedTrainingWorkflow could not be started" in (
        errors[1].message
    )
    for error in errors:
        assert error.kind == "unavailable"
    assert _leftovers(offline_settings) == _NOTHING


@activity.defn(name="neural_train_model")
async def _failing_train(request: TrainJobInput) -> TrainJobResult:
    raise ApplicationError("injected fault", type="InvalidInput", non_retryable=True)


async def test_failed_job_named_once(client: Client, neural_settings: Settings) -> None:
    ctx = ToolContext(neural_settings, temporal_client=client)
    async with (
        running_workers(client, neural_settings, [ORCHESTRATION]),
        Worker(client, task_queue=NEURAL, activities=[_failing_train]),
    ):
        await wait_for_pollers(client, neural_settings.namespace, [NEURAL])
        with pytest.raises(ToolError) as caught:
            await invoke_tool(
                ctx,
                "neural_train",
                {"config": _config(epochs=1), "dataset": "iris", "tier": "nano"},
            )
    message = caught.value.message
    assert message.startswith("training job job_")
    assert message.count("failed:") == 1, message
    assert "injected fault" in message
    with session_scope(neural_settings.effective_database_url) as session:
        job = session.exec(select(NeuralJob)).one()
    assert job.status == "failed"
    assert message.startswith(f"training job {job.id} failed: ")


async def test_empty_layers_use_tier(offline_settings: Settings) -> None:
    ctx = ToolContext(offline_settings)
    config = {
        "architecture": {"type": "feedforward", "layers": []},
        "training": {"epochs": 0},
    }
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ctx, "neural_train", {"config": config, "dataset": "iris", "tier": "nano"}
        )
    # Only the real error: empty layers select the tier's widths.
    assert [e["field"] for e in caught.value.errors] == [  # type: ignore[attr-defined]
        "config.training.epochs"
    ]
    assert "unknown tier" not in caught.value.message
    config["training"] = {"epochs": 1}
    with pytest.raises(ToolError, match="cannot reach Temporal"):
        await invoke_tool(
            ctx, "neural_train", {"config": config, "dataset": "iris", "tier": "nano"}
        )


async def test_terminated_job_reported_failed(
    client: Client, neural_workers: Settings
) -> None:
    """A job whose workflow is terminated from outside, which runs no code of
    its own to record it, is reported failed with the reason, not running."""
    ctx = ToolContext(neural_workers, temporal_client=client)
    started = await invoke_tool(
        ctx,
        "neural_train",
        {
            "config": {
                "architecture": {"type": "feedforward"},
                "training": {"epochs": 500, "batch_size": 4},
            },
            "dataset": "digits",
            "tier": "nano",
            "wait": False,
        },
    )
    with session_scope(neural_workers.effective_database_url) as session:
        job = session.get(NeuralJob, started["job_id"])
        assert job is not None
        workflow_id = job.workflow_id
    await client.get_workflow_handle(workflow_id).terminate("operator")
    status = await invoke_tool(
        ctx, "neural_training_status", {"job_id": started["job_id"]}
    )
    assert status["status"] == "failed"
    assert status["error"] == (
        f"its workflow {workflow_id} was terminated before the job ended"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {
                "config": {
                    "architecture": {"type": "feedforward"},
                    "training": {"epochs": "2"},
                }
            },
            "config.training.epochs",
        ),
        ({"wasmOptimization": "false"}, "wasmOptimization"),
    ],
)
async def test_train_numbers_and_flags_strict(
    offline_settings: Settings, change: dict[str, Any], field: str
) -> None:
    """Numbers and flags given as strings are rejected, as the workflow tools
    reject them."""
    arguments = {"config": {"architecture": {"type": "feedforward"}}, **change}
    with pytest.raises(ToolInputError) as caught:
        await invoke_tool(ToolContext(offline_settings), "neural_train", arguments)
    assert [e["field"] for e in caught.value.errors] == [field]


_SECRET_CSV = b"a,b,label\n1,2,0\npostgresql://app:sk-test-CELL@db/prod,1,1\n"


async def test_stored_dataset_needs_storage_group(offline_settings: Settings) -> None:
    storage_for(offline_settings).put("priv", "db.csv", _SECRET_CSV)
    arguments = {
        "config": _config(epochs=1),
        "dataset": {"bucket": "priv", "path": "db.csv"},
        "tier": "nano",
    }
    neural_only = ToolContext(
        offline_settings, user_id="key:n", key_id="k_neural", groups=("neural",)
    )
    for missing in ["db.csv", "nope.csv"]:
        arguments["dataset"] = {"bucket": "priv", "path": missing}
        with pytest.raises(ToolError) as denied:
            await invoke_tool(neural_only, "neural_train", arguments)
        assert denied.value.kind == "forbidden"
        assert "tool group storage" in denied.value.message
        assert "API key k_neural" in denied.value.message
        assert "--group storage" in denied.value.message

    # A key with both groups gets the data set's own error, without the cell.
    both = ToolContext(
        offline_settings, user_id="key:ns", key_id="k_ns", groups=("neural", "storage")
    )
    arguments["dataset"] = {"bucket": "priv", "path": "db.csv"}
    with pytest.raises(ToolError) as invalid:
        await invoke_tool(both, "neural_train", arguments)
    assert invalid.value.kind == "invalid_argument"
    assert "line 3, column 1" in invalid.value.message
    assert "sk-test-CELL" not in invalid.value.message
    assert _leftovers(offline_settings) == _NOTHING


async def test_stored_labels_not_quoted(offline_settings: Settings) -> None:
    single = (
        b"a,label\n1,sk-test-LABEL\n2,sk-test-LABEL\n3,sk-test-LABEL\n4,sk-test-LABEL\n"
    )
    storage_for(offline_settings).put("priv", "one.csv", single)
    storage_for(offline_settings).put("priv", "named.csv", b"a,b\n1,0\n")
    ctx = ToolContext(offline_settings)
    for dataset in [
        {"bucket": "priv", "path": "one.csv"},
        {"bucket": "priv", "path": "named.csv", "label_column": "sk-test-NAME"},
    ]:
        with pytest.raises(ToolError) as invalid:
            await invoke_tool(
                ctx,
                "neural_train",
                {"config": _config(epochs=1), "dataset": dataset, "tier": "nano"},
            )
        assert invalid.value.kind == "invalid_argument"
        assert "sk-test-LABEL" not in invalid.value.message
        assert "['a', 'b']" not in invalid.value.message


async def test_dataset_checked_with_call_seed(offline_settings: Settings) -> None:
    """A value that lies in the test split under the call's seed, far from
    the training split's mean, is rejected before a job or session exists,
    though under seed 0 it lies in the training split and passes."""
    features = [[0.2 * (i % 2)] for i in range(20)]
    features[1] = [3e38]
    dataset = {"X": features, "y": [i % 2 for i in range(20)]}
    # The test split is the permutation's first 4 samples. Under seed 0,
    # the check passes and only the unreachable Temporal fails the call.
    assert 1 not in np.random.default_rng(0).permutation(20)[:4]
    assert 1 in np.random.default_rng(1).permutation(20)[:4]
    ctx = ToolContext(offline_settings)
    cluster = await invoke_tool(ctx, "neural_cluster_init", {"name": "seeded"})
    await invoke_tool(ctx, "neural_node_deploy", {"cluster_id": cluster["cluster_id"]})
    calls = [
        (
            "neural_train",
            {"config": _config(epochs=1), "dataset": dataset, "tier": "nano"},
        ),
        (
            "neural_train_distributed",
            {"cluster_id": cluster["cluster_id"], "dataset": dataset},
        ),
    ]
    for name, arguments in calls:
        with pytest.raises(ToolError, match="cannot reach Temporal"):
            await invoke_tool(ctx, name, {**arguments, "seed": 0})
        with pytest.raises(ToolError) as caught:
            await invoke_tool(ctx, name, {**arguments, "seed": 1})
        assert caught.value.kind == "invalid_argument"
        assert caught.value.message.startswith(
            "invalid dataset: X[1][0] = 3e+38 lies "
        ), caught.value.message
        assert "np.float32" not in caught.value.message
    assert _leftovers(offline_settings) == _NOTHING
