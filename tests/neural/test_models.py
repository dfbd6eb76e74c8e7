"""Architectures, data checks and federated averaging, without Temporal."""

from __future__ import annotations

import io
from pathlib import Path

import jax
import numpy as np
import pytest

from app.neural import data, nets, training
from app.settings import Settings
from tests.neural.conftest import one_worker_plan


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.prepare("digits", Settings(), seed=0)


@pytest.mark.parametrize(
    "architecture",
    ["feedforward", "cnn", "lstm", "transformer", "autoencoder", "hybrid", "gnn"],
)
def test_architecture_reduces_loss(architecture: str, digits: data.Dataset) -> None:
    spec = nets.ModelSpec(
        architecture, digits.features, digits.classes, nets.layer_widths("nano", None)
    )
    trainer = training.get_trainer(spec, "adam", 0.01)
    params = nets.init_params(spec, 0)
    initial_loss, _ = trainer.evaluate(params, digits.x_test, digits.y_test)
    params, _, history = trainer.train(
        params,
        trainer.init_state(params),
        digits.x_train,
        digits.y_train,
        digits.x_test,
        digits.y_test,
        epochs=2,
        batch_size=64,
        seed=0,
    )
    assert len(history) == 2
    assert history[-1].val_loss < initial_loss


def test_mlp_reaches_95_percent(digits: data.Dataset) -> None:
    spec = nets.ModelSpec("feedforward", digits.features, digits.classes, (128,))
    trainer = training.get_trainer(spec, "adam", 0.001)
    params = nets.init_params(spec, 0)
    params, _, _ = trainer.train(
        params,
        trainer.init_state(params),
        digits.x_train,
        digits.y_train,
        digits.x_test,
        digits.y_test,
        epochs=20,
        batch_size=32,
        seed=0,
    )
    _, accuracy = trainer.evaluate(params, digits.x_test, digits.y_test)
    assert accuracy >= 0.95


def test_eager_matches_jit_step_count(digits: data.Dataset) -> None:
    spec = nets.ModelSpec("feedforward", digits.features, digits.classes, (16,))
    eager = training.Trainer(spec, "sgd", 0.1, jit=False)
    params = nets.init_params(spec, 0)
    _, _, loss, _, samples = eager.run_epoch(
        params,
        eager.init_state(params),
        digits.x_train[:256],
        digits.y_train[:256],
        64,
        0,
    )
    assert samples == 256
    assert np.isfinite(loss)


def test_federated_average_is_weighted() -> None:
    first = {"dense": {"w": np.array([[1.0, 2.0]]), "b": np.array([0.0])}}
    second = {"dense": {"w": np.array([[3.0, 6.0]]), "b": np.array([4.0])}}
    averaged = training.weighted_average([first, second], [300.0, 100.0])
    # By hand: (300 * a + 100 * b) / 400.
    np.testing.assert_allclose(averaged["dense"]["w"], [[1.5, 3.0]])
    np.testing.assert_allclose(averaged["dense"]["b"], [1.0])


def test_federated_average_rejects_zero_weight() -> None:
    tree = {"w": np.ones(2)}
    with pytest.raises(ValueError, match="sum to 0"):
        training.weighted_average([tree], [0.0])


