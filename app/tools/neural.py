"""Neural tools: training jobs, predictions, clusters, nodes and
distributed training."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.service import RPCError

from app.contracts.neural import (
    DATASETS_BUCKET,
    ModelConfig,
    TrainJobInput,
    TrainJobResult,
)
from app.contracts.queues import ORCHESTRATION
from app.jsonsafe import format_shown_value
from app.neural.architectures import (
    MAX_LAYER_WIDTH,
    MAX_PARAMETERS,
    check_architecture,
)
from app.tools.registry import ErrorKind, ToolContext, ToolError, ToolInputError, tool

if TYPE_CHECKING:
    from app.neural.data import Dataset
    from app.neural.store import ModelFileError

logger = logging.getLogger(__name__)

Optimizer = Literal["adam", "sgd", "rmsprop", "adagrad"]
Tier = Literal["nano", "mini", "small", "medium", "large"]


class ArchitectureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    type: str = Field(
        description="feedforward, cnn, lstm, transformer, autoencoder, hybrid."
    )
    layers: list[Any] = Field(
        default_factory=list,
        description="Widths of the main stage (ints or {units: n}, each at most "
        f"{MAX_LAYER_WIDTH}); empty uses the tier. The model may have at most "
        f"{MAX_PARAMETERS:,} parameters.",
    )

    _type = field_validator("type")(classmethod(lambda cls, v: check_architecture(v)))

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[Any]) -> list[Any]:
        from app.neural.nets import layer_widths

        # An empty list selects the tier's widths, which neural_train checks
        # with the tier. The message names the entry (layers[i]); the field
        # path comes from the validation error.
        if value:
            layer_widths("custom", value)
        return value


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=512)
    learning_rate: float = Field(0.001, gt=0, le=10)
    optimizer: Optimizer = "adam"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    architecture: ArchitectureConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)


class NeuralTrainInput(BaseModel):
    # Strict, as the workflow tools: "2" is not a number of epochs, nor
    # "false" a flag.
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True, strict=True
    )

    config: TrainConfig
    dataset: str | dict[str, Any] = Field(
        "digits",
        description="digits, iris, wine, breast_cancer; inline {X, y}; or "
        "{bucket, path} of a CSV or NPZ object in storage.",
    )
    tier: Tier = "small"
    seed: int = Field(0, ge=0)
    wasm_optimization: bool = Field(
        True, alias="wasmOptimization", description="jit-compile the training steps."
    )
    wait: bool = Field(True, description="Wait for training to finish.")


class TrainingScores(BaseModel):
    """Scores of a training job's final model, each named by its split."""

    loss: float | None = Field(
        None,
        description="Loss on the test split (the same as test_loss), measured "
        "with the final model like accuracy.",
    )
    accuracy: float | None = Field(None, description="Accuracy on the test split.")
    train_loss: float | None = Field(
        None, description="Mean training loss of the last epoch."
    )
    test_loss: float | None = Field(
        None, description="Loss of the final model on the test split."
    )


class NeuralTrainResult(TrainingScores):
    job_id: str
    model_id: str
    status: str
    architecture: str
    tier: str
    widths: list[int]
    dataset: str
    epochs_completed: int = 0
    training_time: float | None = None
    jit: bool
    compilation: str


async def check_dataset(ctx: ToolContext, source: Any, seed: int) -> Dataset:
    """Load and check a data set, split with the `seed` that the workflow
    will use, so that a bad one fails the call before anything is written.
    Return the prepared data set."""
    from app.neural import data

    groups = ctx.groups
    if data.is_stored(source) and groups is not None and "storage" not in groups:
        # Training would read the object, so a key without the storage
        # group could learn what it contains from the model or errors.
        allowed = ", ".join(groups) or "none"
        caller = f"API key {ctx.key_id}" if ctx.key_id else "this run"
        raise ToolError(
            "dataset: an object in storage is data of the tool group "
            f"storage, and {caller} is limited to the groups: {allowed}; use "
            "a key created with `nexus keys create NAME --group neural "
            "--group storage`, or pass the samples inline",
            kind="forbidden",
        )
    try:
        return await asyncio.to_thread(data.prepare, source, ctx.settings, seed=seed)
    except data.DatasetError as error:
        raise ToolError(f"invalid dataset: {error}", kind="invalid_argument") from None


