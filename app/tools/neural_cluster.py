"""Neural cluster tools: clusters, nodes, wiring, distributed training,
distributed predictions, optimization and termination."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from app.contracts.neural import (
    MemoryCleanupInput,
    MemoryCleanupReport,
    MemoryCleanupResult,
    ModelConfig,
    NodeRef,
    SessionInput,
    SessionPlan,
    SessionResult,
)
from app.contracts.queues import NEURAL, ORCHESTRATION, neural_node_queue
from app.neural.architectures import CLUSTER_ARCHITECTURES, MAX_LAYER_WIDTH
from app.services.health import POLLER_STALE_AFTER
from app.tools.neural import (
    Optimizer,
    check_dataset,
    check_features,
    dataset_reference,
    failure_kind,
    failure_message,
    model_file_error,
    model_size_problem,
    start_recorded_workflow,
    store_inline_dataset,
)
from app.tools.registry import ToolContext, ToolError, arguments_error, tool

# The same order as the swarm topologies: typing caches `Literal[...] | None`
# by value set, so two orders would give schemas that differ between runs.
Topology = Literal["hierarchical", "mesh", "ring", "star"]
Consensus = Literal["proof-of-learning", "byzantine", "raft", "gossip"]
Role = Literal["worker", "parameter_server", "aggregator", "validator"]
_FRESH_SECONDS = int(POLLER_STALE_AFTER.total_seconds())


def _cluster(ctx: ToolContext, cluster_id: str, *, active: bool = True) -> Any:
    from app.neural import store

    try:
        cluster = store.get_cluster(ctx.settings, cluster_id)
    except LookupError as error:
        raise ToolError(str(error), kind="not_found") from None
    if active and cluster.status != "active":
        raise ToolError(
            f"cluster {cluster_id} is {cluster.status}; create a new one with "
            "neural_cluster_init",
            kind="conflict",
        )
    return cluster


class ClusterInitInput(BaseModel):
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    name: str = Field(min_length=1, max_length=200)
    topology: Topology = "mesh"
    architecture: Literal[
        "transformer", "cnn", "rnn", "gnn", "hybrid", "feedforward"
    ] = "transformer"
    wasm_optimization: bool = Field(
        True, alias="wasmOptimization", description="jit-compile (XLA) training steps."
    )
    daa_enabled: bool = Field(True, alias="daaEnabled")
    consensus: Consensus = "proof-of-learning"


class ClusterInitResult(BaseModel):
    cluster_id: str
    name: str
    status: str
    topology: str
    architecture: str
    model_architecture: str
    wasm_optimization: bool
    daa_enabled: bool
    consensus: str
    created_at: str | None


@tool("neural_cluster_init", group="neural")
async def neural_cluster_init(
    ctx: ToolContext, args: ClusterInitInput
) -> ClusterInitResult:
    """Create a neural cluster record (id dnc_ + 12 hex). Deploy nodes with
    neural_node_deploy, then train with neural_train_distributed."""
    from app.neural import store
    from app.neural.models import NeuralCluster

    cluster = NeuralCluster(
        id=store.new_id("dnc_"),
        name=args.name,
        topology=args.topology,
        architecture=args.architecture,
        wasm_optimization=args.wasm_optimization,
        daa_enabled=args.daa_enabled,
        consensus=args.consensus,
        status="active",
    )
    await asyncio.to_thread(store.add_record, ctx.settings, cluster)
    return ClusterInitResult(
        cluster_id=cluster.id,
        name=cluster.name,
        status=cluster.status,
        topology=cluster.topology,
        architecture=cluster.architecture,
        model_architecture=CLUSTER_ARCHITECTURES[cluster.architecture],
        wasm_optimization=cluster.wasm_optimization,
        daa_enabled=cluster.daa_enabled,
        consensus=cluster.consensus,
        created_at=store.timestamp(cluster.created_at),
    )


# Prefix of the capability in which a node record stores a custom model's
# layer widths, such as `layers:128,64`.
LAYERS_CAPABILITY = "layers:"


class NodeDeployInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str
    role: Role = "worker"
    model: Literal["base", "large", "xl", "custom"] = "base"
    capabilities: list[str] = Field(default_factory=lambda: ["training", "inference"])
    autonomy: float = Field(0.8, ge=0, le=1)
    layers: list[Annotated[int, Field(gt=0, le=MAX_LAYER_WIDTH)]] = Field(
        default_factory=list,
        description=f"Layer widths of a `custom` model, each at most "
        f"{MAX_LAYER_WIDTH}.",
    )

    @field_validator("capabilities")
    @classmethod
    def _no_layers_capability(cls, value: list[str]) -> list[str]:
        # The node record keeps a custom model's widths as a `layers:`
        # capability, which only the validated `layers` field may set.
        for entry in value:
            if entry.startswith(LAYERS_CAPABILITY):
                raise ValueError(
                    f"{entry!r} sets layer widths, which only the layers field "
                    "does; remove it from capabilities and give model custom "
                    "with layers, e.g. [128, 64]"
                )
        return value

    @model_validator(mode="after")
    def _layers_for_custom(self) -> NodeDeployInput:
        if self.layers and self.model != "custom":
            raise ValueError(
                f"layers are the widths of a custom model, and model is "
                f"{self.model!r}, whose widths are fixed; leave layers out or "
                "use model custom"
            )
        return self


class NodeRecord(BaseModel):
    node_id: str
    cluster_id: str
    role: str
    model: str
    capabilities: list[str]
    autonomy: float
    status: str
    task_queue: str
    parent_id: str | None = None
    connections: list[str] = Field(default_factory=list)
    pollers: int | None = Field(
        None,
        description="Workers that polled the node's queue within the last "
        f"{_FRESH_SECONDS} s, so a stopped worker leaves the count within "
        f"{_FRESH_SECONDS} s.",
    )
    trains: bool = Field(
        description="Whether neural_train_distributed gives this node a shard: "
        "a worker with the training capability."
    )
    note: str | None = Field(
        None, description="Why a worker node takes no part in training."
    )


class NodeDeployResult(NodeRecord):
    runs_in: str


@tool("neural_node_deploy", group="neural")
async def neural_node_deploy(
    ctx: ToolContext, args: NodeDeployInput
) -> NodeDeployResult:
    """Add a node to a cluster: a worker slot polling its own task queue
    nexus-neural-<node_id>. Roles: worker (trains a shard), parameter_server
    (aggregates, owns the global model), aggregator (reduces a subtree),
    validator (evaluates updates on held-out data)."""
    from app.neural import store
    from app.neural.models import NeuralNode

    cluster = _cluster(ctx, args.cluster_id)
    if args.model == "custom" and not args.layers:
        raise ToolError(
            "model 'custom' needs layers, e.g. [128, 64]", kind="invalid_argument"
        )
    if args.role == "parameter_server":
        nodes = await asyncio.to_thread(store.cluster_nodes, ctx.settings, cluster.id)
        if any(n.role == "parameter_server" for n in nodes):
            raise ToolError(
                f"cluster {cluster.id} already has a parameter server; deploy a "
                "worker, aggregator or validator",
                kind="conflict",
            )
    if args.role == "worker" and "training" in args.capabilities:
        await asyncio.to_thread(_check_same_model, ctx, cluster.id, args)
    node_id = store.new_id("node_")
    capabilities = list(args.capabilities)
    if args.model == "custom":
        widths = ",".join(map(str, args.layers))
        capabilities = [*capabilities, f"{LAYERS_CAPABILITY}{widths}"]
    node = NeuralNode(
        id=node_id,
        cluster_id=cluster.id,
        role=args.role,
        model=args.model,
        capabilities=capabilities,
        autonomy=args.autonomy,
        status="deployed",
        task_queue=neural_node_queue(node_id),
    )
    await asyncio.to_thread(store.add_record, ctx.settings, node)
    runs_in = (
        "the nexus-neural worker process (NEXUS_NEURAL_EMBEDDED_NODES=true)"
        if ctx.settings.neural_embedded_nodes
        else f"a process started with `nexus worker --neural-node {node_id}`"
    )
    return NodeDeployResult(**_node_record(node).model_dump(), runs_in=runs_in)


def _check_same_model(ctx: ToolContext, cluster_id: str, args: NodeDeployInput) -> None:
    """Reject a training worker whose model differs from the cluster's
    training workers, because federated averaging needs one model shape and
    no tool removes a node once it is deployed."""
    from app.neural import store
    from app.neural.nets import NODE_MODEL_TIERS, layer_widths

    widths = (
        list(args.layers)
        if args.model == "custom"
        else list(layer_widths(NODE_MODEL_TIERS[args.model], None))
    )
    for node in store.cluster_nodes(ctx.settings, cluster_id):
        if not _trains(node):
            continue
        existing = _node_widths(node)
        if existing != widths:
            raise ToolError(
                f"cluster {cluster_id} trains a model with layers {existing} "
                f"(worker {node.id}, model {node.model!r}), and this worker's "
                f"model {args.model!r} has layers {widths}; averaging needs one "
                "model shape, so deploy the worker with the same model, or "
                "create a new cluster for the other model",
                kind="conflict",
            )
        return


def _trains(node: Any) -> bool:
    return bool(node.role == "worker" and "training" in node.capabilities)


def _left_out_reason(node: Any) -> str | None:
    if node.role != "worker" or _trains(node):
        return None
    return (
        "worker without the training capability: neural_train_distributed "
        "leaves it out; deploy a worker with capabilities including 'training' "
        "to train on it"
    )


def _node_record(node: Any, pollers: int | None = None) -> NodeRecord:
    return NodeRecord(
        node_id=node.id,
        cluster_id=node.cluster_id,
        role=node.role,
        model=node.model,
        capabilities=[
            c for c in node.capabilities if not c.startswith(LAYERS_CAPABILITY)
        ],
        autonomy=node.autonomy,
        status=node.status,
        task_queue=node.task_queue,
        parent_id=node.parent_id,
        connections=list(node.connections),
        pollers=pollers,
        trains=_trains(node),
        note=_left_out_reason(node),
    )


class ClusterConnectInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str
    topology: Topology | None = Field(None, description="Default: the cluster's.")


class ClusterConnectResult(BaseModel):
    cluster_id: str
    topology: str
    nodes: list[NodeRecord]
    links: int


def _connect(ctx: ToolContext, cluster_id: str, topology: str) -> list[Any]:
    from app.db import session_scope
    from app.neural import store
    from app.neural.cluster import wire
    from app.neural.models import NeuralCluster, NeuralNode

    nodes = store.cluster_nodes(ctx.settings, cluster_id)
    if not nodes:
        # Nothing to wire, and the cluster's topology stays as it was.
        return []
    wiring = wire(nodes, topology)
    with session_scope(ctx.settings.effective_database_url) as session:
        cluster = session.get(NeuralCluster, cluster_id)
        if cluster is not None:
            cluster.topology = topology
            session.add(cluster)
        for node in nodes:
            row = session.get(NeuralNode, node.id)
            if row is None:
                continue
            row.parent_id, row.connections = wiring[node.id]
            row.status = "connected"
            session.add(row)
    return store.cluster_nodes(ctx.settings, cluster_id)


@tool("neural_cluster_connect", group="neural")
async def neural_cluster_connect(
    ctx: ToolContext, args: ClusterConnectInput
) -> ClusterConnectResult:
    """Wire a cluster's nodes by topology: mesh (all pairs), ring (i to
    i+1 mod n), star (all to the first node) or hierarchical (parent of node
    i is (i-1)//2), the parameter server first."""
    cluster = _cluster(ctx, args.cluster_id)
    topology = args.topology or cluster.topology
    nodes = await asyncio.to_thread(_connect, ctx, cluster.id, topology)
    if not nodes:
        raise ToolError(
            f"cluster {cluster.id} has no nodes; deploy some with neural_node_deploy",
            kind="conflict",
        )
    records = [_node_record(n) for n in nodes]
    links = sum(len(r.connections) for r in records) // 2
    return ClusterConnectResult(
        cluster_id=cluster.id, topology=topology, nodes=records, links=links
    )


class TrainDistributedInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str
    dataset: str | dict[str, Any]
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=512)
    learning_rate: float = Field(0.001, gt=0, le=10)
    optimizer: Optimizer = "adam"
    federated: bool = False
    rounds: int | None = Field(
        None,
        ge=1,
        description="Federated rounds (only with federated=true); must divide "
        "epochs. Default: the largest divisor of epochs up to 5.",
    )
    round_timeout_seconds: float = Field(300, gt=0, le=86400)
    validation_tolerance: float = Field(
        0.1, ge=0, description="Relative rise of validation loss that is rejected."
    )
    checkpoint_seconds: float = Field(
        5.0, ge=0, description="Least seconds between a node's checkpoints."
    )
    seed: int = Field(0, ge=0)
    wait: bool = Field(False, description="Wait for the session to finish.")

    @model_validator(mode="after")
    def _rounds_need_federated(self) -> TrainDistributedInput:
        if self.rounds is not None and not self.federated:
            raise arguments_error(
                "rounds applies only to federated training, because a "
                "synchronous session runs one gradient step per round (epochs x "
                "steps per epoch rounds in all); leave rounds out or set "
                "federated to true",
                "rounds",
            )
        return self


