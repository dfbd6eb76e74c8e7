"""Database records and stored objects of the neural capability."""

from __future__ import annotations

import functools
import uuid
import zipfile
import zlib
from datetime import datetime
from typing import Any

import numpy as np
from sqlmodel import col, select, update

from app.contracts.neural import MODELS_BUCKET
from app.db import session_scope
from app.db.models import utc_now
from app.neural.models import (
    NeuralCluster,
    NeuralEpoch,
    NeuralJob,
    NeuralModel,
    NeuralNode,
    NeuralRoundEvent,
    NeuralSession,
)
from app.neural.nets import ModelSpec, Params, init_params
from app.neural.training import dump_params, load_params
from app.settings import Settings
from app.storage import storage_for
from app.storage.local import ObjectNotFound, StorageError


def new_id(prefix: str, length: int = 12) -> str:
    return f"{prefix}{uuid.uuid4().hex[:length]}"


def put_object(settings: Settings, path: str, data: bytes) -> str:
    storage_for(settings).put(MODELS_BUCKET, path, data, "application/octet-stream")
    return path


def get_object(settings: Settings, path: str) -> bytes:
    return storage_for(settings).get(MODELS_BUCKET, path)


def delete_object(settings: Settings, path: str) -> None:
    storage_for(settings).delete(MODELS_BUCKET, path)


def object_exists(settings: Settings, path: str) -> bool:
    return storage_for(settings).list(MODELS_BUCKET, prefix=path, limit=1) == [path]


def save_model_params(
    settings: Settings, path: str, params: Params, mean: np.ndarray, std: np.ndarray
) -> str:
    return put_object(settings, path, dump_params(params, {"mean": mean, "std": std}))


class ModelFileError(Exception):
    """A model's record exists, but its stored weights are missing or cannot
    be read. It is neither a ValueError nor a LookupError, so that callers
    do not report it as bad input or as an unknown model id."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


def load_model(
    settings: Settings, model_id: str
) -> tuple[NeuralModel, ModelSpec, Params, np.ndarray, np.ndarray]:
    """Load a stored model's record, spec, parameters and input scaling.

    Raises:
        LookupError: no model has this id.
        ModelFileError: the model's weights file is missing or unreadable.
    """
    with session_scope(settings.effective_database_url) as session:
        record = session.get(NeuralModel, model_id)
    if record is None:
        raise LookupError(
            f"model {model_id!r} not found; list models with neural_list_models"
        )
    where = f"{record.storage_path!r} in bucket {MODELS_BUCKET!r}"
    spec = ModelSpec.from_dict(record.spec)
    try:
        params, extra = load_params(get_object(settings, record.storage_path))
        mean, std = extra["mean"], extra["std"]
        if _shapes(params) != _expected_shapes(spec) or (
            np.shape(mean) != (spec.features,) or np.shape(std) != (spec.features,)
        ):
            raise ValueError("the arrays do not fit the model's architecture")
    except ObjectNotFound:
        raise ModelFileError(
            f"the stored weights of model {model_id} at {where} are missing; "
            "train the model again",
            missing=True,
        ) from None
    # numpy's own messages (such as its advice on allow_pickle) describe the
    # file's bytes, not anything the caller can change, so they are dropped.
    except (
        StorageError,
        ValueError,
        KeyError,
        OSError,
        EOFError,
        TypeError,
        zipfile.BadZipFile,
        zlib.error,
    ):
        raise ModelFileError(
            f"the stored weights of model {model_id} at {where} cannot be read "
            "as a model file; train the model again",
            missing=False,
        ) from None
    return record, spec, params, mean, std


def _shapes(params: Any) -> list[tuple[str, tuple[int, ...]]]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [
        (jax.tree_util.keystr(path), tuple(np.shape(leaf))) for path, leaf in leaves
    ]


@functools.lru_cache(maxsize=64)
def _expected_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    # Shapes alone, from a trace of the initializer: nothing is allocated.
    import jax

    return _shapes(jax.eval_shape(lambda: init_params(spec, 0)))


def add_record(settings: Settings, record: Any) -> None:
    with session_scope(settings.effective_database_url) as session:
        session.add(record)


def update_job(settings: Settings, job_id: str, **values: Any) -> None:
    with session_scope(settings.effective_database_url) as session:
        job = session.get(NeuralJob, job_id)
        if job is None:
            return
        for key, value in values.items():
            setattr(job, key, value)
        job.updated_at = utc_now()
        session.add(job)


def _change_open_row(
    settings: Settings,
    table: Any,
    row_id: str,
    open_statuses: tuple[str, ...],
    rows: list[Any] | None,
    values: dict[str, Any],
) -> bool:
    """Set the columns of `table`'s row `row_id` to `values` and add `rows`,
    in one transaction, if its status is one of `open_statuses`; return
    whether it changed. The update locks the row first, so an end that
    another process commits meanwhile waits for this transaction or wins."""
    with session_scope(settings.effective_database_url) as session:
        changed = session.exec(
            update(table)
            .where(col(table.id) == row_id)
            .where(col(table.status).in_(open_statuses))
            .values(**values, updated_at=utc_now())
        )
        if changed.rowcount != 1:
            return False
        for row in rows or []:
            session.add(row)
        return True


def end_session(
    settings: Settings,
    session_id: str,
    rows: list[Any] | None = None,
    **values: Any,
) -> bool:
    """Set a running session's columns to `values` and add `rows`, in one
    transaction, unless the session is no longer running.

    Returns False, and changes nothing, for a session that ended already:
    a terminated cluster's session, whose last activity may still finish,
    stays cancelled and gets no models.
    """
    return _change_open_row(
        settings, NeuralSession, session_id, ("running",), rows, values
    )


def end_job(
    settings: Settings, job_id: str, rows: list[Any] | None = None, **values: Any
) -> bool:
    """Set a queued or running job's columns to `values` and add `rows`, in
    one transaction, unless the job ended already. Return whether it
    changed."""
    return _change_open_row(
        settings, NeuralJob, job_id, ("queued", "running"), rows, values
    )


def add_session_rows(settings: Settings, session_id: str, rows: list[Any]) -> bool:
    """Add `rows` in one transaction if the session is still running; return
    False, and add nothing, once it ended (its cluster was terminated)."""
    return _change_open_row(settings, NeuralSession, session_id, ("running",), rows, {})


def session_running(settings: Settings, session_id: str) -> bool:
    with session_scope(settings.effective_database_url) as session:
        row = session.get(NeuralSession, session_id)
        return row is not None and row.status == "running"


def update_session(settings: Settings, session_id: str, **values: Any) -> None:
    with session_scope(settings.effective_database_url) as session:
        row = session.get(NeuralSession, session_id)
        if row is None:
            return
        for key, value in values.items():
            setattr(row, key, value)
        row.updated_at = utc_now()
        session.add(row)


def epoch_row(
    run_id: str,
    metrics: Any,
    *,
    node_id: str | None = None,
    round_index: int | None = None,
) -> NeuralEpoch:
    return NeuralEpoch(
        run_id=run_id,
        node_id=node_id,
        round=round_index,
        epoch=metrics.epoch,
        loss=metrics.loss,
        accuracy=metrics.accuracy,
        val_loss=metrics.val_loss,
        val_accuracy=metrics.val_accuracy,
        seconds=metrics.seconds,
    )


def record_epoch(settings: Settings, run_id: str, metrics: Any) -> None:
    add_record(settings, epoch_row(run_id, metrics))


def get_job(
    settings: Settings, job_id: str
) -> tuple[NeuralJob | None, list[NeuralEpoch]]:
    with session_scope(settings.effective_database_url) as session:
        job = session.get(NeuralJob, job_id)
        epochs = list(
            session.exec(
                select(NeuralEpoch)
                .where(NeuralEpoch.run_id == job_id)
                .order_by(col(NeuralEpoch.epoch), col(NeuralEpoch.id))
            )
        )
    return job, epochs


def get_model_record(settings: Settings, model_id: str) -> NeuralModel | None:
    with session_scope(settings.effective_database_url) as session:
        return session.get(NeuralModel, model_id)


def job_train_losses(settings: Settings, job_ids: list[str]) -> dict[str, float]:
    """Return the last epoch's training loss of each completed job."""
    if not job_ids:
        return {}
    with session_scope(settings.effective_database_url) as session:
        rows = session.exec(
            select(NeuralJob.id, NeuralJob.loss).where(col(NeuralJob.id).in_(job_ids))
        )
        return {job_id: loss for job_id, loss in rows if loss is not None}


