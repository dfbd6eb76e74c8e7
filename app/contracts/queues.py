"""Task queue names, one per kind of work (see the README's worker table)."""

ORCHESTRATION = "nexus-orchestration"
NEURAL = "nexus-neural"
SANDBOX = "nexus-sandbox"
STREAMING = "nexus-streaming"

ALL_QUEUES = (ORCHESTRATION, NEURAL, SANDBOX, STREAMING)

NEURAL_NODE_PREFIX = "nexus-neural-"


def neural_node_queue(node_id: str) -> str:
    """Return the task queue that one neural cluster node polls."""
    return f"{NEURAL_NODE_PREFIX}{node_id}"