def test_params_roundtrip_npz(digits: data.Dataset) -> None:
    spec = nets.ModelSpec("transformer", digits.features, digits.classes, (16,))
    params = nets.init_params(spec, 3)
    restored, extra = training.load_params(
        training.dump_params(params, {"epoch": np.asarray(4)})
    )
    assert int(extra["epoch"]) == 4
    for a, b in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(restored),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_split_is_deterministic() -> None:
    first = data.prepare("iris", Settings(), seed=5)
    second = data.prepare("iris", Settings(), seed=5)
    np.testing.assert_array_equal(first.x_test, second.x_test)
    assert first.classes == 3
    assert first.label_names == ["setosa", "versicolor", "virginica"]
    assert data.prepare("digits", Settings()).label_names == [str(d) for d in range(10)]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("mnist_fashion", "unknown data set 'mnist_fashion'"),
        (
            {"X": [[1, 2], [3, 4], [5, 6], [7, 8]], "y": [0, 1, 0]},
            "X has 4 samples but y has 3",
        ),
        ({"X": [[1], [2], [3], [4]]}, "needs features under"),
        ({"X": [[1], [2], [3], [4]], "y": [1, 1, 1, 1]}, "single class"),
        ({"bucket": "datasets", "path": "absent.csv"}, "absent.csv"),
    ],
)
def test_bad_datasets_name_the_value(source: object, message: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(data.DatasetError, match=message):
        data.prepare(source, Settings(data_dir=tmp_path))


def test_csv_from_storage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.storage import storage_for

    settings = Settings(data_dir=tmp_path)
    rows = "a,b,label\n" + "\n".join(
        f"{i},{i % 3},{'x' if i % 2 else 'y'}" for i in range(20)
    )
    storage_for(settings).put("datasets", "toy.csv", rows.encode())
    dataset = data.prepare({"bucket": "datasets", "path": "toy.csv"}, settings)
    assert dataset.features == 2
    assert dataset.label_names == ["x", "y"]
    # Whole-number labels written two ways are one class, as inline.
    numbered = "\n".join(f"{i},{i % 3},{['1', '1.0', '2'][i % 3]}" for i in range(20))
    storage_for(settings).put("datasets", "numbers.csv", numbered.encode())
    counted = data.prepare({"bucket": "datasets", "path": "numbers.csv"}, settings)
    assert counted.classes == 2
    assert counted.label_names == ["1", "2"]


def test_unknown_architecture_named() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        nets.check_architecture("resnet")


_FEATURES = [[1, 2], [3, 4], [5, 6], [7, 8], [1, 1]]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["a", "b", "a", "b", None], r"y\[4\] = None is neither an integer nor a"),
        ([0, "b", 0, 1, [1]], r"y\[1\] = 'b' is a string but y\[0\] = 0 is an"),
        ([0, 1, 0, 1, [1]], r"y\[4\] = \[1\] is neither an integer nor a string"),
        ([True, False, True, False, True], r"y\[0\] = True is neither"),
        ([0, 1, 0, 1, 1.5], r"y\[4\] = 1.5 is neither"),
        ([0, 1, 0, 1, 2**64], "beyond the 64-bit range"),
    ],
)
def test_inline_labels_integers_or_strings(labels: list, message: str) -> None:
    with pytest.raises(data.DatasetError, match=message) as caught:
        data.prepare({"X": _FEATURES, "y": labels}, Settings())
    if "neither" in message or "is a string" in message:
        assert "labels must be all integers or all strings" in str(caught.value)


def test_inline_labels_keep_plain_arrays() -> None:
    _, y = data.load_arrays({"X": _FEATURES, "y": [0, 1.0, 0, 1, 1]}, Settings())
    # 1.0 is an integer in JSON, and neither array needs pickling in NPZ.
    assert y.dtype == np.int64
    assert y.tolist() == [0, 1, 0, 1, 1]
    _, names = data.load_arrays(
        {"X": _FEATURES, "labels": ["a", "b", "a", "b", "c"]}, Settings()
    )
    assert names.dtype.kind == "U"


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([[1, None], [3, 4], [5, 6], [7, 8]], r"X\[0\]\[1\] = null is invalid: .*null"),
        ([[1, 2], [True, 4], [5, 6], [7, 8]], r"X\[1\]\[0\] = true is invalid"),
        ([[1, 2], [3, "4"], [5, 6], [7, 8]], r"X\[1\]\[1\] = '4' is invalid"),
    ],
)
def test_inline_features_must_be_numbers(features: list, message: str) -> None:
    with pytest.raises(data.DatasetError, match=message):
        data.prepare({"X": features, "y": [0, 1, 0, 1]}, Settings())


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