def model_size_problem(
    architecture: str, widths: list[int], dataset: Dataset
) -> str | None:
    """Return why a model of `widths` on `dataset` is too large to train, or
    None when it fits."""
    from app.neural.nets import ModelSpec, check_model_size

    spec = ModelSpec(architecture, dataset.features, dataset.classes, tuple(widths))
    try:
        check_model_size(spec)
    except ValueError as error:
        return str(error)
    return None


def dataset_reference(source: Any, owner: str) -> Any:
    """Return the storage reference that workflows get for an inline data set
    (stored by `store_inline_dataset` under the owner's id), or any other
    source unchanged."""
    if not is_inline(source):
        return source
    return {"bucket": DATASETS_BUCKET, "path": _inline_path(owner)}


async def store_inline_dataset(ctx: ToolContext, source: Any, owner: str) -> None:
    """Store an inline data set as NPZ at its `dataset_reference`, so that
    workflow payloads carry a path and not the samples."""
    from app.neural import data

    if not is_inline(source):
        return
    import numpy as np

    from app.storage import storage_for

    x, y = await asyncio.to_thread(data.load_arrays, source, ctx.settings)
    buffer = io.BytesIO()
    np.savez(buffer, X=x, y=y)
    await asyncio.to_thread(
        storage_for(ctx.settings).put,
        DATASETS_BUCKET,
        _inline_path(owner),
        buffer.getvalue(),
    )


def is_inline(source: Any) -> bool:
    return isinstance(source, dict) and ("X" in source or "data" in source)


def _inline_path(owner: str) -> str:
    return f"inline/{owner}.npz"


async def start_recorded_workflow(
    ctx: ToolContext,
    client: Client,
    record: Any,
    source: Any,
    workflow: str,
    argument: Any,
    result_type: type,
) -> WorkflowHandle[Any, Any]:
    """Add `record` (a job or session row whose `workflow_id` names the
    workflow) and start the workflow. If the start fails, delete the row and
    the inline data set stored under the record's id, so that the failed
    call leaves nothing behind.

    NOTE: a start that Temporal accepted but whose reply was lost (a
    deadline exceeded) is deleted too. That workflow then fails to read its
    inline data set, or trains without a job row.

    Raises:
        ToolError: Temporal did not accept the start (kind "unavailable").
    """
    from app.neural import store

    try:
        await asyncio.to_thread(store.add_record, ctx.settings, record)
        return await client.start_workflow(
            workflow,
            argument,
            id=record.workflow_id,
            task_queue=ORCHESTRATION,
            result_type=result_type,
        )
    except Exception as error:
        logger.warning(
            "workflow %s not started, deleting its record %s: %s",
            record.workflow_id,
            record.id,
            error,
        )
        try:
            await asyncio.to_thread(_discard_unstarted, ctx, record, source)
        except Exception:
            # The caller gets the start's error, so this one is only logged.
            logger.exception(
                "could not delete record %s of the unstarted workflow %s",
                record.id,
                record.workflow_id,
            )
        if isinstance(error, RPCError):
            raise ToolError(
                f"workflow {workflow} could not be started: {error.message}; "
                "check that Temporal runs (`nexus health`) and retry",
                kind="unavailable",
            ) from error
        raise


def _discard_unstarted(ctx: ToolContext, record: Any, source: Any) -> None:
    from app.db import session_scope
    from app.storage import storage_for

    with session_scope(ctx.settings.effective_database_url) as session:
        stored = session.get(type(record), record.id)
        if stored is not None:
            session.delete(stored)
    if is_inline(source):
        storage_for(ctx.settings).delete(DATASETS_BUCKET, _inline_path(record.id))


def check_features(tool_name: str, field: str, values: Any) -> None:
    """Reject a feature value that a model cannot take (null, a boolean, a
    string, an object, a number beyond float32), naming its path such as
    `input.0.1`.

    Raises:
        ToolInputError: for the first such value.
    """
    from app.neural.data import find_invalid_feature

    found = find_invalid_feature(values)
    if found is None:
        return
    index, value, problem = found
    path = ".".join([field, *(str(i) for i in index)])
    shown = format_shown_value(value)
    raise ToolInputError(
        f"invalid arguments for {tool_name}: {path}: {shown} is invalid: {problem}",
        [{"field": path, "value": value, "message": problem}],
    )


