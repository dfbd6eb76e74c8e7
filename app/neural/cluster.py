"""Cluster wiring by topology and the plan of a distributed session."""

from __future__ import annotations

from app.neural.models import NeuralNode

TOPOLOGIES = ("mesh", "ring", "star", "hierarchical")


def wire(
    nodes: list[NeuralNode], topology: str
) -> dict[str, tuple[str | None, list[str]]]:
    """Return each node's parent and connections under `topology`.

    Nodes are in wiring order (parameter server first). `mesh` joins every
    pair, `ring` joins node i to i+1 mod n, `star` joins every node to node
    0, and `hierarchical` is a binary tree where the parent of node i is
    node (i-1)//2.

    Raises:
        ValueError: an unknown topology.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(
            f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}"
        )
    ids = [node.id for node in nodes]
    count = len(ids)
    wiring: dict[str, tuple[str | None, list[str]]] = {}
    for i, node_id in enumerate(ids):
        parent: str | None = None
        if topology == "mesh":
            links = [other for other in ids if other != node_id]
        elif topology == "ring":
            links = sorted({ids[(i + 1) % count], ids[(i - 1) % count]} - {node_id})
        elif topology == "star":
            links = [ids[0]] if i > 0 else ids[1:]
            parent = ids[0] if i > 0 else None
        else:
            parent = ids[(i - 1) // 2] if i > 0 else None
            children = [ids[c] for c in (2 * i + 1, 2 * i + 2) if c < count]
            links = ([parent] if parent else []) + children
        wiring[node_id] = (parent, links)
    return wiring


def reducer_of(
    node: NeuralNode, by_id: dict[str, NeuralNode]
) -> tuple[str | None, int]:
    """The nearest ancestor that aggregates (an aggregator or the parameter
    server), and the node's depth in the tree."""
    depth = 0
    parent_id = node.parent_id
    reducer: str | None = None
    seen = {node.id}
    while parent_id and parent_id in by_id and parent_id not in seen:
        seen.add(parent_id)
        depth += 1
        parent = by_id[parent_id]
        if reducer is None and parent.role in ("aggregator", "parameter_server"):
            reducer = parent.id
        parent_id = parent.parent_id
    return reducer, depth
