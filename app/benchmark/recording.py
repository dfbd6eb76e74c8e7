"""Database writes and reads of benchmark runs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select

from app.benchmark.models import (
    BenchmarkClaim,
    BenchmarkOperation,
    BenchmarkPhase,
    BenchmarkRun,
    BenchmarkSample,
)
from app.contracts.benchmark import BenchmarkConfig, PhaseRecord, SampleBatch
from app.db import get_engine, session_scope

# The claim slot of benchmark runs. One slot for every run that records to a
# database, because a run on any server would load the same database.
RUN_SLOT = "benchmark"


def start_run(url: str, run_id: str, config: BenchmarkConfig) -> None:
    """Record a run's start; a retried or continued run keeps its first row."""
    with session_scope(url) as session:
        if session.get(BenchmarkRun, run_id) is None:
            session.add(
                BenchmarkRun(
                    run_id=run_id,
                    schedule_id=config.schedule_id,
                    config=config.model_dump(mode="json"),
                )
            )


def end_run(url: str, run_id: str, ended_at: datetime) -> None:
    """Record that the run's cycles have ended. The status is `ended` until
    its report is written, so a run whose report failed is not taken as the
    previous run to compare with."""
    with session_scope(url) as session:
        run = session.get(BenchmarkRun, run_id)
        if run is None:
            raise LookupError(f"benchmark run {run_id!r} not found")
        run.status = "ended"
        run.ended_at = ended_at
        session.add(run)


# The key of a run's summary that records how its workflow closed, when it
# closed in none of its own ways. The run's report shows it, and the run
# stays `ended`.
WORKFLOW_CLOSED = "workflow_closed"


def end_orphaned_run(url: str, run_id: str, ended_at: datetime, how: str) -> bool:
    """Record as `ended` a run whose workflow closed in none of its own ways
    (`how`: terminated, failed, timed out), and release its claim. Return
    whether the run's row still had the status `running`, so that a later report can be
    written from its recorded cycles."""
    with session_scope(url) as session:
        run = session.get(BenchmarkRun, run_id)
        _release(session.connection(), run_id)
        if run is None or run.status != "running":
            return False
        run.status = "ended"
        run.ended_at = ended_at
        run.summary = {WORKFLOW_CLOSED: how}
        session.add(run)
        return True


def complete_run(url: str, run_id: str, summary: dict[str, Any]) -> None:
    """Record the run as completed with the summary of its written report,
    and release its claim."""
    with session_scope(url) as session:
        run = session.get(BenchmarkRun, run_id)
        if run is None:
            raise LookupError(f"benchmark run {run_id!r} not found")
        run.status = "completed"
        run.summary = summary
        session.add(run)
        _release(session.connection(), run_id)


def cancel_run(
    url: str, run_id: str, config: BenchmarkConfig, ended_at: datetime
) -> None:
    """Record a cancelled run and release its claim. The row is created when
    missing, because the cancellation may have stopped the run before its
    start was recorded."""
    with session_scope(url) as session:
        run = session.get(BenchmarkRun, run_id)
        if run is None:
            run = BenchmarkRun(
                run_id=run_id,
                schedule_id=config.schedule_id,
                config=config.model_dump(mode="json"),
            )
        run.status = "cancelled"
        run.ended_at = ended_at
        session.add(run)
        _release(session.connection(), run_id)


def claim_slot(url: str, run_id: str, slot: str = RUN_SLOT) -> str:
    """Claim `slot` for run `run_id` and return the run that holds it.

    The result is `run_id` when this call claimed the slot, or when the run
    held it already, as a retried or continued run does. Otherwise it is the
    holder's id, and the slot is left as it was.
    """
    with get_engine(url).begin() as connection:
        # On PostgreSQL a holder can release between the conflict and the
        # read, so the insert is tried again.
        for _ in range(3):
            inserted = connection.execute(
                _insert_claim(connection, slot, run_id).on_conflict_do_nothing()
            )
            if inserted.rowcount == 1:
                return run_id
            holder = connection.execute(
                select(BenchmarkClaim.run_id).where(BenchmarkClaim.slot == slot)
            ).scalar_one_or_none()
            if holder is not None:
                return holder
    raise RuntimeError(
        f"benchmark run {run_id} could not claim slot {slot!r}: its holder "
        "released it and another run claimed it again, three times"
    )


def _insert_claim(
    connection: Connection, slot: str, run_id: str
) -> postgresql.Insert | sqlite.Insert:
    values = {"slot": slot, "run_id": run_id, "claimed_at": datetime.now(UTC)}
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(BenchmarkClaim).values(values)
    if dialect == "sqlite":
        return sqlite.insert(BenchmarkClaim).values(values)
    raise NotImplementedError(f"claims need SQLite or PostgreSQL, not {dialect}")


def take_over_slot(
    url: str, run_id: str, stale_holder: str, slot: str = RUN_SLOT
) -> bool:
    """Move `slot` from `stale_holder` to run `run_id`; return whether it moved.

    It moves only while `stale_holder` still holds it, so of several runs
    that take over the same stale claim, one gets it.
    """
    with get_engine(url).begin() as connection:
        moved = connection.execute(
            update(BenchmarkClaim)
            .where(col(BenchmarkClaim.slot) == slot)
            .where(col(BenchmarkClaim.run_id) == stale_holder)
            .values(run_id=run_id, claimed_at=datetime.now(UTC))
        )
        return moved.rowcount == 1


