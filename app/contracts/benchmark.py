"""Inputs, results and progress of the extended-duration benchmark."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.contracts.types import UtcDateTime

PhaseName = Literal[
    "sandbox_integration",
    "multi_workflow_orchestration",
    "neural_training",
    "realtime_streaming",
    "cross_system_integration",
    "performance_scalability",
]

ALL_PHASES: tuple[PhaseName, ...] = (
    "sandbox_integration",
    "multi_workflow_orchestration",
    "neural_training",
    "realtime_streaming",
    "cross_system_integration",
    "performance_scalability",
)

PHASE_TITLES: dict[str, str] = {
    "sandbox_integration": "Sandbox integration",
    "multi_workflow_orchestration": "Multi-workflow orchestration",
    "neural_training": "Neural training",
    "realtime_streaming": "Realtime streaming load",
    "cross_system_integration": "Cross-system integration",
    "performance_scalability": "Performance and scalability",
}

# The error type of a run whose worker cannot write its reports folder. The
# run fails at its first step, before any cycle, and the CLI prints that it
# did not start.
REPORTS_FOLDER_ERROR = "ReportsFolderNotWritable"
# The error type of a run that starts while another benchmark run is open on
# its server or holds the database's benchmark claim. It fails at its first
# step, and the CLI prints that it did not start.
RUN_OPEN_ERROR = "BenchmarkRunOpen"


class BenchmarkConfig(BaseModel):
    """What one benchmark run does; every size is a real amount of work."""

    duration_seconds: float = Field(180.0, gt=0, le=7 * 24 * 3600)
    # Bounded like the duration, since the run never waits longer than that.
    # An unbounded value overflowed the workflow's timedelta, or was infinite
    # and could not be decoded, and the run could then never end.
    cycle_interval_seconds: float = Field(0.0, ge=0, le=7 * 24 * 3600)
    load_multiplier: int = Field(10, ge=1, le=100)
    streams: int = Field(5, ge=1, le=20)
    swarm_size: int = Field(3, ge=1, le=20)
    epochs: int = Field(3, ge=1, le=100)
    stream_events: int = Field(200, ge=1, le=100_000)
    concurrent_executions: int = Field(3, ge=1, le=50)
    baseline_operations: int = Field(10, ge=1, le=10_000)
    baseline_concurrency: int = Field(2, ge=1, le=100)
    sample_interval_seconds: float = Field(5.0, gt=0, le=3600)
    health_sample_seconds: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Seconds between the system_health readings that the "
        "performance phase takes while its loads run.",
    )
    max_cycles: int | None = Field(
        None, ge=1, description="Stop after this many cycles even if time remains."
    )
    phases: list[PhaseName] = Field(default_factory=lambda: list(ALL_PHASES))
    schedule_id: str | None = Field(
        None, description="Temporal Schedule that started the run, for comparisons."
    )
    inject_failure: list[PhaseName] = Field(
        default_factory=list,
        description="Fault injection for tests: these phases raise before working.",
    )
    inject_workflow_failure: list[PhaseName] = Field(
        default_factory=list,
        description="Fault injection for tests: the workflows of these phases "
        "fail before their activity runs.",
    )


class PhaseResult(BaseModel):
    phase: PhaseName
    cycle: int
    ok: bool
    error: str | None = None
    operations: int = 0
    succeeded: int = 0
    started_at: UtcDateTime
    ended_at: UtcDateTime
    metrics: dict[str, Any] = Field(default_factory=dict)
    carry: dict[str, Any] = Field(
        default_factory=dict, description="Outputs that later phases reuse."
    )


class CycleAggregate(BaseModel):
    cycle: int
    ok: bool
    phases: dict[str, bool]


class BenchmarkState(BaseModel):
    """Carried across continue-as-new: one run is a chain of cycles."""

    run_id: str
    config: BenchmarkConfig
    started_at: UtcDateTime | None = None
    cycle: int = 0
    cycles: list[CycleAggregate] = Field(default_factory=list)
    operations: int = 0
    succeeded: int = 0
    carry: dict[str, Any] = Field(
        default_factory=dict, description="Phase outputs later cycles reuse."
    )


class PhaseInput(BaseModel):
    run_id: str
    phase: PhaseName
    cycle: int
    config: BenchmarkConfig
    carry: dict[str, Any] = Field(default_factory=dict)


class PhaseTimes(BaseModel):
    started_at: UtcDateTime
    ended_at: UtcDateTime

    @property
    def seconds(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()


class BenchmarkProgress(BaseModel):
    """The result of the `progress` query. Times are workflow times, which a
    query reads as of the run's last workflow task, so `elapsed_seconds` stays
    still while a phase runs."""

    run_id: str
    cycle: int = Field(description="The cycle that the run works on, from 0.")
    phase: str | None
    completed: dict[str, bool] = Field(
        default_factory=dict, description="Outcome of each phase of this cycle."
    )
    elapsed_seconds: float
    duration_seconds: float
    finished: bool = False
    phase_started_at: UtcDateTime | None = Field(
        None, description="When the running phase started, or None between phases."
    )
    phase_times: dict[str, PhaseTimes] = Field(
        default_factory=dict,
        description="Start and end of each phase completed in this cycle.",
    )
    failed_cycles: dict[str, int] = Field(
        default_factory=dict,
        description="Per phase, the cycles of the run so far in which it failed.",
    )


class ReportRequest(BaseModel):
    run_id: str
    ended_at: UtcDateTime | None = None


class ReportResult(BaseModel):
    run_id: str
    report_dir: str
    markdown_path: str
    storage_prefix: str
    success_rate: float
    all_phases_passed: bool


class BenchmarkResult(BaseModel):
    run_id: str
    cycles: int
    report: ReportResult


class SamplerInput(BaseModel):
    run_id: str
    queues: list[str]
    interval_seconds: float
    samples_taken: int = 0


class WorkerSample(BaseModel):
    task_queue: str
    pid: int
    identity: str
    rss: int
    heap_used: int | None = Field(
        description="The malloc heap's in-use bytes: jemalloc's allocated bytes, "
        "or glibc's mallinfo2 in-use bytes."
    )
    python_heap_used: int | None = Field(
        None, description="Bytes in pymalloc's allocated blocks."
    )
    python_arenas: int | None = None


class SampleBatch(BaseModel):
    run_id: str
    taken_at: UtcDateTime
    samples: list[WorkerSample]
    missing: list[str] = Field(default_factory=list)


class LoadRequest(BaseModel):
    run_id: str
    cycle: int
    label: str
    operations: int = Field(ge=1)
    concurrency: int = Field(ge=1)


class LoadResult(BaseModel):
    label: str
    operations: int
    succeeded: int
    concurrency: int
    seconds: float
    throughput_per_second: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    errors: list[str] = Field(default_factory=list)


class OperationRecord(BaseModel):
    name: str
    ok: bool
    latency_ms: float
    error: str | None = None


class PhaseRecord(BaseModel):
    run_id: str
    result: PhaseResult
    operations: list[OperationRecord] = Field(default_factory=list)

    def with_failure_counted(self) -> PhaseRecord:
        """Return this record with one failed operation, named for the phase
        and carrying its error, when the phase failed without recording one.

        A phase can fail outside its counted calls (an activity timeout, a
        missing input from an earlier phase, an exception in the phase's own
        code), and without this operation it would show a 100% success rate.
        """
        result = self.result
        if result.ok or any(not operation.ok for operation in self.operations):
            return self
        failure = OperationRecord(
            name=result.phase, ok=False, latency_ms=0.0, error=result.error
        )
        return self.model_copy(
            update={
                "operations": [*self.operations, failure],
                "result": result.model_copy(
                    update={"operations": result.operations + 1}
                ),
            }
        )


class StartRunRequest(BaseModel):
    run_id: str
    config: BenchmarkConfig


class CancelRunRequest(BaseModel):
    run_id: str
    config: BenchmarkConfig
    ended_at: UtcDateTime


class LoadOperationInput(BaseModel):
    run_id: str
    cycle: int
    index: int
