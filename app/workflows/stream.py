"""The output stream of a workflow execution: its transitions, each a JSON
event in `execution_output` (see "Execution output" in docs/realtime.md).

The progress activity writes them in the transaction that records the
transitions, so the workflow itself does no I/O for them.
"""

from __future__ import annotations

import json
from typing import Any

from app.contracts.workflows import AuditEntry, ProgressRecord, StepState
from app.realtime.output import OutputChunk

# Characters of a step's output (as JSON) that its `step.completed` event
# carries; the rest is cut.
OUTPUT_SUMMARY_CHARS = 2000
_FINAL_EVENTS = ("execution.completed", "execution.failed", "execution.cancelled")


def progress_chunks(record: ProgressRecord) -> list[OutputChunk]:
    """Build one chunk per audit entry of `record`, in order.

    Step events have the stream label `step`, events of the whole execution
    `execution`. The chunk of the execution's end is final.
    """
    steps = {step.name: step for step in record.state.steps}
    chunks = []
    for entry in record.events:
        document = _event_document(entry, steps.get(entry.step or ""))
        chunks.append(
            OutputChunk(
                "step" if entry.step is not None else "execution",
                json.dumps(document, default=str),
                final=entry.event in _FINAL_EVENTS,
            )
        )
    return chunks


def _event_document(entry: AuditEntry, step: StepState | None) -> dict[str, Any]:
    document: dict[str, Any] = {"event": entry.event, "status": entry.status}
    if entry.step is not None:
        document["step"] = entry.step
    if entry.attempt is not None:
        document["attempt"] = entry.attempt
    document["at"] = entry.at.isoformat()
    for key, value in entry.details.items():
        document.setdefault(key, value)
    if entry.event == "step.completed" and step is not None:
        # The step's activity masked its output before it returned it.
        document["output_summary"] = summarize(step.output)
    return document


def summarize(output: dict[str, Any] | None) -> str:
    """Return `output` as JSON, cut after OUTPUT_SUMMARY_CHARS characters."""
    text = json.dumps(output if output is not None else {}, default=str)
    if len(text) <= OUTPUT_SUMMARY_CHARS:
        return text
    left = len(text) - OUTPUT_SUMMARY_CHARS
    return f"{text[:OUTPUT_SUMMARY_CHARS]}... [{left} more characters]"
