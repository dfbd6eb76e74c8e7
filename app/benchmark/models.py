"""Tables of benchmark runs: phases, operations, worker samples, test events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index
from sqlmodel import Field, SQLModel

from app.db.models import utc_now


class BenchmarkRun(SQLModel, table=True):
    __tablename__ = "benchmark_runs"

    run_id: str = Field(primary_key=True, max_length=200)
    schedule_id: str | None = Field(default=None, max_length=200, index=True)
    status: str = Field(default="running", max_length=20)
    started_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
    ended_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class BenchmarkPhase(SQLModel, table=True):
    __tablename__ = "benchmark_phases"
    __table_args__ = (Index("ix_benchmark_phases_run", "run_id", "cycle"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=200)
    cycle: int
    phase: str = Field(max_length=50)
    ok: bool
    error: str | None = None
    operations: int
    succeeded: int
    started_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    ended_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class BenchmarkOperation(SQLModel, table=True):
    """One counted operation of a phase; success rates come from these rows."""

    __tablename__ = "benchmark_operations"
    __table_args__ = (Index("ix_benchmark_operations_run", "run_id", "phase"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=200)
    cycle: int
    phase: str = Field(max_length=50)
    name: str = Field(max_length=100)
    ok: bool
    latency_ms: float
    error: str | None = None
    recorded_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )


class BenchmarkSample(SQLModel, table=True):
    """Memory of one worker process at one moment."""

    __tablename__ = "benchmark_samples"
    __table_args__ = (Index("ix_benchmark_samples_run", "run_id", "taken_at"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=200)
    taken_at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    task_queue: str = Field(max_length=200)
    pid: int
    identity: str = Field(max_length=300)
    rss: int
    heap_used: int | None = Field(
        default=None, description="glibc malloc's in-use bytes."
    )
    python_heap_used: int | None = Field(
        default=None, description="Bytes in pymalloc's allocated blocks."
    )
    python_arenas: int | None = None


class ExtendedDurationTestEvent(SQLModel, table=True):
    """Rows the realtime streaming phase inserts and subscribes to."""

    __tablename__ = "extended_duration_test_events"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=200, index=True)
    cycle: int
    test_phase: str = Field(max_length=20)
    sequence: int
    sent_at: float = Field(description="Unix time in seconds when inserted.")
    payload: str = ""


class BenchmarkClaim(SQLModel, table=True):
    """The run that holds a slot. The primary key lets one run at a time hold
    the slot, whatever the lag of Temporal's visibility store."""

    __tablename__ = "benchmark_claims"

    slot: str = Field(primary_key=True, max_length=50)
    run_id: str = Field(max_length=200)
    claimed_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True))
    )
