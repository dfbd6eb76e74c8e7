"""The work of a distributed session's nodes: preparing shards, local
training or gradients, aggregation, validation and the final models."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from app.contracts.neural import (
    DATASETS_BUCKET,
    AggregateInput,
    AggregateResult,
    FinishInput,
    NodeTrainInput,
    NodeTrainResult,
    PrepareInput,
    PrepareResult,
    RoundRecord,
    SessionResult,
    ValidateInput,
    ValidateResult,
)
from app.db import session_scope
from app.neural import data, store
from app.neural.models import NeuralModel, NeuralRoundEvent
from app.neural.nets import ModelSpec, Params, init_params
from app.neural.training import (
    TrainingDivergedError,
    dump_params,
    dump_state,
    get_trainer,
    load_params,
    load_state,
    non_finite_name,
    weighted_average,
)
from app.settings import Settings
from app.storage import storage_for

logger = logging.getLogger(__name__)

# Minimum seconds between two reads of its session's status by a training node.
SESSION_CHECK_SECONDS = 1.0

# Share of the training split held out for validator nodes.
HOLDOUT_FRACTION = 0.15


class SessionEndedError(ValueError):
    """The session ended (its cluster was terminated) while its last activity
    ran; a retry would find it ended too."""


class SessionData:
    """A session's prepared split: the worker pool, the validators' hold-out
    and the test split, all standardized."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def shard(self, part: str, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.arrays[f"x_{part}"], self.arrays[f"y_{part}"]
        indices = np.array_split(np.arange(len(x)), count)[index]
        return x[indices], y[indices]

    def split(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"x_{part}"], self.arrays[f"y_{part}"]


# Bounded, because every session has its own data and a long-running worker
# (the benchmark starts a session per cycle) would otherwise keep them all.
_SESSION_DATA_LIMIT = 8
_session_data: OrderedDict[str, SessionData] = OrderedDict()
_session_lock = threading.Lock()


def session_data(settings: Settings, path: str) -> SessionData:
    """Load (once per process) a session's prepared data from storage."""
    key = f"{settings.resolved_data_dir}:{path}"
    with _session_lock:
        cached = _session_data.get(key)
        if cached is not None:
            _session_data.move_to_end(key)
    if cached is not None:
        return cached
    blob = storage_for(settings).get(DATASETS_BUCKET, path)
    with np.load(io.BytesIO(blob)) as archive:
        loaded = SessionData({name: archive[name] for name in archive.files})
    with _session_lock:
        _session_data[key] = loaded
        while len(_session_data) > _SESSION_DATA_LIMIT:
            _session_data.popitem(last=False)
    return loaded


def clear_session_data() -> int:
    with _session_lock:
        count = len(_session_data)
        _session_data.clear()
    return count


def finite(value: float) -> float:
    """Replace NaN and infinity, which JSON payloads cannot carry, by 1e30."""
    return float(value) if np.isfinite(value) else 1e30


def spec_of(model: Any, features: int, classes: int) -> ModelSpec:
    return ModelSpec(model.architecture, features, classes, tuple(model.widths))


