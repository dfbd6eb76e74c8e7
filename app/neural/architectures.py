"""The architectures that training jobs and clusters accept, in a module
without imports so that the CLI can list them without loading the tools."""

from __future__ import annotations

TRAIN_ARCHITECTURES = (
    "feedforward",
    "cnn",
    "lstm",
    "rnn",
    "transformer",
    "autoencoder",
    "hybrid",
    "gnn",
)
# A cluster's architecture and the model architecture its nodes train.
CLUSTER_ARCHITECTURES = {
    "transformer": "transformer",
    "cnn": "cnn",
    "rnn": "lstm",
    "gnn": "gnn",
    "hybrid": "hybrid",
    "feedforward": "feedforward",
}