def failure_message(error: WorkflowFailureError) -> str:
    """Return why a workflow failed. The neural workflows' own failure
    already names the job or session, so its message is returned as is."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == "TrainingFailed":
        return cause.message
    return str(getattr(cause, "message", cause))


# Failures that the same arguments repeat: a retry, such as a workflow
# step's, would train again to the same end.
_ARGUMENT_FAILURES = frozenset(
    {"TrainingDiverged", "AllRoundsRejected", "InvalidDataset", "InvalidInput"}
)


def failure_kind(error: WorkflowFailureError) -> ErrorKind:
    """Return `invalid_argument` for a run that failed because of its
    arguments (its training diverged, its data set is invalid), else
    `failed`."""
    cause: BaseException | None = error.cause
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type in _ARGUMENT_FAILURES:
            return "invalid_argument"
        cause = cause.cause if isinstance(cause, FailureError) else None
    return "failed"


def _widths(tier: str, layers: list[Any]) -> list[int]:
    from app.neural.nets import layer_widths

    try:
        return list(layer_widths(tier, layers))
    except ValueError as error:
        raise ToolError(str(error), kind="invalid_argument") from None


@tool("neural_train", group="neural")
async def neural_train(ctx: ToolContext, args: NeuralTrainInput) -> NeuralTrainResult:
    """Train a real JAX model (feedforward, cnn, lstm, transformer,
    autoencoder or hybrid) on a data set as a Temporal job, record loss and
    accuracy per epoch, and store the model. Returns job_id, model_id, loss
    and accuracy of the final model on the test split, train_loss (last
    epoch, training split), test_loss (= loss), epochs_completed and
    training_time (seconds)."""
    from app.neural import store
    from app.neural.data import describe_source
    from app.neural.models import NeuralJob

    job_id = store.new_id("job_")
    model_id = store.new_id("model_")
    architecture = args.config.architecture.type
    widths = _widths(args.tier, args.config.architecture.layers)
    prepared = await check_dataset(ctx, args.dataset, args.seed)
    problem = await asyncio.to_thread(
        model_size_problem, architecture, widths, prepared
    )
    if problem is not None:
        layers = args.config.architecture.layers
        field, value = (
            ("config.architecture.layers", layers) if layers else ("tier", args.tier)
        )
        raise ToolInputError(
            f"invalid arguments for neural_train: {field}: {value!r} is invalid: "
            f"{problem}",
            [{"field": field, "value": value, "message": problem}],
        )
    # Connect before writing anything, so that an unreachable Temporal
    # leaves no job row or data set file behind.
    client = await ctx.client()
    await store_inline_dataset(ctx, args.dataset, job_id)
    dataset = dataset_reference(args.dataset, job_id)
    training = args.config.training
    request = TrainJobInput(
        job_id=job_id,
        model_id=model_id,
        model=ModelConfig(architecture=architecture, widths=widths, tier=args.tier),
        dataset=dataset,
        epochs=training.epochs,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        optimizer=training.optimizer,
        seed=args.seed,
        jit=args.wasm_optimization,
    )
    workflow_id = f"neural-train-{job_id}"
    job = NeuralJob(
        id=job_id,
        workflow_id=workflow_id,
        status="queued",
        architecture=architecture,
        tier=args.tier,
        dataset=describe_source(args.dataset),
        config=args.config.model_dump(),
        model_id=model_id,
        epochs_requested=training.epochs,
        jit=args.wasm_optimization,
    )
    handle = await start_recorded_workflow(
        ctx, client, job, args.dataset, "NeuralTrainWorkflow", request, TrainJobResult
    )
    compilation = (
        "jit (XLA-compiled)" if args.wasm_optimization else "eager (not jit-compiled)"
    )
    result = NeuralTrainResult(
        job_id=job_id,
        model_id=model_id,
        status="running",
        architecture=architecture,
        tier=args.tier,
        widths=widths,
        dataset=describe_source(args.dataset),
        jit=args.wasm_optimization,
        compilation=compilation,
    )
    if not args.wait:
        return result
    try:
        done: TrainJobResult = await handle.result()
    except WorkflowFailureError as error:
        raise ToolError(failure_message(error), kind=failure_kind(error)) from None
    return result.model_copy(
        update={
            "status": "completed",
            "loss": done.val_loss,
            "accuracy": done.accuracy,
            "train_loss": done.loss,
            "test_loss": done.val_loss,
            "epochs_completed": done.epochs_completed,
            "training_time": done.training_time,
        }
    )


class NeuralPredictInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model_id: str
    input: list[Any] = Field(description="One sample (numbers) or a list of samples.")


class NeuralPredictResult(BaseModel):
    model_id: str
    predictions: list[str]
    classes: list[int]
    probabilities: list[list[float]]
    label_names: list[str]


def model_file_error(error: ModelFileError) -> ToolError:
    """Report a model whose weights file is missing (not_found) or unreadable
    (failed); the caller's input is not at fault in either case."""
    logger.error("prediction failed: %s", error)
    return ToolError(str(error), kind="not_found" if error.missing else "failed")