_VALID_NPZ = _npz(X=np.ones((6, 2)), y=np.array([0, 1, 0, 1, 0, 1]))
_NPY = io.BytesIO()
np.save(_NPY, np.ones(3))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"not a zip", "it is not an NPZ \\(ZIP\\) archive"),
        (b"", "it is not an NPZ \\(ZIP\\) archive"),
        (_VALID_NPZ[: len(_VALID_NPZ) // 2], "the archive is damaged or truncated"),
        (_NPY.getvalue(), "it is a single .npy array"),
        (
            _npz(X=np.ones((6, 2)), y=np.array([0, None, 1, 0, 1, 0], dtype=object)),
            "array y contains Python objects",
        ),
    ],
)
def test_unreadable_npz_named(blob: bytes, message: str, tmp_path: Path) -> None:
    from app.storage import storage_for

    settings = Settings(data_dir=tmp_path)
    storage_for(settings).put("datasets", "junk.npz", blob)
    with pytest.raises(
        data.DatasetError,
        match=f"NPZ object datasets/junk.npz cannot be read: {message}",
    ):
        data.prepare({"bucket": "datasets", "path": "junk.npz"}, settings)


def test_stored_npz_loads(tmp_path: Path) -> None:
    from app.storage import storage_for

    settings = Settings(data_dir=tmp_path)
    storage_for(settings).put("datasets", "ok.npz", _VALID_NPZ)
    dataset = data.prepare({"bucket": "datasets", "path": "ok.npz"}, settings)
    assert dataset.classes == 2


def test_binary_csv_named(tmp_path: Path) -> None:
    from app.storage import storage_for

    settings = Settings(data_dir=tmp_path)
    storage_for(settings).put("datasets", "bad.csv", b"\xff\xfe\x00binary")
    with pytest.raises(
        data.DatasetError, match=r"bad\.csv cannot be read: it is not UTF-8"
    ):
        data.prepare({"bucket": "datasets", "path": "bad.csv"}, settings)


def test_large_feature_values_standardize() -> None:
    """Features near float32's limit keep their information: a column that
    separates the classes stays finite and separating once standardized."""
    rng = np.random.default_rng(1)
    labels = np.arange(200) % 2
    big = np.where(labels == 1, 1.0, -1.0) * 1e20 * (1 + rng.random(200))
    edge = np.where(rng.random(200) < 0.5, 3e38, 2.9e38)
    source = {"X": np.column_stack([big, edge]).tolist(), "y": labels.tolist()}
    dataset = data.prepare(source, Settings(), seed=0)
    assert np.isfinite(dataset.x_train).all()
    assert np.isfinite(dataset.x_test).all()
    column = dataset.x_train[:, 0]
    assert (np.sign(column) == np.where(dataset.y_train == 1, 1, -1)).all()
    assert np.isfinite(dataset.mean).all()
    assert np.isfinite(dataset.std).all()
    assert dataset.x_train[:, 1].std() > 0.5


def test_ended_session_keeps_its_status(offline_settings: Settings) -> None:
    """A session that its cluster's terminate cancelled is not completed, and
    gets no models, by a last activity that finishes after the terminate."""
    from app.db import session_scope
    from app.neural import store
    from app.neural.models import NeuralModel, NeuralSession

    store.add_record(
        offline_settings,
        NeuralSession(
            id="session_t",
            cluster_id="c",
            workflow_id="w",
            status="running",
            rounds_total=1,
        ),
    )
    assert store.end_session(offline_settings, "session_t", status="cancelled")
    model = NeuralModel(
        id="model_t",
        session_id="session_t",
        cluster_id="c",
        node_id=None,
        architecture="feedforward",
        spec={},
        dataset="digits",
        storage_path="models/model_t.npz",
        loss=0.1,
        accuracy=0.9,
    )
    assert not store.end_session(
        offline_settings, "session_t", [model], status="completed", model_id="model_t"
    )
    assert not store.end_session(offline_settings, "session_t", status="failed")
    with session_scope(offline_settings.effective_database_url) as db:
        row = db.get(NeuralSession, "session_t")
        assert row is not None
        assert row.status == "cancelled"
        assert row.model_id is None
        assert db.get(NeuralModel, "model_t") is None


