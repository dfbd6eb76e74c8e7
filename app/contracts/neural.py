"""Inputs and results of the neural workflows and activities.

Weights never cross a Temporal boundary: models, checkpoints, updates and
data sets travel as object paths in storage buckets.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

MODELS_BUCKET = "models"
DATASETS_BUCKET = "datasets"

# ApplicationError type of a training run whose loss became NaN or infinite.
# Its first detail is the problem, such as "loss is NaN at epoch 1".
TRAINING_DIVERGED = "TrainingDiverged"

NodeRole = Literal["worker", "parameter_server", "aggregator", "validator"]
Aggregation = Literal["mean", "median"]


class ModelConfig(BaseModel):
    """Architecture and layer widths of a model."""

    architecture: str
    widths: list[int]
    tier: str = "custom"


class TrainJobInput(BaseModel):
    job_id: str
    model_id: str
    model: ModelConfig
    dataset: Any = Field(description="A data set name or a storage reference.")
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    seed: int = 0
    jit: bool = True


class TrainJobResult(BaseModel):
    job_id: str
    model_id: str
    loss: float = Field(description="Training loss of the last epoch.")
    accuracy: float = Field(description="Accuracy on the test split.")
    val_loss: float = Field(description="Loss on the test split.")
    epochs_completed: int
    training_time: float
    resumed_from_epoch: int = 0
    storage_path: str
    jit: bool


class JobFailure(BaseModel):
    job_id: str
    error: str


class NodeRef(BaseModel):
    node_id: str
    task_queue: str
    role: NodeRole
    reducer: str | None = Field(
        None, description="Node id of the aggregator this node reports to."
    )
    depth: int = 0


class SessionPlan(BaseModel):
    """What a distributed session trains and how, fixed at its start."""

    session_id: str
    cluster_id: str
    model: ModelConfig
    dataset: Any
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    federated: bool
    consensus: str
    jit: bool
    seed: int = 0
    workers: list[NodeRef]
    validators: list[NodeRef] = Field(default_factory=list)
    aggregators: list[NodeRef] = Field(default_factory=list)
    parameter_server: NodeRef | None = None
    default_queue: str = Field(
        description="Queue of aggregation and evaluation without a parameter server."
    )
    rounds: int
    local_epochs: int = 1
    round_timeout_seconds: float = 300.0
    heartbeat_timeout_seconds: float = 15.0
    validation_tolerance: float = 0.1
    continue_every: int = 20
    checkpoint_seconds: float = Field(
        5.0, description="Least time between a node's checkpoints within a round."
    )


class SessionState(BaseModel):
    """Progress carried across continue-as-new."""

    round: int = 0
    global_path: str | None = None
    optimizer_state_path: str | None = None
    data_path: str | None = None
    features: int = 0
    classes: int = 0
    steps_per_epoch: int = 1
    rejected: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    missing: dict[str, int] = Field(
        default_factory=dict, description="Node id to rounds it missed."
    )
    node_updates: dict[str, str] = Field(
        default_factory=dict, description="Node id to its last local model path."
    )


class SessionInput(BaseModel):
    plan: SessionPlan
    state: SessionState = Field(default_factory=SessionState)


class SessionResult(BaseModel):
    session_id: str
    model_id: str
    rounds_completed: int
    rounds_rejected: int
    loss: float = Field(description="Loss of the global model on the test split.")
    accuracy: float = Field(
        description="Accuracy of the global model on the test split."
    )
    samples: int
    training_time: float
    samples_per_second: float
    node_models: list[str]


class PrepareInput(BaseModel):
    plan: SessionPlan


class PrepareResult(BaseModel):
    data_path: str
    global_path: str
    optimizer_state_path: str | None
    features: int
    classes: int
    steps_per_epoch: int
    shard_sizes: dict[str, int]


class NodeTrainInput(BaseModel):
    session_id: str
    node_id: str
    round: int
    model: ModelConfig
    data_path: str
    shard: int
    shards: int
    global_path: str
    federated: bool
    local_epochs: int
    step: int = Field(0, description="Global step index, for gradient rounds.")
    batch_size: int
    learning_rate: float
    optimizer: str
    jit: bool
    seed: int = 0
    checkpoint_seconds: float = 5.0


class NodeTrainResult(BaseModel):
    node_id: str
    round: int
    update_path: str
    samples: int
    loss: float = Field(description="Training loss of the node's last local epoch.")
    accuracy: float = Field(description="Training accuracy of that epoch.")
    train_seconds: float
    processed_samples: int = Field(0, description="Samples of all steps run.")
    resumed_from_epoch: int = 0
    attempt: int = 1


class WeightedRef(BaseModel):
    path: str
    weight: float


class AggregateInput(BaseModel):
    session_id: str
    round: int
    name: str
    inputs: list[WeightedRef]
    method: Aggregation = "mean"
    apply_gradient: bool = Field(
        False, description="Treat inputs as gradients and take one optimizer step."
    )
    model: ModelConfig | None = None
    global_path: str | None = None
    optimizer_state_path: str | None = None
    learning_rate: float = 0.001
    optimizer: str = "adam"
    jit: bool = True


class AggregateResult(BaseModel):
    path: str
    weight: float
    optimizer_state_path: str | None = None


class ValidateInput(BaseModel):
    session_id: str
    node_id: str
    model: ModelConfig
    data_path: str
    shard: int
    shards: int
    candidate_path: str
    previous_path: str
    jit: bool = True


class ValidateResult(BaseModel):
    node_id: str
    candidate_loss: float
    previous_loss: float
    candidate_accuracy: float
    samples: int


class RoundEventRecord(BaseModel):
    node_id: str | None = None
    kind: str
    detail: dict[str, Any] = Field(default_factory=dict)


class RoundRecord(BaseModel):
    session_id: str
    round: int
    events: list[RoundEventRecord]
    rounds_completed: int
    rounds_rejected: int


class FinishInput(BaseModel):
    plan: SessionPlan
    data_path: str
    global_path: str
    node_updates: dict[str, str] = Field(
        default_factory=dict, description="Node id to its last local model path."
    )
    rounds_completed: int
    rounds_rejected: int
    samples: int
    train_seconds: float


class SessionFailure(BaseModel):
    session_id: str
    error: str


class MemoryCleanupInput(BaseModel):
    queues: list[str]
    timeout_seconds: float = 20.0


class MemoryCleanupReport(BaseModel):
    """Resident memory of one worker process around a cleanup, in bytes."""

    task_queue: str
    hostname: str
    pid: int
    rss_before: int
    rss_after: int
    compiled_trainers_cleared: int
    datasets_cleared: int


class MemoryCleanupResult(BaseModel):
    processes: list[MemoryCleanupReport]
    missing: dict[str, str] = Field(default_factory=dict)