@tool("neural_predict", group="neural")
async def neural_predict(
    ctx: ToolContext, args: NeuralPredictInput
) -> NeuralPredictResult:
    """Predict classes for raw samples with a stored model (standardized the
    way its training data was). Returns labels, class indices and
    probabilities."""
    from app.neural import jobs
    from app.neural.store import ModelFileError

    check_features("neural_predict", "input", args.input)
    try:
        result = await asyncio.to_thread(
            jobs.predict, ctx.settings, args.model_id, args.input
        )
    except LookupError as error:
        raise ToolError(str(error.args[0]), kind="not_found") from None
    except ModelFileError as error:
        raise model_file_error(error) from None
    except ValueError as error:
        raise ToolError(
            f"invalid input for model {args.model_id}: {error}", kind="invalid_argument"
        ) from None
    return NeuralPredictResult(**result)


async def _ended_without_record(ctx: ToolContext, workflow_id: str) -> str | None:
    """Return why a job's workflow ended, when it ended without code of its
    own to record that (terminated, timed out), else None."""
    client = await ctx.optional_client()
    if client is None:
        return None
    try:
        described = await client.get_workflow_handle(workflow_id).describe()
    except RPCError:
        return None
    ending = {
        WorkflowExecutionStatus.TERMINATED: "terminated",
        WorkflowExecutionStatus.TIMED_OUT: "timed out",
    }.get(described.status)  # type: ignore[arg-type]
    if ending is None:
        return None
    return f"its workflow {workflow_id} was {ending} before the job ended"


class JobStatusInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    job_id: str


class EpochRecord(BaseModel):
    epoch: int
    loss: float = Field(description="Mean training loss over the epoch's batches.")
    accuracy: float = Field(description="Mean training accuracy over the batches.")
    val_loss: float | None = Field(description="Loss on the test split.")
    val_accuracy: float | None = Field(description="Accuracy on the test split.")
    seconds: float


class JobStatusResult(TrainingScores):
    job_id: str
    model_id: str
    status: str
    architecture: str
    dataset: str
    epochs_requested: int
    epochs_completed: int
    training_time: float | None
    jit: bool
    error: str | None
    epochs: list[EpochRecord]