class TrainDistributedResult(BaseModel):
    session_id: str
    cluster_id: str
    workflow_id: str
    status: str
    mode: str
    rounds: int | None
    local_epochs: int
    workers: list[str]
    validators: list[str]
    parameter_server: str | None
    left_out: dict[str, str] = Field(
        default_factory=dict,
        description="Worker nodes that train nothing in this session, and why.",
    )
    result: SessionResult | None = None


def _node_widths(node: Any) -> list[int]:
    """Return a node's layer widths: a custom model's stored widths, checked
    as the layers field is, or its tier's.

    Raises:
        ToolError: the stored widths are invalid, as in a node that an
            older version deployed with a `layers:` capability of its own.
    """
    from app.neural.nets import NODE_MODEL_TIERS, layer_widths

    for capability in node.capabilities:
        if not capability.startswith(LAYERS_CAPABILITY):
            continue
        entries = capability.removeprefix(LAYERS_CAPABILITY).split(",")
        try:
            values = [int(entry) for entry in entries]
            return list(layer_widths("custom", values))
        except ValueError as error:
            raise ToolError(
                f"node {node.id} has the invalid layer widths {capability!r} "
                f"({error}); deploy a new node with model custom and layers "
                "such as [128, 64], each from 1 to "
                f"{MAX_LAYER_WIDTH}, and train on a cluster without this node",
                kind="conflict",
            ) from None
    return list(layer_widths(NODE_MODEL_TIERS[node.model], None))