@pytest.mark.parametrize("checkpoint_seconds", [0.0, 3600.0])
def test_node_stops_when_its_session_ends(
    offline_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checkpoint_seconds: float,
) -> None:
    """A node whose session its cluster's terminate ended stops at its next
    epoch, and writes no epoch rows for it, whether that epoch checkpoints
    (0 s) or only reads the session's status (3600 s)."""
    from sqlmodel import select

    from app.contracts.neural import (
        NodeTrainInput,
        PrepareInput,
    )
    from app.db import session_scope
    from app.neural import distributed, store
    from app.neural.models import NeuralEpoch, NeuralSession

    monkeypatch.setattr(distributed, "SESSION_CHECK_SECONDS", 0.0)
    plan = one_worker_plan("session_end")
    store.add_record(
        offline_settings,
        NeuralSession(
            id="session_end",
            cluster_id=plan.cluster_id,
            workflow_id="w",
            status="running",
            rounds_total=1,
        ),
    )
    prepared = distributed.prepare_session(offline_settings, PrepareInput(plan=plan))
    beats: list[dict[str, object]] = []

    def heartbeat(details: dict[str, object]) -> None:
        beats.append(details)
        if len(beats) == 1:
            assert store.end_session(
                offline_settings, "session_end", status="cancelled"
            )

    request = NodeTrainInput(
        session_id="session_end",
        node_id="node_a",
        round=0,
        model=plan.model,
        data_path=prepared.data_path,
        shard=0,
        shards=1,
        global_path=prepared.global_path,
        federated=True,
        local_epochs=20,
        batch_size=32,
        learning_rate=0.01,
        optimizer="adam",
        jit=True,
        checkpoint_seconds=checkpoint_seconds,
    )
    with pytest.raises(
        distributed.SessionEndedError, match="session session_end ended"
    ):
        distributed.train_node(offline_settings, request, heartbeat)
    assert len(beats) == 1
    with session_scope(offline_settings.effective_database_url) as db:
        epochs = list(db.exec(select(NeuralEpoch.epoch)))
    # The first epoch's row when it checkpointed, before the end; none after.
    assert epochs == ([1] if checkpoint_seconds == 0 else [])


def test_resumed_job_time_covers_every_epoch(offline_settings: Settings) -> None:
    """A job that resumes from its checkpoint reports the time of all its
    epochs, the earlier attempt's included."""
    from sqlmodel import select

    from app.contracts.neural import ModelConfig, TrainJobInput
    from app.db import session_scope
    from app.neural import jobs, store
    from app.neural.models import NeuralEpoch, NeuralJob

    def request(epochs: int, model_id: str) -> TrainJobInput:
        return TrainJobInput(
            job_id="job_resume",
            model_id=model_id,
            model=ModelConfig(architecture="feedforward", widths=[16]),
            dataset="iris",
            epochs=epochs,
            batch_size=16,
            learning_rate=0.01,
            optimizer="adam",
        )

    def queued(model_id: str) -> None:
        store.add_record(
            offline_settings,
            NeuralJob(
                id="job_resume",
                workflow_id="w",
                status="queued",
                architecture="feedforward",
                tier="custom",
                dataset="iris",
                model_id=model_id,
                epochs_requested=3,
            ),
        )

    queued("model_a")
    first = jobs.run_job(offline_settings, request(2, "model_a"), lambda _: None)
    assert first.resumed_from_epoch == 0
    with session_scope(offline_settings.effective_database_url) as db:
        job = db.get(NeuralJob, "job_resume")
        assert job is not None and job.status == "completed"
        # As for the next attempt of a job that its worker left running.
        job.status = "running"
        db.add(job)
    # As if the first attempt's epochs had been slow.
    with session_scope(offline_settings.effective_database_url) as db:
        for row in db.exec(select(NeuralEpoch)):
            row.seconds = 100.0
            db.add(row)
    # A later attempt with more epochs finds the checkpoint of epoch 2.
    resumed = jobs.run_job(offline_settings, request(3, "model_b"), lambda _: None)
    assert resumed.resumed_from_epoch == 2
    _, rows = store.get_job(offline_settings, "job_resume")
    assert [row.epoch for row in rows] == [1, 2, 3]
    assert resumed.training_time >= sum(row.seconds for row in rows) >= 200