def prepare_session(settings: Settings, request: PrepareInput) -> PrepareResult:
    """Split the data set into worker shards, a validator hold-out and a test
    split, store it, and store the initial global model."""
    plan = request.plan
    dataset = data.prepare(plan.dataset, settings, seed=plan.seed)
    x_pool, y_pool = dataset.x_train, dataset.y_train
    x_hold = np.zeros((0, dataset.features), np.float32)
    y_hold = np.zeros((0,), np.int32)
    if plan.validators:
        held = max(len(plan.validators), int(len(x_pool) * HOLDOUT_FRACTION))
        x_hold, y_hold = x_pool[:held], y_pool[:held]
        x_pool, y_pool = x_pool[held:], y_pool[held:]
    if len(x_pool) < len(plan.workers):
        raise data.DatasetError(
            f"the data set leaves {len(x_pool)} training samples for "
            f"{len(plan.workers)} worker nodes; use a larger data set or fewer nodes"
        )
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x_pool=x_pool,
        y_pool=y_pool,
        x_hold=x_hold,
        y_hold=y_hold,
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        mean=dataset.mean,
        std=dataset.std,
        label_names=np.asarray(dataset.label_names),
    )
    data_path = f"sessions/{plan.session_id}/data.npz"
    storage_for(settings).put(DATASETS_BUCKET, data_path, buffer.getvalue())
    spec = ModelSpec(
        plan.model.architecture,
        dataset.features,
        dataset.classes,
        tuple(plan.model.widths),
    )
    params = init_params(spec, plan.seed)
    global_path = store.put_object(
        settings, f"sessions/{plan.session_id}/global-0.npz", dump_params(params)
    )
    state_path = None
    if not plan.federated:
        trainer = get_trainer(spec, plan.optimizer, plan.learning_rate, plan.jit)
        state_path = store.put_object(
            settings,
            f"sessions/{plan.session_id}/optimizer-0.npz",
            dump_state(trainer.init_state(params)),
        )
    shard_indices = np.array_split(np.arange(len(x_pool)), len(plan.workers))
    sizes = {
        node.node_id: len(part)
        for node, part in zip(plan.workers, shard_indices, strict=True)
    }
    smallest = min(sizes.values())
    steps = max(1, smallest // min(plan.batch_size, smallest))
    return PrepareResult(
        data_path=data_path,
        global_path=global_path,
        optimizer_state_path=state_path,
        features=dataset.features,
        classes=dataset.classes,
        steps_per_epoch=steps,
        shard_sizes=sizes,
    )


def update_path(session_id: str, round_index: int, node_id: str) -> str:
    return f"sessions/{session_id}/round-{round_index}/{node_id}.npz"


def checkpoint_path(session_id: str, round_index: int, node_id: str) -> str:
    return f"sessions/{session_id}/round-{round_index}/{node_id}.checkpoint.npz"


def train_node(
    settings: Settings,
    request: NodeTrainInput,
    heartbeat: Callable[[dict[str, Any]], None],
    attempt: int = 1,
) -> NodeTrainResult:
    """Train a worker's shard for one round: local epochs from the global
    model (federated), or one gradient of the round's batch."""
    started = time.perf_counter()
    session = session_data(settings, request.data_path)
    x, y = session.shard("pool", request.shard, request.shards)
    classes = len(session.arrays["label_names"])
    spec = spec_of(request.model, x.shape[1], classes)
    trainer = get_trainer(spec, request.optimizer, request.learning_rate, request.jit)
    params, _ = load_params(store.get_object(settings, request.global_path))
    out_path = update_path(request.session_id, request.round, request.node_id)
    if not request.federated:
        batch = min(request.batch_size, len(x))
        steps = max(1, len(x) // batch)
        epoch, offset = divmod(request.step, steps)
        seed = (request.seed * 1_000_003 + epoch) * 97 + request.shard
        order = np.random.default_rng(seed).permutation(len(x))
        chosen = order[offset * batch : (offset + 1) * batch]
        grads, loss, accuracy = trainer.gradient(params, x[chosen], y[chosen])
        if not np.isfinite(loss):
            raise TrainingDivergedError(
                f"loss is {non_finite_name(loss)}",
                f"the gradient step of round {request.round}",
                request.learning_rate,
            )
        store.put_object(settings, out_path, dump_params(grads))
        return NodeTrainResult(
            node_id=request.node_id,
            round=request.round,
            update_path=out_path,
            samples=len(chosen),
            loss=finite(loss),
            accuracy=accuracy,
            train_seconds=time.perf_counter() - started,
            processed_samples=len(chosen),
            attempt=attempt,
        )

    opt_state = trainer.init_state(params)
    start_epoch = 0
    ckpt = checkpoint_path(request.session_id, request.round, request.node_id)
    state_ckpt = ckpt.replace(".checkpoint.npz", ".optimizer.npz")
    if store.object_exists(settings, ckpt):
        params, extra = load_params(store.get_object(settings, ckpt))
        opt_state = load_state(store.get_object(settings, state_ckpt), opt_state)
        start_epoch = int(extra["epoch"])
        logger.info(
            "node %s resumes round %d after local epoch %d",
            request.node_id,
            request.round,
            start_epoch,
        )
    x_test, y_test = session.split("test")
    pending: list[Any] = []
    last_checkpoint = last_check = time.monotonic()

    def ended() -> SessionEndedError:
        return SessionEndedError(
            f"session {request.session_id} ended (its cluster was terminated) "
            f"while node {request.node_id} trained round {request.round}"
        )

    def record_pending() -> None:
        rows = [
            store.epoch_row(
                request.session_id,
                item,
                node_id=request.node_id,
                round_index=request.round,
            )
            for item in pending
        ]
        pending.clear()
        if not store.add_session_rows(settings, request.session_id, rows):
            raise ended()

    def on_epoch(metrics: Any, params: Params, opt_state: Any) -> None:
        # Checkpoints and epoch rows are written at most every
        # `checkpoint_seconds` (and after the last epoch), because a write
        # per epoch costs more than a small model's epoch. In between, the
        # session's status is read at most every SESSION_CHECK_SECONDS, so a
        # terminated cluster's node stops soon after. Its cancel reaches the
        # activity only in the response to a heartbeat, and the SDK throttles
        # heartbeats to one per 80% of the heartbeat timeout.
        nonlocal last_checkpoint, last_check
        pending.append(metrics)
        now = time.monotonic()
        due = now - last_checkpoint >= request.checkpoint_seconds
        if not due and metrics.epoch < request.local_epochs:
            if now - last_check >= SESSION_CHECK_SECONDS:
                last_check = now
                if not store.session_running(settings, request.session_id):
                    raise ended()
            heartbeat({"round": request.round, "epoch": metrics.epoch})
            return
        record_pending()
        store.put_object(settings, state_ckpt, dump_state(opt_state))
        store.put_object(
            settings, ckpt, dump_params(params, {"epoch": np.asarray(metrics.epoch)})
        )
        last_checkpoint = last_check = time.monotonic()
        heartbeat({"round": request.round, "epoch": metrics.epoch, "checkpoint": ckpt})

    try:
        params, _, history = trainer.train(
            params,
            opt_state,
            x,
            y,
            x_test,
            y_test,
            epochs=request.local_epochs,
            batch_size=request.batch_size,
            seed=request.seed * 7919 + request.round * 31 + request.shard,
            start_epoch=start_epoch,
            on_epoch=on_epoch,
        )
    except TrainingDivergedError as error:
        # The finite epochs since the last checkpoint are still recorded.
        record_pending()
        raise TrainingDivergedError(
            error.metric,
            f"local epoch {error.epoch} of round {request.round}",
            error.learning_rate,
            error.epoch,
        ) from None
    store.put_object(settings, out_path, dump_params(params))
    # A retry that resumed after the last local epoch trained nothing more;
    # its metrics come from the checkpointed epochs already recorded.
    loss = finite(history[-1].loss) if history else 0.0
    accuracy = history[-1].accuracy if history else 0.0
    return NodeTrainResult(
        node_id=request.node_id,
        round=request.round,
        update_path=out_path,
        samples=len(x),
        loss=loss,
        accuracy=accuracy,
        train_seconds=time.perf_counter() - started,
        processed_samples=(len(x) // min(request.batch_size, len(x)))
        * min(request.batch_size, len(x))
        * request.local_epochs,
        resumed_from_epoch=start_epoch,
        attempt=attempt,
    )


def coordinate_median(trees: list[Params]) -> Params:
    """Coordinate-wise median of parameter trees (robust to a minority of
    corrupted updates)."""
    return jax.tree_util.tree_map(
        lambda *leaves: np.median(np.stack([np.asarray(v) for v in leaves]), axis=0),
        *trees,
    )


def aggregate(settings: Settings, request: AggregateInput) -> AggregateResult:
    """Average (weighted by sample count) or take the median of node trees;
    with `apply_gradient`, take one optimizer step on the global model."""
    trees = [
        load_params(store.get_object(settings, ref.path))[0] for ref in request.inputs
    ]
    weights = [ref.weight for ref in request.inputs]
    if request.method == "median":
        combined = coordinate_median(trees)
    else:
        combined = weighted_average(trees, weights)
    total = float(sum(weights))
    base = f"sessions/{request.session_id}"
    if not request.apply_gradient:
        path = store.put_object(
            settings,
            f"{base}/round-{request.round}/{request.name}.npz",
            dump_params(combined),
        )
        return AggregateResult(path=path, weight=total)
    if (
        request.model is None
        or not request.global_path
        or not request.optimizer_state_path
    ):
        raise ValueError(
            "a gradient step needs model, global_path and optimizer_state_path"
        )
    params, _ = load_params(store.get_object(settings, request.global_path))
    # Applying a gradient never runs the model, so input and output sizes
    # do not matter to this trainer.
    spec = ModelSpec(request.model.architecture, 0, 0, tuple(request.model.widths))
    trainer = get_trainer(spec, request.optimizer, request.learning_rate, request.jit)
    state = load_state(
        store.get_object(settings, request.optimizer_state_path),
        trainer.init_state(params),
    )
    params, state = trainer.apply_gradient(params, state, combined)
    path = store.put_object(
        settings, f"{base}/global-{request.round + 1}.npz", dump_params(params)
    )
    state_path = store.put_object(
        settings, f"{base}/optimizer-{request.round + 1}.npz", dump_state(state)
    )
    return AggregateResult(path=path, weight=total, optimizer_state_path=state_path)


def validate(settings: Settings, request: ValidateInput) -> ValidateResult:
    """Evaluate the candidate and the previous global model on this
    validator's hold-out shard."""
    session = session_data(settings, request.data_path)
    x, y = session.shard("hold", request.shard, request.shards)
    classes = len(session.arrays["label_names"])
    spec = spec_of(request.model, x.shape[1], classes)
    trainer = get_trainer(spec, "sgd", 0.1, request.jit)
    candidate, _ = load_params(store.get_object(settings, request.candidate_path))
    previous, _ = load_params(store.get_object(settings, request.previous_path))
    candidate_loss, candidate_accuracy = trainer.evaluate(candidate, x, y)
    previous_loss, _ = trainer.evaluate(previous, x, y)
    return ValidateResult(
        node_id=request.node_id,
        candidate_loss=finite(candidate_loss),
        previous_loss=finite(previous_loss),
        candidate_accuracy=candidate_accuracy,
        samples=len(x),
    )


def record_round(settings: Settings, record: RoundRecord) -> None:
    with session_scope(settings.effective_database_url) as session:
        for event in record.events:
            session.add(
                NeuralRoundEvent(
                    session_id=record.session_id,
                    round=record.round,
                    node_id=event.node_id,
                    kind=event.kind,
                    detail=event.detail,
                )
            )
    # The counters only: a session that its cluster's terminate cancelled
    # while this round was recorded stays cancelled.
    store.update_session(
        settings,
        record.session_id,
        rounds_completed=record.rounds_completed,
        rounds_rejected=record.rounds_rejected,
    )


def finish_session(settings: Settings, request: FinishInput) -> SessionResult:
    """Evaluate the global model on the test split and store it and each
    worker's last model as cluster models."""
    plan = request.plan
    session = session_data(settings, request.data_path)
    x_test, y_test = session.split("test")
    x_hold, y_hold = session.split("hold")
    # Node models are scored on the validators' hold-out, or on the test
    # split when the session has no validators.
    node_split = "holdout"
    if len(x_hold) == 0:
        x_hold, y_hold = x_test, y_test
        node_split = "test"
    labels = [str(v) for v in session.arrays["label_names"]]
    mean, std = session.arrays["mean"], session.arrays["std"]
    spec = spec_of(plan.model, x_test.shape[1], len(labels))
    trainer = get_trainer(spec, "sgd", 0.1, plan.jit)
    spec_record = {**spec.to_dict(), "label_names": labels}
    params, _ = load_params(store.get_object(settings, request.global_path))
    loss, accuracy = trainer.evaluate(params, x_test, y_test)
    if not np.isfinite(loss):
        # An optimizer step of the last round can overflow the global model
        # after every node reported a finite loss.
        raise TrainingDivergedError(
            f"test loss is {non_finite_name(loss)}",
            f"the global model after {request.rounds_completed} rounds",
            plan.learning_rate,
        )
    model_id = store.new_id("model_")
    path = store.save_model_params(
        settings, f"models/{model_id}.npz", params, mean, std
    )
    owner = plan.parameter_server.node_id if plan.parameter_server else None
    rows = [
        NeuralModel(
            id=model_id,
            session_id=plan.session_id,
            cluster_id=plan.cluster_id,
            node_id=owner,
            architecture=spec.architecture,
            spec={**spec_record, "role": "global", "evaluated_on": "test"},
            dataset=data.describe_source(plan.dataset),
            storage_path=path,
            loss=loss,
            accuracy=accuracy,
        )
    ]
    node_models: list[str] = []
    for node in plan.workers:
        source = request.node_updates.get(node.node_id)
        node_params = params
        if plan.federated and source:
            node_params, _ = load_params(store.get_object(settings, source))
        node_model_id = store.new_id("model_")
        node_path = store.save_model_params(
            settings, f"models/{node_model_id}.npz", node_params, mean, std
        )
        # Validation accuracy on the hold-out weighs this model in
        # `weighted` distributed predictions.
        node_loss, node_accuracy = trainer.evaluate(node_params, x_hold, y_hold)
        rows.append(
            NeuralModel(
                id=node_model_id,
                session_id=plan.session_id,
                cluster_id=plan.cluster_id,
                node_id=node.node_id,
                architecture=spec.architecture,
                spec={**spec_record, "role": "node", "evaluated_on": node_split},
                dataset=data.describe_source(plan.dataset),
                storage_path=node_path,
                loss=node_loss,
                accuracy=node_accuracy,
            )
        )
        node_models.append(node_model_id)
    rate = request.samples / request.train_seconds if request.train_seconds > 0 else 0.0
    ended = store.end_session(
        settings,
        plan.session_id,
        rows,
        status="completed",
        model_id=model_id,
        loss=loss,
        accuracy=accuracy,
        rounds_completed=request.rounds_completed,
        rounds_rejected=request.rounds_rejected,
        samples_per_second=rate,
        training_time=request.train_seconds,
    )
    if not ended:
        for row in rows:
            store.delete_object(settings, row.storage_path)
        raise SessionEndedError(
            f"session {plan.session_id} ended before its models were stored (its "
            "cluster was terminated); no model is kept"
        )
    return SessionResult(
        session_id=plan.session_id,
        model_id=model_id,
        rounds_completed=request.rounds_completed,
        rounds_rejected=request.rounds_rejected,
        loss=loss,
        accuracy=accuracy,
        samples=request.samples,
        training_time=request.train_seconds,
        samples_per_second=rate,
        node_models=node_models,
    )