def release_slot(url: str, run_id: str) -> bool:
    """Release every slot that run `run_id` holds; return whether it held one."""
    with get_engine(url).begin() as connection:
        return _release(connection, run_id)


def _release(connection: Connection, run_id: str) -> bool:
    released = connection.execute(
        delete(BenchmarkClaim).where(col(BenchmarkClaim.run_id) == run_id)
    )
    return released.rowcount > 0


def slot_holder(url: str, slot: str = RUN_SLOT) -> str | None:
    """Return the id of the run that holds `slot`, or None when it is free."""
    with session_scope(url) as session:
        claim = session.get(BenchmarkClaim, slot)
        return None if claim is None else claim.run_id


def run_status(url: str, run_id: str) -> str:
    """Return the recorded status of a run: `running`, `ended` (its report
    is not written yet), `completed` or `cancelled`.

    Raises:
        LookupError: no run has that id.
    """
    with session_scope(url) as session:
        run = session.get(BenchmarkRun, run_id)
        if run is None:
            raise LookupError(_not_found(run_id))
        return run.status


class RecentRun(NamedTuple):
    run_id: str
    status: str
    started_at: datetime


def recent_runs(url: str, limit: int = 5) -> list[RecentRun]:
    """Return the `limit` runs that started last, newest first."""
    with session_scope(url) as session:
        runs = session.exec(
            select(BenchmarkRun)
            .order_by(col(BenchmarkRun.started_at).desc())
            .limit(limit)
        ).all()
        return [RecentRun(r.run_id, r.status, as_utc(r.started_at)) for r in runs]


def record_phase(url: str, record: PhaseRecord) -> None:
    """Record a phase and its operations. A failed phase gets a failed
    operation when it has none, also for records that a workflow built after
    the phase's activity failed."""
    record = record.with_failure_counted()
    result = record.result
    with session_scope(url) as session:
        session.add(
            BenchmarkPhase(
                run_id=record.run_id,
                cycle=result.cycle,
                phase=result.phase,
                ok=result.ok,
                error=result.error,
                operations=result.operations,
                succeeded=result.succeeded,
                started_at=result.started_at,
                ended_at=result.ended_at,
                metrics=result.metrics,
            )
        )
        for operation in record.operations:
            session.add(
                BenchmarkOperation(
                    run_id=record.run_id,
                    cycle=result.cycle,
                    phase=result.phase,
                    name=operation.name,
                    ok=operation.ok,
                    latency_ms=operation.latency_ms,
                    error=operation.error,
                )
            )


def record_samples(url: str, batch: SampleBatch) -> int:
    with session_scope(url) as session:
        for sample in batch.samples:
            session.add(
                BenchmarkSample(
                    run_id=batch.run_id,
                    taken_at=batch.taken_at,
                    task_queue=sample.task_queue,
                    pid=sample.pid,
                    identity=sample.identity,
                    rss=sample.rss,
                    heap_used=sample.heap_used,
                    python_heap_used=sample.python_heap_used,
                    python_arenas=sample.python_arenas,
                )
            )
    return len(batch.samples)


def load_run(url: str, run_id: str) -> dict[str, Any]:
    """Read everything recorded for one run, for the report."""
    with session_scope(url) as session:
        run = session.get(BenchmarkRun, run_id)
        if run is None:
            raise LookupError(_not_found(run_id))
        phases = session.exec(
            select(BenchmarkPhase)
            .where(BenchmarkPhase.run_id == run_id)
            .order_by(col(BenchmarkPhase.cycle), col(BenchmarkPhase.id))
        ).all()
        operations = session.exec(
            select(BenchmarkOperation)
            .where(BenchmarkOperation.run_id == run_id)
            .order_by(col(BenchmarkOperation.id))
        ).all()
        samples = session.exec(
            select(BenchmarkSample)
            .where(BenchmarkSample.run_id == run_id)
            .order_by(col(BenchmarkSample.taken_at))
        ).all()
        previous_query = (
            select(BenchmarkRun)
            .where(BenchmarkRun.status == "completed")
            .where(BenchmarkRun.run_id != run_id)
            .where(col(BenchmarkRun.started_at) < as_utc(run.started_at))
            .order_by(col(BenchmarkRun.started_at).desc())
            .limit(1)
        )
        if run.schedule_id:
            previous_query = previous_query.where(
                BenchmarkRun.schedule_id == run.schedule_id
            )
        previous = session.exec(previous_query).first()
        return {
            "run": run,
            "phases": list(phases),
            "operations": list(operations),
            "samples": list(samples),
            "previous": previous,
        }


def _not_found(run_id: str) -> str:
    return f"benchmark run {run_id!r} not found"


def as_utc(value: datetime) -> datetime:
    """Return `value` with UTC attached; SQLite returns naive datetimes."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
