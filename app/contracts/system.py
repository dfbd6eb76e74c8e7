"""Health, worker probe and audit models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.contracts.types import UtcDateTime

Status = Literal["healthy", "degraded", "unhealthy"]


class DatabaseHealth(BaseModel):
    status: Status
    backend: str
    url: str = Field(description="Database URL with the password masked.")
    latency_ms: float | None = None
    revision: list[str] = Field(
        default_factory=list, description="Applied migration heads."
    )
    error: str | None = None


class TemporalHealth(BaseModel):
    status: Status
    address: str
    namespace: str
    namespace_state: str | None = None
    server_version: str | None = None
    latency_ms: float | None = None
    error: str | None = None


class Poller(BaseModel):
    identity: str
    last_access_time: UtcDateTime | None = None
    # True when the last poll is older than the health check's threshold,
    # or when the poller's process on this host is gone.
    stale: bool = False
    # True when the identity names a process of this host that has exited.
    process_exited: bool = False


class QueueHealth(BaseModel):
    status: Status
    workflow_pollers: list[Poller] = Field(default_factory=list)
    activity_pollers: list[Poller] = Field(default_factory=list)
    error: str | None = None


class MemoryStats(BaseModel):
    """Memory of the process that answered, in bytes.

    `heapTotal` and `heapUsed` keep the Flow Nexus field names; here they are
    the malloc heap of this process. Under jemalloc (a worker setting)
    they are its active and allocated bytes, which with `PYTHONMALLOC=malloc`
    include every Python object. Under glibc they are what `mallinfo2`
    reports: C allocations and Python objects over 512 bytes, but not
    pymalloc's arenas, which hold the smaller Python objects. They are None
    where neither is available. The `python_*` fields are pymalloc's own
    figures, None where pymalloc is off.
    """

    model_config = ConfigDict(populate_by_name=True)

    rss: int
    vms: int
    heap_total: int | None = Field(None, alias="heapTotal")
    heap_used: int | None = Field(None, alias="heapUsed")
    python_heap_used: int | None = Field(
        None,
        description="Bytes in pymalloc's allocated blocks, or None where pymalloc "
        "is off or its statistics cannot be read.",
    )
    python_arenas: int | None = Field(
        None, description="pymalloc arenas currently mapped."
    )
    python_allocated_blocks: int


class HealthReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    status: Status
    database: DatabaseHealth
    temporal: TemporalHealth
    workers: dict[str, QueueHealth]
    components: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Checks that capabilities add, such as sandbox isolation.",
    )
    timestamp: UtcDateTime
    uptime: float = Field(description="Seconds since this process started.")
    memory: MemoryStats
    version: str
    age_seconds: float = Field(
        0.0,
        description="Seconds between reading these figures and returning them: "
        "0 for a live reading, up to NEXUS_API_HEALTH_MAX_AGE_SECONDS when the "
        "HTTP server returns a recent reading again.",
    )


class WorkerProbe(BaseModel):
    """What one worker process reports about itself when asked on its queue."""

    task_queue: str
    identity: str
    pid: int
    hostname: str
    rss: int
    heap_used: int | None = Field(None, description="glibc malloc's in-use bytes.")
    python_heap_used: int | None = Field(
        None, description="Bytes in pymalloc's allocated blocks."
    )
    python_arenas: int | None = None
    uptime: float


class ProbeRequest(BaseModel):
    queues: list[str]
    timeout_seconds: float = Field(10.0, gt=0)


class ProbeReport(BaseModel):
    probes: list[WorkerProbe]
    missing: dict[str, str] = Field(
        default_factory=dict, description="Queue name to the error of its probe."
    )


class AuditRecord(BaseModel):
    id: int
    created_at: UtcDateTime
    user_id: str
    key_id: str | None = None
    tool: str
    arguments: dict[str, Any]
    outcome: Literal["success", "error"]
    error: str | None = None
    duration_ms: float
    ids: dict[str, str] = Field(default_factory=dict)