@tool("neural_training_status", group="neural")
async def neural_training_status(
    ctx: ToolContext, args: JobStatusInput
) -> JobStatusResult:
    """Read a training job's status and its per-epoch loss, accuracy and time
    from the database. loss and accuracy are the final model's on the test
    split; train_loss is the last epoch's training loss. Per epoch, loss and
    accuracy are on the training split, val_loss and val_accuracy on the test
    split."""
    from app.neural import store

    job, epochs = await asyncio.to_thread(store.get_job, ctx.settings, args.job_id)
    if job is None:
        raise ToolError(
            f"training job {args.job_id!r} not found; neural_train returns job ids",
            kind="not_found",
        )
    if job.status in ("queued", "running"):
        ended = await _ended_without_record(ctx, job.workflow_id)
        if ended is not None and await asyncio.to_thread(
            store.end_job, ctx.settings, job.id, status="failed", error=ended
        ):
            job, epochs = await asyncio.to_thread(
                store.get_job, ctx.settings, args.job_id
            )
            assert job is not None
    model = None
    if job.status == "completed":
        model = await asyncio.to_thread(
            store.get_model_record, ctx.settings, job.model_id
        )
    # The job row keeps the last epoch's training loss. The model row keeps
    # the final model's test loss, which list_models reports too.
    test_loss = model.loss if model is not None else None
    return JobStatusResult(
        job_id=job.id,
        model_id=job.model_id,
        status=job.status,
        architecture=job.architecture,
        dataset=job.dataset,
        epochs_requested=job.epochs_requested,
        epochs_completed=job.epochs_completed,
        loss=test_loss,
        accuracy=job.accuracy,
        train_loss=job.loss,
        test_loss=test_loss,
        training_time=job.training_time,
        jit=job.jit,
        error=job.error,
        epochs=[
            EpochRecord(
                epoch=e.epoch,
                loss=e.loss,
                accuracy=e.accuracy,
                val_loss=e.val_loss,
                val_accuracy=e.val_accuracy,
                seconds=e.seconds,
            )
            for e in epochs
        ],
    )


class ListModelsInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str | None = Field(None, description="Only models of this cluster.")
    limit: int = Field(100, ge=1, le=1000)


class ModelRecord(BaseModel):
    model_id: str
    architecture: str
    dataset: str
    job_id: str | None
    session_id: str | None
    cluster_id: str | None
    node_id: str | None
    loss: float | None = Field(
        description="Loss of the model on the split named by evaluated_on."
    )
    accuracy: float | None = Field(
        description="Accuracy of the model on the split named by evaluated_on."
    )
    evaluated_on: Literal["test", "holdout"] = Field(
        description="test: the data set's test split; holdout: the validators' "
        "hold-out shard (worker models of a distributed session)."
    )
    train_loss: float | None = Field(
        None, description="Last epoch's training loss (neural_train models)."
    )
    test_loss: float | None = Field(
        None, description="Loss on the test split (= loss when evaluated_on is test)."
    )
    widths: list[int]
    created_at: str | None


class ListModelsResult(BaseModel):
    models: list[ModelRecord]
    count: int


@tool("neural_list_models", group="neural")
async def neural_list_models(
    ctx: ToolContext, args: ListModelsInput
) -> ListModelsResult:
    """List stored models, newest first, with loss and accuracy on the split
    named by evaluated_on (test, or the validators' hold-out for worker
    models of a distributed session), test_loss, and train_loss for
    neural_train models."""
    from app.neural import store

    if args.cluster_id is not None:
        # An unknown cluster id is not found, as in neural_cluster_status,
        # because an empty list would suggest a cluster without models.
        try:
            await asyncio.to_thread(store.get_cluster, ctx.settings, args.cluster_id)
        except LookupError as error:
            raise ToolError(str(error), kind="not_found") from None
    rows = await asyncio.to_thread(store.list_models, ctx.settings, args.cluster_id)
    rows = rows[: args.limit]
    train_losses = await asyncio.to_thread(
        store.job_train_losses, ctx.settings, [r.job_id for r in rows if r.job_id]
    )
    models = []
    for row in rows:
        split = _evaluated_on(row)
        models.append(
            ModelRecord(
                model_id=row.id,
                architecture=row.architecture,
                dataset=row.dataset,
                job_id=row.job_id,
                session_id=row.session_id,
                cluster_id=row.cluster_id,
                node_id=row.node_id,
                loss=row.loss,
                accuracy=row.accuracy,
                evaluated_on=split,
                train_loss=train_losses.get(row.job_id) if row.job_id else None,
                test_loss=row.loss if split == "test" else None,
                widths=list(row.spec.get("widths", [])),
                created_at=store.timestamp(row.created_at),
            )
        )
    return ListModelsResult(models=models, count=len(models))


def _evaluated_on(row: Any) -> Literal["test", "holdout"]:
    split = row.spec.get("evaluated_on")
    if split in ("test", "holdout"):
        return split
    # Rows stored before the split was recorded: worker models of a session
    # were scored on the hold-out, every other model on the test split.
    return "holdout" if row.spec.get("role") == "node" else "test"
