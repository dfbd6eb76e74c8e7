"""Tables of the neural capability: training jobs and their epochs, stored
models, clusters, nodes, distributed sessions and their round events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index
from sqlmodel import Field, SQLModel

from app.db.models import utc_now


class NeuralJob(SQLModel, table=True):
    """One `neural_train` run; the Temporal workflow id is `neural-train-<id>`."""

    __tablename__ = "neural_jobs"

    id: str = Field(primary_key=True, max_length=64)
    workflow_id: str = Field(max_length=200)
    status: str = Field(max_length=20)
    architecture: str = Field(max_length=40)
    tier: str = Field(max_length=20)
    dataset: str = Field(max_length=300)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    model_id: str = Field(max_length=64)
    epochs_requested: int
    epochs_completed: int = 0
    loss: float | None = None
    accuracy: float | None = None
    training_time: float | None = None
    jit: bool = True
    error: str | None = None
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class NeuralEpoch(SQLModel, table=True):
    """Metrics of one epoch of a job, or of one node's local epoch in a session."""

    __tablename__ = "neural_epochs"
    __table_args__ = (Index("ix_neural_epochs_run_id", "run_id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=64)
    node_id: str | None = Field(default=None, max_length=64)
    round: int | None = None
    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class NeuralModel(SQLModel, table=True):
    """A trained model; its parameters are an NPZ object in the `models` bucket."""

    __tablename__ = "neural_models"
    __table_args__ = (Index("ix_neural_models_cluster_id", "cluster_id"),)

    id: str = Field(primary_key=True, max_length=64)
    job_id: str | None = Field(default=None, max_length=64)
    session_id: str | None = Field(default=None, max_length=64)
    cluster_id: str | None = Field(default=None, max_length=64)
    node_id: str | None = Field(default=None, max_length=64)
    architecture: str = Field(max_length=40)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    dataset: str = Field(max_length=300)
    storage_path: str = Field(max_length=500)
    loss: float | None = None
    accuracy: float | None = None
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class NeuralCluster(SQLModel, table=True):
    __tablename__ = "neural_clusters"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    topology: str = Field(max_length=20)
    architecture: str = Field(max_length=40)
    wasm_optimization: bool = True
    daa_enabled: bool = True
    consensus: str = Field(max_length=40)
    status: str = Field(max_length=20)
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    terminated_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class NeuralNode(SQLModel, table=True):
    """A worker slot of a cluster, polling `nexus-neural-<id>`."""

    __tablename__ = "neural_nodes"
    __table_args__ = (Index("ix_neural_nodes_cluster_id", "cluster_id"),)

    id: str = Field(primary_key=True, max_length=64)
    cluster_id: str = Field(max_length=64)
    role: str = Field(max_length=40)
    model: str = Field(max_length=20)
    capabilities: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    autonomy: float = 0.8
    status: str = Field(max_length=20)
    task_queue: str = Field(max_length=200)
    parent_id: str | None = Field(default=None, max_length=64)
    connections: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class NeuralSession(SQLModel, table=True):
    """One `neural_train_distributed` run of a cluster."""

    __tablename__ = "neural_sessions"
    __table_args__ = (Index("ix_neural_sessions_cluster_id", "cluster_id"),)

    id: str = Field(primary_key=True, max_length=64)
    cluster_id: str = Field(max_length=64)
    workflow_id: str = Field(max_length=200)
    status: str = Field(max_length=20)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    rounds_total: int
    rounds_completed: int = 0
    rounds_rejected: int = 0
    model_id: str | None = Field(default=None, max_length=64)
    loss: float | None = None
    accuracy: float | None = None
    samples_per_second: float | None = None
    training_time: float | None = None
    error: str | None = None
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class NeuralRoundEvent(SQLModel, table=True):
    """What happened to one node or to the aggregate in one round: `update`,
    `missing`, `diverged`, `aggregated`, `accepted`, `rejected`."""

    __tablename__ = "neural_round_events"
    __table_args__ = (Index("ix_neural_round_events_session_id", "session_id"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(max_length=64)
    round: int
    node_id: str | None = Field(default=None, max_length=64)
    kind: str = Field(max_length=20)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