def _plan(
    ctx: ToolContext,
    cluster: Any,
    args: TrainDistributedInput,
    session_id: str,
    dataset: Any,
) -> SessionPlan:
    from app.neural import store
    from app.neural.cluster import reducer_of

    nodes = store.cluster_nodes(ctx.settings, cluster.id)
    if any(n.parent_id is None and not n.connections for n in nodes) and len(nodes) > 1:
        nodes = _connect(ctx, cluster.id, cluster.topology)
    by_id = {n.id: n for n in nodes}
    workers = [n for n in nodes if _trains(n)]
    if not workers:
        raise ToolError(
            f"cluster {cluster.id} has no worker node with the training capability; "
            "deploy one with neural_node_deploy role=worker",
            kind="conflict",
        )
    widths = {tuple(_node_widths(n)) for n in workers}
    if len(widths) > 1:
        raise ToolError(
            f"worker nodes of cluster {cluster.id} have different models "
            f"{sorted(widths)}; "
            "averaging needs one model shape and no tool removes a node, so "
            "create a new cluster and deploy workers with one model there",
            kind="conflict",
        )

    def ref(node: Any) -> NodeRef:
        reducer, depth = reducer_of(node, by_id)
        return NodeRef(
            node_id=node.id,
            task_queue=node.task_queue,
            role=node.role,
            reducer=reducer if cluster.topology == "hierarchical" else None,
            depth=depth,
        )

    rounds = 1
    local_epochs = 1
    if args.federated:
        if args.rounds is not None:
            if args.epochs % args.rounds:
                raise ToolError(
                    f"rounds={args.rounds} does not divide epochs={args.epochs}; each "
                    "round trains epochs/rounds local epochs",
                    kind="invalid_argument",
                )
            rounds = args.rounds
        else:
            rounds = max(d for d in range(1, 6) if args.epochs % d == 0)
        local_epochs = args.epochs // rounds
    servers = [n for n in nodes if n.role == "parameter_server"]
    return SessionPlan(
        session_id=session_id,
        cluster_id=cluster.id,
        model=ModelConfig(
            architecture=CLUSTER_ARCHITECTURES[cluster.architecture],
            widths=list(next(iter(widths))),
            tier=workers[0].model,
        ),
        dataset=dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        federated=args.federated,
        consensus=cluster.consensus,
        jit=cluster.wasm_optimization,
        seed=args.seed,
        workers=[ref(n) for n in workers],
        validators=[ref(n) for n in nodes if n.role == "validator"],
        aggregators=[ref(n) for n in nodes if n.role == "aggregator"],
        parameter_server=ref(servers[0]) if servers else None,
        default_queue=NEURAL,
        rounds=rounds,
        local_epochs=local_epochs,
        round_timeout_seconds=args.round_timeout_seconds,
        heartbeat_timeout_seconds=ctx.settings.neural_node_heartbeat_timeout_seconds,
        validation_tolerance=args.validation_tolerance,
        checkpoint_seconds=args.checkpoint_seconds,
    )


