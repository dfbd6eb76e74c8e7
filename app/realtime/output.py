"""Output streams of sandboxes and workflow executions, delivered through
realtime: producers append chunks to `execution_output`, whose changes
subscribers read like any other table's."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.db import get_engine

logger = logging.getLogger(__name__)

StreamKind = Literal["sandbox", "workflow"]
STREAM_KINDS = ("sandbox", "workflow")


def append_output(
    url: str,
    stream_kind: str,
    stream_id: str,
    text_chunk: str,
    *,
    stream: str = "stdout",
    final: bool = False,
) -> int:
    """Append one chunk of output and return its id.

    Args:
        stream_kind: "sandbox" or "workflow".
        stream_id: the sandbox id, or the workflow id of the execution.
        text_chunk: the output, as produced.
        stream: "stdout", "stderr" or another label the producer chooses.
        final: True on the last chunk, so subscribers know the run ended.

    Raises:
        ValueError: an unknown stream kind or an empty stream id.
    """
    if stream_kind not in STREAM_KINDS:
        raise ValueError(
            f"invalid stream kind {stream_kind!r}; use one of {', '.join(STREAM_KINDS)}"
        )
    if not stream_id:
        raise ValueError("stream_id is empty; pass the sandbox id or workflow id")
    with get_engine(url).begin() as connection:
        result = connection.execute(
            text(
                "INSERT INTO execution_output (stream_kind, stream_id, stream, text, "
                "final, created_at) VALUES (:kind, :sid, :stream, :text, :final, :now) "
                "RETURNING id"
            ),
            {
                "kind": stream_kind,
                "sid": stream_id,
                "stream": stream,
                "text": text_chunk,
                "final": final,
                "now": datetime.now(UTC),
            },
        )
        return int(result.scalar_one())


def output_status(url: str, stream_kind: str, stream_id: str) -> dict[str, Any]:
    """Summarize one stream: chunks, characters, whether it ended, last time."""
    with get_engine(url).connect() as connection:
        row = connection.execute(
            text(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(text)), 0), MAX(created_at), "
                "MAX(CASE WHEN final THEN 1 ELSE 0 END) FROM execution_output "
                "WHERE stream_kind = :kind AND stream_id = :sid"
            ),
            {"kind": stream_kind, "sid": stream_id},
        ).one()
        tail = connection.execute(
            text(
                "SELECT text FROM execution_output WHERE stream_kind = :kind AND "
                "stream_id = :sid ORDER BY id DESC LIMIT 1"
            ),
            {"kind": stream_kind, "sid": stream_id},
        ).scalar()
    last = row[2]
    return {
        "chunks": int(row[0]),
        "characters": int(row[1]),
        "finished": bool(row[3]),
        "last_output_at": last.isoformat() if isinstance(last, datetime) else last,
        "last_chunk": tail,
    }


# Tables that record each kind of run: sandboxes by `sandbox_create`, workflow
# executions by `workflow_execute` (the id is the execution id).
_RUN_TABLES = {"sandbox": "sandboxes", "workflow": "workflow_executions"}


def stream_target_exists(url: str, stream_kind: str, stream_id: str) -> bool:
    """Return whether the sandbox or workflow execution exists or has output.

    A run counts as existing if its table contains it or if any chunk of its
    output was appended, so output of a run recorded elsewhere still counts.
    """
    with get_engine(url).connect() as connection:
        chunk = connection.execute(
            text(
                "SELECT 1 FROM execution_output WHERE stream_kind = :kind AND "
                "stream_id = :sid LIMIT 1"
            ),
            {"kind": stream_kind, "sid": stream_id},
        ).first()
    if chunk is not None:
        return True
    table = _RUN_TABLES[stream_kind]
    try:
        with get_engine(url).connect() as connection:
            row = connection.execute(
                text(f"SELECT 1 FROM {table} WHERE id = :id"), {"id": stream_id}
            ).first()
    except DBAPIError:
        # The capability that owns the table is not installed.
        logger.warning("no %s table to look up %s %r", table, stream_kind, stream_id)
        return False
    return row is not None
