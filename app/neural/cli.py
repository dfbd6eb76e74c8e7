"""`nexus neural ...`: training, prediction and clusters through the tools."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from app.cli_group import NexusGroup
from app.neural.architectures import CLUSTER_ARCHITECTURES, TRAIN_ARCHITECTURES

neural_cli = typer.Typer(
    cls=NexusGroup, help="Neural networks and clusters.", no_args_is_help=True
)
cluster_cli = typer.Typer(cls=NexusGroup, help="Neural clusters.", no_args_is_help=True)
neural_cli.add_typer(cluster_cli, name="cluster")


def _call(name: str, arguments: dict[str, Any]) -> None:
    from app.cli import call_tool, print_json

    print_json(call_tool(name, arguments))


def _json(value: str, option: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        typer.echo(f"error: {option} is not valid JSON: {error}", err=True)
        raise typer.Exit(2) from None


def _dataset(value: str) -> Any:
    return _json(value, "--dataset") if value.lstrip().startswith("{") else value


@neural_cli.command("train")
def train_command(
    architecture: Annotated[
        str,
        typer.Option(help=f"{', '.join(TRAIN_ARCHITECTURES)}."),
    ] = "feedforward",
    dataset: Annotated[
        str, typer.Option(help="digits, iris, wine, breast_cancer or a JSON object.")
    ] = "digits",
    tier: Annotated[
        str, typer.Option(help="nano, mini, small, medium, large.")
    ] = "small",
    epochs: Annotated[int, typer.Option(help="Epochs to train.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 32,
    learning_rate: Annotated[
        float, typer.Option(help="Optimizer learning rate.")
    ] = 0.001,
    optimizer: Annotated[
        str, typer.Option(help="adam, sgd, rmsprop, adagrad.")
    ] = "adam",
    layers: Annotated[
        str, typer.Option(help="Layer widths as JSON, e.g. [128, 64].")
    ] = "[]",
) -> None:
    """Train a model and print the job's result."""
    _call(
        "neural_train",
        {
            "config": {
                "architecture": {
                    "type": architecture,
                    "layers": _json(layers, "--layers"),
                },
                "training": {
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "learning_rate": learning_rate,
                    "optimizer": optimizer,
                },
            },
            "dataset": _dataset(dataset),
            "tier": tier,
        },
    )


@neural_cli.command("predict")
def predict_command(
    model_id: Annotated[
        str, typer.Argument(help="Model id from `nexus neural models`.")
    ],
    input_json: Annotated[
        str, typer.Argument(help="One sample or a list of samples as JSON.")
    ],
) -> None:
    """Predict with a stored model."""
    _call("neural_predict", {"model_id": model_id, "input": _json(input_json, "INPUT")})


@neural_cli.command("status")
def status_command(
    job_id: Annotated[str, typer.Argument(help="Training job id.")],
) -> None:
    """Show a training job with its epochs."""
    _call("neural_training_status", {"job_id": job_id})


@neural_cli.command("models")
def models_command() -> None:
    """List stored models."""
    _call("neural_list_models", {})


@cluster_cli.command("init")
def cluster_init_command(
    name: Annotated[str, typer.Argument(help="Cluster name.")],
    topology: Annotated[
        str, typer.Option(help="mesh, ring, star, hierarchical.")
    ] = "mesh",
    architecture: Annotated[
        str, typer.Option(help=f"{', '.join(CLUSTER_ARCHITECTURES)}.")
    ] = "transformer",
    consensus: Annotated[
        str, typer.Option(help="proof-of-learning, byzantine, raft, gossip.")
    ] = "proof-of-learning",
    jit: Annotated[
        bool, typer.Option(help="XLA-compile training (wasmOptimization).")
    ] = True,
) -> None:
    """Create a cluster."""
    _call(
        "neural_cluster_init",
        {
            "name": name,
            "topology": topology,
            "architecture": architecture,
            "consensus": consensus,
            "wasmOptimization": jit,
        },
    )


@cluster_cli.command("deploy")
def cluster_deploy_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id (dnc_...).")],
    role: Annotated[
        str, typer.Option(help="worker, parameter_server, aggregator, validator.")
    ] = "worker",
    model: Annotated[str, typer.Option(help="base, large, xl, custom.")] = "base",
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layer widths of a custom model as JSON, e.g. [128, 64]; "
            "each at most 4096."
        ),
    ] = None,
) -> None:
    """Deploy a node."""
    arguments: dict[str, Any] = {"cluster_id": cluster_id, "role": role, "model": model}
    if layers is not None:
        arguments["layers"] = _json(layers, "--layers")
    _call("neural_node_deploy", arguments)


@cluster_cli.command("connect")
def cluster_connect_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id.")],
    topology: Annotated[
        str | None, typer.Option(help="Default: the cluster's.")
    ] = None,
) -> None:
    """Wire the cluster's nodes by topology."""
    arguments: dict[str, Any] = {"cluster_id": cluster_id}
    if topology:
        arguments["topology"] = topology
    _call("neural_cluster_connect", arguments)


@cluster_cli.command("train")
def cluster_train_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id.")],
    dataset: Annotated[
        str, typer.Option(help="Data set name or JSON object.")
    ] = "digits",
    epochs: Annotated[int, typer.Option(help="Total epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Samples per batch per node.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="Learning rate.")] = 0.001,
    optimizer: Annotated[
        str, typer.Option(help="adam, sgd, rmsprop, adagrad.")
    ] = "adam",
    federated: Annotated[
        bool, typer.Option(help="Federated averaging of weights.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the session to finish.")] = False,
) -> None:
    """Start distributed training."""
    _call(
        "neural_train_distributed",
        {
            "cluster_id": cluster_id,
            "dataset": _dataset(dataset),
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "optimizer": optimizer,
            "federated": federated,
            "wait": wait,
        },
    )


@cluster_cli.command("status")
def cluster_status_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id.")],
) -> None:
    """Show nodes, sessions and metrics."""
    _call("neural_cluster_status", {"cluster_id": cluster_id})


@cluster_cli.command("predict")
def cluster_predict_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id.")],
    input_json: Annotated[str, typer.Argument(help="Samples as JSON.")],
    aggregation: Annotated[
        str, typer.Option(help="mean, majority, weighted, ensemble.")
    ] = "mean",
) -> None:
    """Predict with the cluster's node models."""
    _call(
        "neural_predict_distributed",
        {
            "cluster_id": cluster_id,
            "input_data": _json(input_json, "INPUT"),
            "aggregation": aggregation,
        },
    )


@cluster_cli.command("optimize")
def cluster_optimize_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id.")],
) -> None:
    """Free training caches and report memory measured before and after."""
    _call(
        "neural_cluster_optimize",
        {"cluster_id": cluster_id, "optimization": "memory_cleanup"},
    )


@cluster_cli.command("terminate")
def cluster_terminate_command(
    cluster_id: Annotated[str, typer.Argument(help="Cluster id.")],
) -> None:
    """Terminate the cluster."""
    _call("neural_cluster_terminate", {"cluster_id": cluster_id})