@tool("neural_train_distributed", group="neural")
async def neural_train_distributed(
    ctx: ToolContext, args: TrainDistributedInput
) -> TrainDistributedResult:
    """Train the cluster's model across its worker nodes in rounds (a Temporal
    workflow). federated=true: local epochs per round and federated averaging
    weighted by sample count; false: synchronous gradient averaging, one
    optimizer step per round. Returns session_id; read progress with
    neural_cluster_status."""
    from app.neural import store
    from app.neural.models import NeuralSession

    cluster = _cluster(ctx, args.cluster_id)
    session_id = store.new_id("session_")
    prepared = await check_dataset(ctx, args.dataset, args.seed)
    dataset = dataset_reference(args.dataset, session_id)
    plan = await asyncio.to_thread(_plan, ctx, cluster, args, session_id, dataset)
    problem = await asyncio.to_thread(
        model_size_problem, plan.model.architecture, plan.model.widths, prepared
    )
    if problem is not None:
        raise ToolError(
            f"the worker nodes of cluster {cluster.id} have a model too large "
            f"for this data set: {problem}",
            kind="invalid_argument",
        )
    # Connect before writing the data set or the session, so that an
    # unreachable Temporal leaves neither behind.
    client = await ctx.client()
    await store_inline_dataset(ctx, args.dataset, session_id)
    left_out = {
        node.id: reason
        for node in await asyncio.to_thread(
            store.cluster_nodes, ctx.settings, cluster.id
        )
        if (reason := _left_out_reason(node)) is not None
    }
    workflow_id = f"neural-session-{session_id}"
    session = NeuralSession(
        id=session_id,
        cluster_id=cluster.id,
        workflow_id=workflow_id,
        status="running",
        config=args.model_dump(exclude={"dataset"})
        | {"dataset": str(args.dataset)[:200]},
        rounds_total=plan.rounds if args.federated else 0,
    )
    handle = await start_recorded_workflow(
        ctx,
        client,
        session,
        args.dataset,
        "DistributedTrainingWorkflow",
        SessionInput(plan=plan),
        SessionResult,
    )
    result = TrainDistributedResult(
        session_id=session_id,
        cluster_id=cluster.id,
        workflow_id=workflow_id,
        status="running",
        mode="federated averaging"
        if args.federated
        else "synchronous gradient averaging",
        rounds=plan.rounds if args.federated else None,
        local_epochs=plan.local_epochs,
        workers=[w.node_id for w in plan.workers],
        validators=[v.node_id for v in plan.validators],
        parameter_server=plan.parameter_server.node_id
        if plan.parameter_server
        else None,
        left_out=left_out,
    )
    if not args.wait:
        return result
    try:
        done: SessionResult = await handle.result()
    except WorkflowFailureError as error:
        raise ToolError(failure_message(error), kind=failure_kind(error)) from None
    return result.model_copy(
        update={"status": "completed", "rounds": done.rounds_completed, "result": done}
    )


class ClusterStatusInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str
    session_limit: int = Field(
        10, ge=1, le=100, description="Most sessions listed, newest first."
    )


class SessionRecord(BaseModel):
    session_id: str
    status: str
    rounds_completed: int
    rounds_rejected: int
    model_id: str | None
    loss: float | None = Field(
        description="Loss of the session's global model on the test split."
    )
    accuracy: float | None = Field(
        description="Accuracy of the global model on the test split."
    )
    test_loss: float | None = Field(description="The same as loss.")
    samples_per_second: float | None
    training_time: float | None
    error: str | None
    events: list[dict[str, Any]]


class ClusterStatusResult(BaseModel):
    cluster_id: str
    name: str
    status: str
    topology: str
    architecture: str
    consensus: str
    wasm_optimization: bool
    daa_enabled: bool
    nodes: list[NodeRecord]
    sessions: list[SessionRecord]
    sessions_omitted: int = Field(
        0,
        description="Older sessions left out of `sessions` by session_limit; "
        "metrics count them.",
    )
    metrics: dict[str, Any]


@tool("neural_cluster_status", group="neural")
async def neural_cluster_status(
    ctx: ToolContext, args: ClusterStatusInput
) -> ClusterStatusResult:
    """Show a cluster: nodes (with live poller counts of their queues),
    training sessions with round events (updates, missing and diverged
    nodes, accepted and rejected aggregates) and metrics."""
    from app.neural import store
    from app.services import health

    cluster = _cluster(ctx, args.cluster_id, active=False)
    # A terminated cluster still shows its nodes, each marked terminated.
    nodes = await asyncio.to_thread(
        store.cluster_nodes, ctx.settings, cluster.id, include_terminated=True
    )
    client = await ctx.optional_client()
    records: list[NodeRecord] = []
    for node in nodes:
        pollers = None
        if client is not None:
            queue = await health.describe_queue(
                client,
                ctx.settings.namespace,
                node.task_queue,
                stale_after=health.POLLER_STALE_AFTER,
            )
            # Temporal lists a stopped worker's poller for minutes after its
            # last poll, marked stale here.
            pollers = sum(1 for p in queue.activity_pollers if not p.stale)
        records.append(_node_record(node, pollers))
    sessions = await asyncio.to_thread(store.cluster_sessions, ctx.settings, cluster.id)
    session_records = []
    for session in sessions[: args.session_limit]:
        events = await asyncio.to_thread(store.session_events, ctx.settings, session.id)
        session_records.append(
            SessionRecord(
                session_id=session.id,
                status=session.status,
                rounds_completed=session.rounds_completed,
                rounds_rejected=session.rounds_rejected,
                model_id=session.model_id,
                loss=session.loss,
                accuracy=session.accuracy,
                test_loss=session.loss,
                samples_per_second=session.samples_per_second,
                training_time=session.training_time,
                error=session.error,
                events=[
                    {"round": e.round, "node_id": e.node_id, "kind": e.kind, **e.detail}
                    for e in events
                ],
            )
        )
    completed = [s for s in sessions if s.status == "completed"]
    metrics = {
        "nodes": len(nodes),
        "sessions": len(sessions),
        "sessions_completed": len(completed),
        "best_accuracy": max((s.accuracy or 0 for s in completed), default=None),
        "rounds_rejected": sum(s.rounds_rejected for s in sessions),
    }
    return ClusterStatusResult(
        cluster_id=cluster.id,
        name=cluster.name,
        status=cluster.status,
        topology=cluster.topology,
        architecture=cluster.architecture,
        consensus=cluster.consensus,
        wasm_optimization=cluster.wasm_optimization,
        daa_enabled=cluster.daa_enabled,
        nodes=records,
        sessions=session_records,
        sessions_omitted=len(sessions) - len(session_records),
        metrics=metrics,
    )


class PredictDistributedInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str
    input_data: list[Any] = Field(description="One sample or a list of samples.")
    aggregation: Literal["mean", "majority", "weighted", "ensemble"] = "mean"
    session_id: str | None = Field(None, description="Default: the newest completed.")


class PredictDistributedResult(BaseModel):
    cluster_id: str
    session_id: str
    aggregation: str
    predictions: list[str]
    classes: list[int]
    probabilities: list[list[float]] | None
    node_predictions: dict[str, list[int]]
    weights: dict[str, float]


def _predict_distributed(
    ctx: ToolContext, args: PredictDistributedInput
) -> PredictDistributedResult:
    import numpy as np

    from app.neural import jobs, store

    sessions = [
        s
        for s in store.cluster_sessions(ctx.settings, args.cluster_id)
        if s.status == "completed"
    ]
    if args.session_id:
        sessions = [s for s in sessions if s.id == args.session_id]
    if not sessions:
        raise ToolError(
            f"cluster {args.cluster_id} has no completed training session"
            + (f" {args.session_id}" if args.session_id else "")
            + "; run neural_train_distributed first",
            kind="not_found",
        )
    session = sessions[0]
    models = [
        m
        for m in store.list_models(ctx.settings, args.cluster_id)
        if m.session_id == session.id and m.spec.get("role") == "node"
    ]
    probabilities: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    labels: list[str] = []
    for record in sorted(models, key=lambda m: m.node_id or ""):
        try:
            _, spec, params, mean, std = store.load_model(ctx.settings, record.id)
        except store.ModelFileError as error:
            raise model_file_error(error) from None
        try:
            probabilities[record.node_id or record.id] = jobs.predict_logits(
                spec, params, mean, std, args.input_data
            )
        except ValueError as error:
            raise ToolError(
                f"invalid input_data: {error}", kind="invalid_argument"
            ) from None
        weights[record.node_id or record.id] = float(record.accuracy or 0.0)
        labels = record.spec.get("label_names") or [str(i) for i in range(spec.classes)]
    stacked = np.stack(list(probabilities.values()))
    node_classes = stacked.argmax(axis=2)
    combined: np.ndarray | None
    if args.aggregation == "majority":
        votes = np.stack(
            [np.bincount(col, minlength=stacked.shape[2]) for col in node_classes.T]
        )
        classes = votes.argmax(axis=1)
        combined = None
    else:
        if args.aggregation == "weighted":
            w = np.asarray(list(weights.values()))
            w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
            combined = np.tensordot(w, stacked, axes=1)
        else:
            combined = stacked.mean(axis=0)
        classes = combined.argmax(axis=1)
    return PredictDistributedResult(
        cluster_id=args.cluster_id,
        session_id=session.id,
        aggregation=args.aggregation,
        predictions=[labels[i] for i in classes],
        classes=[int(i) for i in classes],
        probabilities=combined.round(6).tolist() if combined is not None else None,
        node_predictions={
            node: [int(c) for c in row]
            for node, row in zip(probabilities, node_classes, strict=True)
        },
        weights=weights,
    )


