"""Reads and writes of the `sandboxes` mirror table."""

from __future__ import annotations

from sqlmodel import col, select

from app.contracts.sandbox import RecordInput
from app.db import session_scope
from app.db.models import utc_now
from app.sandbox.models import SandboxRecord


def record(database_url: str, change: RecordInput) -> None:
    """Insert or update the row of `change.spec.sandbox_id`, or delete it."""
    spec = change.spec
    with session_scope(database_url) as session:
        row = session.get(SandboxRecord, spec.sandbox_id)
        if change.delete:
            if row is not None:
                session.delete(row)
            return
        if row is None:
            row = SandboxRecord(
                id=spec.sandbox_id,
                template=spec.template,
                status=change.status,
                backend=change.backend,
                timeout=spec.timeout,
            )
        row.name = spec.name
        row.status = change.status
        row.backend = change.backend
        row.backend_id = change.backend_id or row.backend_id
        row.timeout = spec.timeout
        row.recreated = change.recreated
        row.env_var_names = spec.env_names
        row.sandbox_metadata = dict(spec.metadata)
        row.updated_at = utc_now()
        session.add(row)


def list_records(database_url: str, status: str = "all") -> list[SandboxRecord]:
    """Return mirrored sandboxes, newest first; `status` running|stopped|all."""
    with session_scope(database_url) as session:
        query = select(SandboxRecord).order_by(col(SandboxRecord.created_at).desc())
        if status == "running":
            query = query.where(col(SandboxRecord.status).in_(["running", "creating"]))
        elif status == "stopped":
            query = query.where(col(SandboxRecord.status).in_(["stopped", "failed"]))
        return list(session.exec(query).all())


def get_record(database_url: str, sandbox_id: str) -> SandboxRecord | None:
    with session_scope(database_url) as session:
        row = session.get(SandboxRecord, sandbox_id)
        if row is not None:
            session.expunge(row)
        return row


def has_record(database_url: str, sandbox_id: str) -> bool:
    with session_scope(database_url) as session:
        return session.get(SandboxRecord, sandbox_id) is not None


def delete_record(database_url: str, sandbox_id: str) -> None:
    with session_scope(database_url) as session:
        row = session.get(SandboxRecord, sandbox_id)
        if row is not None:
            session.delete(row)