def list_models(settings: Settings, cluster_id: str | None = None) -> list[NeuralModel]:
    with session_scope(settings.effective_database_url) as session:
        query = select(NeuralModel).order_by(col(NeuralModel.created_at).desc())
        if cluster_id is not None:
            query = query.where(NeuralModel.cluster_id == cluster_id)
        return list(session.exec(query))


def get_cluster(settings: Settings, cluster_id: str) -> NeuralCluster:
    """Raises:
    LookupError: no cluster has this id.
    """
    with session_scope(settings.effective_database_url) as session:
        cluster = session.get(NeuralCluster, cluster_id)
    if cluster is None:
        raise LookupError(
            f"cluster {cluster_id!r} not found; create one with neural_cluster_init"
        )
    return cluster


ROLE_ORDER = {"parameter_server": 0, "aggregator": 1, "worker": 2, "validator": 3}


def cluster_nodes(
    settings: Settings, cluster_id: str, *, include_terminated: bool = False
) -> list[NeuralNode]:
    """Nodes in wiring order: parameter servers, aggregators, workers,
    validators, each in deployment order; terminated ones only when asked."""
    with session_scope(settings.effective_database_url) as session:
        query = select(NeuralNode).where(NeuralNode.cluster_id == cluster_id)
        if not include_terminated:
            query = query.where(NeuralNode.status != "terminated")
        nodes = list(
            session.exec(query.order_by(col(NeuralNode.created_at), col(NeuralNode.id)))
        )
    return sorted(nodes, key=lambda node: ROLE_ORDER.get(node.role, 9))


def active_nodes(settings: Settings) -> list[NeuralNode]:
    """Every node of every active cluster (what embedded node workers serve)."""
    with session_scope(settings.effective_database_url) as session:
        query = (
            select(NeuralNode)
            .join(NeuralCluster, col(NeuralCluster.id) == col(NeuralNode.cluster_id))
            .where(NeuralCluster.status == "active")
            .where(NeuralNode.status != "terminated")
        )
        return list(session.exec(query))


def cluster_sessions(settings: Settings, cluster_id: str) -> list[NeuralSession]:
    with session_scope(settings.effective_database_url) as session:
        return list(
            session.exec(
                select(NeuralSession)
                .where(NeuralSession.cluster_id == cluster_id)
                .order_by(col(NeuralSession.created_at).desc())
            )
        )


def session_events(settings: Settings, session_id: str) -> list[NeuralRoundEvent]:
    with session_scope(settings.effective_database_url) as session:
        return list(
            session.exec(
                select(NeuralRoundEvent)
                .where(NeuralRoundEvent.session_id == session_id)
                .order_by(col(NeuralRoundEvent.round), col(NeuralRoundEvent.id))
            )
        )


def timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
