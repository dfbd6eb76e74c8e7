"""Single-model training jobs and predictions from stored models."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from app.contracts.neural import TrainJobInput, TrainJobResult
from app.jsonsafe import format_shown_value
from app.neural import data, store
from app.neural.models import NeuralModel
from app.neural.nets import ModelSpec, Params, init_params
from app.neural.training import (
    dump_params,
    dump_state,
    get_trainer,
    load_params,
    load_state,
)
from app.settings import Settings

logger = logging.getLogger(__name__)


def model_path(model_id: str) -> str:
    return f"models/{model_id}.npz"


def checkpoint_paths(job_id: str) -> tuple[str, str]:
    return f"jobs/{job_id}/checkpoint.npz", f"jobs/{job_id}/optimizer.npz"


def run_job(
    settings: Settings,
    request: TrainJobInput,
    heartbeat: Callable[[dict[str, Any]], None],
) -> TrainJobResult:
    """Train the job's model, recording each epoch and a checkpoint; a retry
    resumes after the last checkpointed epoch."""
    started = time.perf_counter()
    # Conditional, as the end below: a job that a status read found ended
    # (its workflow terminated) stays so.
    store.end_job(settings, request.job_id, status="running")
    dataset = data.prepare(request.dataset, settings, seed=request.seed)
    spec = ModelSpec(
        request.model.architecture,
        dataset.features,
        dataset.classes,
        tuple(request.model.widths),
    )
    trainer = get_trainer(spec, request.optimizer, request.learning_rate, request.jit)
    params: Params = init_params(spec, request.seed)
    opt_state = trainer.init_state(params)
    start_epoch = 0
    # Seconds that earlier attempts spent on the epochs they finished.
    earlier_seconds = 0.0
    params_path, state_path = checkpoint_paths(request.job_id)
    if store.object_exists(settings, params_path):
        saved, extra = load_params(store.get_object(settings, params_path))
        params = saved
        opt_state = load_state(store.get_object(settings, state_path), opt_state)
        start_epoch = int(extra["epoch"])
        logger.info("job %s resumes after epoch %d", request.job_id, start_epoch)
        _, rows = store.get_job(settings, request.job_id)
        earlier_seconds = sum(row.seconds for row in rows if row.epoch <= start_epoch)

    def on_epoch(metrics: Any, params: Params, opt_state: Any) -> None:
        store.record_epoch(settings, request.job_id, metrics)
        store.put_object(settings, state_path, dump_state(opt_state))
        store.put_object(
            settings,
            params_path,
            dump_params(params, {"epoch": np.asarray(metrics.epoch)}),
        )
        store.update_job(settings, request.job_id, epochs_completed=metrics.epoch)
        heartbeat({"epoch": metrics.epoch, "checkpoint": params_path})

    params, opt_state, history = trainer.train(
        params,
        opt_state,
        dataset.x_train,
        dataset.y_train,
        dataset.x_test,
        dataset.y_test,
        epochs=request.epochs,
        batch_size=request.batch_size,
        seed=request.seed,
        start_epoch=start_epoch,
        on_epoch=on_epoch,
    )
    val_loss, accuracy = trainer.evaluate(params, dataset.x_test, dataset.y_test)
    # `loss` is the last epoch's training loss (the job row keeps it);
    # `val_loss` and `accuracy` are measured on the test split.
    loss = history[-1].loss if history else val_loss
    path = store.save_model_params(
        settings, model_path(request.model_id), params, dataset.mean, dataset.std
    )
    # Every attempt's time, so a resumed job's time covers all its epochs.
    seconds = earlier_seconds + time.perf_counter() - started
    spec_record = {**spec.to_dict(), "label_names": dataset.label_names}
    model = NeuralModel(
        id=request.model_id,
        job_id=request.job_id,
        architecture=spec.architecture,
        spec={**spec_record, "evaluated_on": "test"},
        dataset=dataset.name,
        storage_path=path,
        loss=val_loss,
        accuracy=accuracy,
    )
    ended = store.end_job(
        settings,
        request.job_id,
        [model],
        status="completed",
        loss=loss,
        accuracy=accuracy,
        training_time=seconds,
        epochs_completed=request.epochs,
    )
    if not ended:
        # A status read found the job's workflow terminated: it stays failed,
        # without a model.
        store.delete_object(settings, path)
        raise ValueError(
            f"training job {request.job_id} ended before its model was stored "
            "(its workflow was terminated); no model is kept"
        )
    return TrainJobResult(
        job_id=request.job_id,
        model_id=request.model_id,
        loss=loss,
        accuracy=accuracy,
        val_loss=val_loss,
        epochs_completed=request.epochs,
        training_time=seconds,
        resumed_from_epoch=start_epoch,
        storage_path=path,
        jit=request.jit,
    )


class InvalidFeatureError(ValueError):
    """A feature value of a prediction input that a model cannot take.

    Attributes:
        index: the value's indices in the input: (sample, feature), or
            (feature,) for a single sample.
        value: the value as given.
        problem: what is wrong with it and the fix.
    """

    def __init__(self, index: tuple[int, ...], value: Any, problem: str) -> None:
        position = "".join(f"[{i}]" for i in index)
        shown = format_shown_value(value)
        super().__init__(f"input{position} = {shown} is invalid: {problem}")
        self.index = index
        self.value = value
        self.problem = problem


def parse_input(values: Any, features: int) -> np.ndarray:
    """Turn one sample or a list of samples into a `(n, features)` array.

    Raises:
        InvalidFeatureError: a value is not a number, or is beyond float32.
        ValueError: the input is empty, is not numeric or has the wrong width.
    """
    if isinstance(values, list | tuple) and not values:
        raise ValueError(
            f"input has no samples; give one sample of {features} numbers, or a "
            "list of such samples"
        )
    found = data.find_invalid_feature(values)
    if found is not None:
        raise InvalidFeatureError(*found)
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(
            "input is not a list of numbers (one sample) or a list of such lists"
        ) from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != features:
        raise ValueError(
            f"input has shape {list(array.shape)} but the model takes {features} "
            "features per sample"
        )
    return array


def predict_logits(
    spec: ModelSpec,
    params: Params,
    mean: np.ndarray,
    std: np.ndarray,
    values: Any,
    jit: bool = True,
) -> np.ndarray:
    """Class probabilities of raw (unstandardized) samples.

    Raises:
        ValueError: the input is invalid, or the model's outputs for a sample
            are not finite, so that no NaN reaches a result.
    """
    samples = parse_input(values, spec.features)
    trainer = get_trainer(spec, "sgd", 0.1, jit)
    # Overflows surface below as non-finite probabilities, with a message.
    with np.errstate(invalid="ignore", over="ignore"):
        # In float64, as the training data were standardized.
        x = (samples.astype(np.float64) - mean) / std
        logits = np.asarray(trainer.logits(params, x.astype(np.float32)))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    broken = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
    if broken.size:
        samples_named = ", ".join(f"input[{i}]" for i in broken[:10])
        raise ValueError(
            f"the model's outputs for {samples_named} are not finite numbers: "
            "the values lie too far outside the range of the training data, or "
            "the model's training diverged (then train it again with a lower "
            "learning rate)"
        )
    return probabilities


def predict(settings: Settings, model_id: str, values: Any) -> dict[str, Any]:
    record, spec, params, mean, std = store.load_model(settings, model_id)
    probabilities = predict_logits(spec, params, mean, std, values)
    labels = record.spec.get("label_names") or [str(i) for i in range(spec.classes)]
    classes = probabilities.argmax(axis=1)
    return {
        "model_id": model_id,
        "predictions": [labels[i] for i in classes],
        "classes": [int(i) for i in classes],
        "probabilities": probabilities.round(6).tolist(),
        "label_names": labels,
    }
