"""The word for the close of a workflow that ended without a result, from
the failure that waiting on it raised."""

from __future__ import annotations

from temporalio.exceptions import CancelledError, TerminatedError
from temporalio.exceptions import TimeoutError as WorkflowTimeoutError


def workflow_ending(cause: BaseException | None) -> str:
    """Return "terminated", "timed out", "cancelled" or "failed: <cause>".

    Args:
        cause: the cause of the `ChildWorkflowError` that a child handle
            raised, or of the `WorkflowFailureError` of a client's handle.
    """
    if isinstance(cause, TerminatedError):
        return "terminated"
    if isinstance(cause, WorkflowTimeoutError):
        return "timed out"
    if isinstance(cause, CancelledError):
        return "cancelled"
    return f"failed: {cause}"