@tool("neural_predict_distributed", group="neural")
async def neural_predict_distributed(
    ctx: ToolContext, args: PredictDistributedInput
) -> PredictDistributedResult:
    """Predict with every worker node's model of the cluster's newest
    completed session and combine them: mean (average probabilities),
    majority (vote), weighted (by each model's validation accuracy) or
    ensemble (average, plus every node's predictions)."""
    check_features("neural_predict_distributed", "input_data", args.input_data)
    _cluster(ctx, args.cluster_id)
    return await asyncio.to_thread(_predict_distributed, ctx, args)


class ClusterOptimizeInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str
    optimization: Literal["memory_cleanup"] = "memory_cleanup"


class ClusterOptimizeResult(BaseModel):
    cluster_id: str
    optimization: str
    processes: list[MemoryCleanupReport]
    freed_bytes: int
    missing: dict[str, str]


@tool("neural_cluster_optimize", group="neural")
async def neural_cluster_optimize(
    ctx: ToolContext, args: ClusterOptimizeInput
) -> ClusterOptimizeResult:
    """Free memory in a cluster's worker processes. The only optimization,
    memory_cleanup, clears JAX's compiled-function caches and the cached data
    sets in the nexus-neural worker and every node's worker process, and
    reports each process's resident memory measured before and after."""
    cluster = _cluster(ctx, args.cluster_id, active=False)
    from app.neural import store

    nodes = await asyncio.to_thread(store.cluster_nodes, ctx.settings, cluster.id)
    queues = [NEURAL] + [n.task_queue for n in nodes]
    client = await ctx.client()
    report = await client.execute_workflow(
        "NeuralMaintenanceWorkflow",
        MemoryCleanupInput(queues=queues),
        id=f"neural-cleanup-{cluster.id}-{datetime.now(UTC).strftime('%Y%m%d%H%M%S%f')}",
        task_queue=ORCHESTRATION,
        result_type=MemoryCleanupResult,
    )
    # One report per process. The cleanups ran one after another, so a
    # process's memory before the first of its cleanups and after the last
    # one measure all that its cleanups freed.
    by_pid: dict[tuple[str, int], MemoryCleanupReport] = {}
    for process in report.processes:
        key = (process.hostname, process.pid)
        first = by_pid.get(key)
        if first is None:
            by_pid[key] = process.model_copy()
            continue
        first.task_queue = f"{first.task_queue}, {process.task_queue}"
        first.rss_after = process.rss_after
        first.compiled_trainers_cleared += process.compiled_trainers_cleared
        first.datasets_cleared += process.datasets_cleared
    processes = list(by_pid.values())
    return ClusterOptimizeResult(
        cluster_id=cluster.id,
        optimization=args.optimization,
        processes=processes,
        freed_bytes=sum(max(0, p.rss_before - p.rss_after) for p in processes),
        missing=report.missing,
    )


class ClusterTerminateInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cluster_id: str


class ClusterTerminateResult(BaseModel):
    cluster_id: str
    status: str
    nodes_terminated: int
    sessions_cancelled: list[str]


@tool("neural_cluster_terminate", group="neural")
async def neural_cluster_terminate(
    ctx: ToolContext, args: ClusterTerminateInput
) -> ClusterTerminateResult:
    """Terminate a cluster: cancel its running sessions, mark its nodes
    terminated (their embedded workers stop) and the cluster terminated."""
    from app.db import session_scope
    from app.neural import store
    from app.neural.models import NeuralCluster, NeuralNode

    cluster = _cluster(ctx, args.cluster_id, active=False)
    sessions = await asyncio.to_thread(store.cluster_sessions, ctx.settings, cluster.id)
    client = await ctx.client()
    cancelled: list[str] = []
    for session in sessions:
        if session.status != "running":
            continue
        # RPCError: the workflow already ended.
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(session.workflow_id).terminate(
                reason=f"cluster {cluster.id} terminated"
            )
        # Only a session still running is cancelled. One whose last activity
        # stored its models first stays completed, and that activity, when it
        # ends after this, keeps no model.
        if await asyncio.to_thread(
            store.end_session, ctx.settings, session.id, status="cancelled"
        ):
            cancelled.append(session.id)

    def mark() -> int:
        count = 0
        with session_scope(ctx.settings.effective_database_url) as db:
            row = db.get(NeuralCluster, cluster.id)
            if row is not None:
                row.status = "terminated"
                row.terminated_at = datetime.now(UTC)
                db.add(row)
            for node in store.cluster_nodes(ctx.settings, cluster.id):
                node_row = db.get(NeuralNode, node.id)
                if node_row is not None:
                    node_row.status = "terminated"
                    db.add(node_row)
                    count += 1
        return count

    count = await asyncio.to_thread(mark)
    return ClusterTerminateResult(
        cluster_id=cluster.id,
        status="terminated",
        nodes_terminated=count,
        sessions_cancelled=cancelled,
    )