def test_named_dataset_split_options() -> None:
    """A named data set's seed and test_fraction choose its split."""
    plain = data.prepare("iris", Settings(), seed=0)
    halved = data.prepare({"name": "iris", "test_fraction": 0.5, "seed": 7}, Settings())
    assert len(plain.x_test) == 30
    assert len(halved.x_test) == 75
    again = data.prepare({"name": "iris", "test_fraction": 0.5, "seed": 7}, Settings())
    np.testing.assert_array_equal(halved.x_test, again.x_test)
    for bad, field in (({"test_fraction": 0}, "test_fraction"), ({"seed": -1}, "seed")):
        with pytest.raises(data.DatasetError, match=f"dataset.{field}"):
            data.prepare({"name": "iris", **bad}, Settings())


def test_runaway_finite_loss_is_divergence() -> None:
    """A loss that stays finite but grows past 1000 times the starting
    model's test loss stops training as diverged, naming both losses."""
    dataset = data.prepare("digits", Settings(), seed=0)
    spec = nets.ModelSpec("feedforward", dataset.features, dataset.classes, (64, 32))
    trainer = training.get_trainer(spec, "adam", 10.0)
    params = nets.init_params(spec, 0)
    with pytest.raises(training.TrainingDivergedError) as caught:
        trainer.train(
            params,
            trainer.init_state(params),
            dataset.x_train,
            dataset.y_train,
            dataset.x_test,
            dataset.y_test,
            epochs=3,
            batch_size=32,
            seed=0,
        )
    message = str(caught.value)
    assert "over 1000 times the starting model's test loss" in message
    assert message.endswith("at epoch 1; lower learning_rate (now 10)")
    assert caught.value.epoch == 1


def test_csv_whole_number_labels_exact(tmp_path: Path) -> None:
    """Whole-number labels are read exactly, so large ids stay apart, and
    only plain digits count as numbers."""
    labels = data._csv_labels(["9007199254740993", "9007199254740992", "1.00"])
    assert labels.tolist() == [9007199254740993, 9007199254740992, 1]
    assert data._csv_labels(["1_000", "1000"]).tolist() == ["1_000", "1000"]


def test_outlier_beyond_float32_rejected() -> None:
    """A value so far from its feature's training mean that it would not fit
    a float32 once standardized is named, not turned into infinity."""
    features = [[i * 1e-5, (i * 7) % 5] for i in range(40)]
    labels = [i % 2 for i in range(40)]
    # The split's first test sample, which the training statistics leave out.
    first_test = int(np.random.default_rng(0).permutation(40)[0])
    features[first_test][0] = 3e38
    with pytest.raises(data.DatasetError, match="standard deviations from its"):
        data.prepare({"X": features, "y": labels}, Settings(), seed=0)


def test_named_dataset_keys_and_name() -> None:
    assert data.describe_source({"seed": 3}) == "digits"
    with pytest.raises(data.DatasetError, match="give only name, seed, test_fraction"):
        data.load_arrays({"name": "iris", "extra": 1}, Settings())
