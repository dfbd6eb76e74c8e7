"""Neural activities: training jobs on `nexus-neural`, node work on each
node's own queue, and database records on `nexus-orchestration`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import ThreadHeartbeat
from app.contracts.neural import (
    TRAINING_DIVERGED,
    AggregateInput,
    AggregateResult,
    FinishInput,
    JobFailure,
    MemoryCleanupReport,
    NodeTrainInput,
    NodeTrainResult,
    PrepareInput,
    PrepareResult,
    RoundRecord,
    SessionFailure,
    SessionResult,
    TrainJobInput,
    TrainJobResult,
    ValidateInput,
    ValidateResult,
)
from app.neural import distributed, jobs, store
from app.neural.data import DatasetError
from app.neural.training import TrainingDivergedError
from app.settings import Settings
from app.storage import StorageError

T = TypeVar("T")

# Seconds between the repeated heartbeats of a training job; its workflow's
# heartbeat timeout is a few times this.
TRAIN_HEARTBEAT_SECONDS = 10.0


# Locks of the node training attempts that run in this process, by session
# and node. An attempt that timed out may still be inside a compiled epoch,
# where its cancellation cannot interrupt it, so the next attempt waits for
# it to stop instead of competing for the same cores.
_attempt_locks: dict[tuple[str, str], tuple[threading.Lock, int]] = {}
_attempt_locks_guard = threading.Lock()


@contextmanager
def _one_attempt_at_a_time(session_id: str, node_id: str) -> Iterator[None]:
    key = (session_id, node_id)
    with _attempt_locks_guard:
        lock, users = _attempt_locks.get(key, (threading.Lock(), 0))
        _attempt_locks[key] = (lock, users + 1)
    try:
        # Waiting in short steps lets a cancellation of this attempt end the
        # wait.
        while not lock.acquire(timeout=0.5):
            pass
        try:
            yield
        finally:
            lock.release()
    finally:
        # The last user drops the entry, so the map stays as small as the
        # number of attempts running.
        with _attempt_locks_guard:
            lock, users = _attempt_locks[key]
            if users == 1:
                del _attempt_locks[key]
            else:
                _attempt_locks[key] = (lock, users - 1)


def _node_heartbeat_seconds() -> float:
    """Return the interval of a node attempt's repeated heartbeats: a third
    of its heartbeat timeout, so that two repeats may be lost or late."""
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        return TRAIN_HEARTBEAT_SECONDS
    return max(0.1, timeout.total_seconds() / 3)


def _guard(work: Callable[[], T]) -> T:
    """Run `work`; input errors and diverged training become non-retryable,
    since a retry would fail the same way."""
    try:
        return work()
    except TrainingDivergedError as error:
        raise ApplicationError(
            str(error), error.problem, type=TRAINING_DIVERGED, non_retryable=True
        ) from error
    except DatasetError as error:
        raise ApplicationError(
            str(error), type="InvalidDataset", non_retryable=True
        ) from error
    except (ValueError, LookupError, StorageError) as error:
        raise ApplicationError(
            str(error), type="InvalidInput", non_retryable=True
        ) from error


class NeuralActivities:
    """CPU-bound work of the `nexus-neural` queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="neural_train_model")
    def train_model(self, request: TrainJobInput) -> TrainJobResult:
        activity.logger.info(
            "training job %s (attempt %d)", request.job_id, activity.info().attempt
        )
        with ThreadHeartbeat(TRAIN_HEARTBEAT_SECONDS) as heartbeat:
            return _guard(lambda: jobs.run_job(self.settings, request, heartbeat))

    @activity.defn(name="neural_prepare_session")
    def prepare_session(self, request: PrepareInput) -> PrepareResult:
        return _guard(lambda: distributed.prepare_session(self.settings, request))

    @activity.defn(name="neural_finish_session")
    def finish_session(self, request: FinishInput) -> SessionResult:
        return _guard(lambda: distributed.finish_session(self.settings, request))


class NodeActivities:
    """Work that a cluster node does on its own queue; `nexus-neural`
    registers the same aggregation and validation activities for clusters
    without a parameter server."""

    def __init__(self, settings: Settings, node_id: str | None = None) -> None:
        self.settings = settings
        self.node_id = node_id

    @activity.defn(name="neural_node_train")
    def node_train(self, request: NodeTrainInput) -> NodeTrainResult:
        info = activity.info()
        activity.logger.info(
            "node %s trains round %d (attempt %d)",
            request.node_id,
            request.round,
            info.attempt,
        )
        # The helper thread heartbeats while an epoch or its compilation
        # runs, since the node reports progress only between epochs.
        with (
            ThreadHeartbeat(_node_heartbeat_seconds()) as heartbeat,
            _one_attempt_at_a_time(request.session_id, request.node_id),
        ):
            return _guard(
                lambda: distributed.train_node(
                    self.settings, request, heartbeat, attempt=info.attempt
                )
            )

    @activity.defn(name="neural_aggregate")
    def aggregate(self, request: AggregateInput) -> AggregateResult:
        return _guard(lambda: distributed.aggregate(self.settings, request))

    @activity.defn(name="neural_validate")
    def validate(self, request: ValidateInput) -> ValidateResult:
        return _guard(lambda: distributed.validate(self.settings, request))

    @activity.defn(name="neural_memory_cleanup")
    def memory_cleanup(self) -> MemoryCleanupReport:
        from app.neural.memory import cleanup

        return cleanup(activity.info().task_queue)


class NeuralRecordActivities:
    """Light database writes of the neural workflows (orchestration queue)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="neural_record_round")
    def record_round(self, record: RoundRecord) -> None:
        distributed.record_round(self.settings, record)

    @activity.defn(name="neural_fail_job")
    def fail_job(self, failure: JobFailure) -> None:
        store.update_job(
            self.settings, failure.job_id, status="failed", error=failure.error
        )

    @activity.defn(name="neural_fail_session")
    def fail_session(self, failure: SessionFailure) -> None:
        # A session that its cluster's terminate cancelled stays cancelled.
        store.end_session(
            self.settings, failure.session_id, status="failed", error=failure.error
        )


def neural_queue_activities(settings: Settings) -> list[Callable[..., Any]]:
    main = NeuralActivities(settings)
    nodes = NodeActivities(settings)
    return [
        main.train_model,
        main.prepare_session,
        main.finish_session,
        nodes.aggregate,
        nodes.validate,
        nodes.memory_cleanup,
    ]


def node_queue_activities(settings: Settings, node_id: str) -> list[Callable[..., Any]]:
    nodes = NodeActivities(settings, node_id)
    return [nodes.node_train, nodes.aggregate, nodes.validate, nodes.memory_cleanup]


def orchestration_activities(settings: Settings) -> list[Callable[..., Any]]:
    records = NeuralRecordActivities(settings)
    return [records.record_round, records.fail_job, records.fail_session]
