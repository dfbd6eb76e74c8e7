"""Models that cross the Temporal boundary for sandbox sessions.

Secret values travel only as sealed strings (AES-GCM ciphertext made by
`app.sandbox.secrets.seal`); a workflow never sees a plain env var value.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_core import to_json

from app.contracts.types import UtcDateTime

Template = Literal[
    "base", "python", "node", "claude-code", "react", "nextjs", "vanilla"
]
Language = Literal["python", "javascript", "bash"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_names(value: dict[str, str] | None) -> dict[str, str] | None:
    """Return `value`; raise for a name that a program's environment cannot
    take, for pydantic validators of env var mappings."""
    for name in value or {}:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(
                f"env var name {name!r} is invalid; use letters, digits and _ "
                "and do not start with a digit"
            )
    return value


# Linux's MAX_ARG_STRLEN: the most bytes of one environment string, its NUL
# terminator included.
ENV_STRING_LIMIT = 131072


def check_env_values(value: dict[str, str] | None) -> dict[str, str] | None:
    """Return `value`; raise for a value that no program's environment can
    take, so that it fails where it is given rather than at every run. A
    value sealed already, or one that refers to `{{...}}` and is filled in
    when the step runs, is checked then."""
    for name, text in (value or {}).items():
        if not isinstance(text, str) or text.startswith("sealed:") or "{{" in text:
            continue
        problem = env_value_problem(name, text)
        if problem is not None:
            raise ValueError(problem)
    return value


def env_value_problem(name: str, value: str) -> str | None:
    """Return why env var `name` cannot take `value`, or None."""
    if "\0" in value:
        # No process environment can carry a NUL byte.
        return (
            f"env var {name!r} is invalid: its value contains a NUL byte, which "
            "an environment variable cannot contain; remove it"
        )
    size = len(f"{name}={value}".encode()) + 1
    if size > ENV_STRING_LIMIT:
        # Every later exec of the sandbox would fail with E2BIG.
        return (
            f"env var {name!r} is invalid: NAME=value takes {size} bytes, over "
            f"Linux's limit of {ENV_STRING_LIMIT} bytes for one environment "
            "string; upload a long value as a file with sandbox_upload and read "
            "it from there"
        )
    return None


# Temporal's default limit on one payload (its blob size limit), in bytes. A
# workflow task whose command carries a larger one fails on every retry.
PAYLOAD_LIMIT = 2 * 1024 * 1024
# Shares of that limit, by JSON-encoded size. A call's input is recorded
# beside the sandbox's spec, and the session's state carries the spec, its
# kept log lines and its events, so each sum stays under PAYLOAD_LIMIT.
SPEC_LIMIT = 512 * 1024
CALL_INPUT_LIMIT = 1024 * 1024
RESULT_OUTPUT_LIMIT = 1024 * 1024
LOG_BYTES_KEPT = 512 * 1024
STATE_LIMIT = 1536 * 1024
# The marker that ends a stream cut at the output limit or to fit a result.
CUT_MARKER = re.compile(r"\n\[output truncated: (\d+) bytes dropped\]\Z")


def encoded_size(value: object) -> int:
    """Return the bytes that `value` takes in a Temporal payload: its JSON
    encoding, where a control character takes 6 bytes and a CJK one 3."""
    return len(to_json(value))


def fit_encoded(text: str, limit: int) -> str:
    """Return the longest start of `text` whose JSON encoding, quotes
    included, takes at most `limit` bytes."""
    if encoded_size(text) <= limit:
        return text
    low, high = 0, min(len(text), limit)
    while low < high:
        middle = (low + high + 1) // 2
        if encoded_size(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def payload_size_problem(field: str, value: object, limit: int) -> str | None:
    """Return why `value` is too large for `field`, or None."""
    size = encoded_size(value)
    if size <= limit:
        return None
    return (
        f"{field} is too large: it takes {size} bytes encoded as JSON, over the "
        f"limit of {limit} bytes that keeps each sandbox call within Temporal's "
        f"{PAYLOAD_LIMIT}-byte payload limit; send less, or upload large data in "
        "smaller files"
    )


ExecutionStatus = Literal["completed", "failed", "timed_out"]
SessionStatus = Literal["creating", "running", "failed", "stopped", "deleted"]

TEMPLATES: tuple[str, ...] = (
    "base",
    "python",
    "node",
    "claude-code",
    "react",
    "nextjs",
    "vanilla",
)
NODE_TEMPLATES = frozenset({"node", "react", "nextjs", "vanilla"})

# Error types that sandbox activities raise, so the session workflow can tell
# a lost sandbox (recreate it) from a configuration error (give up).
LOST_ERROR = "SandboxLost"
RETRY_LATER_ERROR = "SandboxRetryLater"
CONFIGURATION_ERROR = "SandboxConfigurationError"
INVALID_ERROR = "SandboxInvalidArgument"
# An installer or setup command of the caller's failed in the sandbox.
SETUP_ERROR = "SandboxSetupFailed"
# The backend failed to carry out a valid request (a file it could not remove).
BACKEND_ERROR = "SandboxBackendFailure"
# An execution that the session's `interrupt` signal cut short.
INTERRUPTED_ERROR = "SandboxCallInterrupted"
# A call that a stop or delete of its sandbox ended or turned away.
ENDED_ERROR = "SandboxEnded"
# A backend call that got no response within its timeout.
TIMED_OUT_ERROR = "SandboxCallTimedOut"


class SandboxSpec(BaseModel):
    """The recorded configuration of a sandbox session, enough to recreate it.

    Attributes:
        sealed_env: env var name to its sealed value; names are plain text.
        setup_commands: shell commands applied after the packages on every
            (re)creation: the startup script, then `run_commands` of
            `sandbox_configure` in call order.
    """

    sandbox_id: str
    name: str | None = None
    template: Template
    timeout: int = Field(gt=0, description="Lifetime in seconds since the last call.")
    sealed_env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    install_packages: list[str] = Field(default_factory=list)
    startup_script: str | None = None
    setup_commands: list[str] = Field(default_factory=list)

    @property
    def env_names(self) -> list[str]:
        return sorted(self.sealed_env)


class SessionEvent(BaseModel):
    """One lifecycle event of a session (created, recreated, configured, ...)."""

    kind: str
    at: UtcDateTime
    backend_id: str | None = None
    detail: str | None = None
    count: int | None = None


class SessionState(BaseModel):
    """All state of one `SandboxSessionWorkflow`, carried across continue-as-new."""

    spec: SandboxSpec
    status: SessionStatus = "creating"
    backend: str = "local"
    backend_id: str | None = None
    generation: int = 0
    recreated: int = 0
    created_at: UtcDateTime | None = None
    error: str | None = None
    events: list[SessionEvent] = Field(default_factory=list)
    log_lines: list[str] = Field(default_factory=list)
    end_request: Literal["stop", "delete"] | None = None
    max_recreations: int = Field(3, ge=0, description="Recreations allowed per call.")
    local_calls: bool = Field(
        False,
        description="Run execute, upload and describe as local activities "
        "(local backend: the runner is reachable from any worker on the machine).",
    )


class SessionInput(BaseModel):
    state: SessionState


class SessionResult(BaseModel):
    sandbox_id: str
    status: SessionStatus
    recreated: int
    error: str | None = None


class SessionInfo(BaseModel):
    """What the `ready` update and the `info` query return."""

    sandbox_id: str
    name: str | None
    template: str
    status: SessionStatus
    backend: str
    backend_id: str | None
    env_vars_configured: list[str]
    timeout: int
    metadata: dict[str, str]
    install_packages: list[str]
    recreated: int
    created_at: UtcDateTime | None
    error: str | None
    events: list[SessionEvent]


class ExecuteRequest(BaseModel):
    code: str
    language: Language = "python"
    sealed_env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    timeout: float = Field(60, gt=0)
    capture_output: bool = True
    call_id: str | None = Field(
        None,
        description=(
            "The caller's id for this call. With one, the sandbox counts the "
            "starts of the program for it, in `ExecuteResult.runs`."
        ),
    )
    file_env: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Inputs passed as files: each value is written to a file of this "
            "call, and the variable holds the file's path. For inputs too "
            "large for the environment, where execve refuses a variable of "
            "128 KiB or more."
        ),
    )
    mask_env: list[str] = Field(
        default_factory=list,
        description=(
            "Names of env vars, of this call or of the sandbox, whose values "
            "the sandbox activity replaces with the mask in this call's "
            "stdout and stderr, whatever their names. Only the names travel "
            "here, because the values stay sealed in `sealed_env` and the "
            "session's spec."
        ),
    )


class ExecuteResult(BaseModel):
    stdout: str
    stderr: str
    exit_code: int | None
    status: ExecutionStatus
    execution_time: float = Field(description="Seconds the process ran.")
    stdout_dropped_bytes: int = 0
    stderr_dropped_bytes: int = 0
    recreated: int = Field(0, description="Sandboxes recreated to serve this call.")
    runs: int = Field(
        1,
        description=(
            "Starts of the program for this call in this sandbox, counted when "
            "the request has a `call_id`. Above 1 when a start was cut short, "
            "as by a worker that died while the program ran, and the call was "
            "made again."
        ),
    )


class UploadRequest(BaseModel):
    file_path: str
    content: str


class UploadResult(BaseModel):
    path: str
    size: int
    recreated: int = 0


class ConfigureRequest(BaseModel):
    sealed_env: dict[str, str] = Field(default_factory=dict)
    install_packages: list[str] = Field(default_factory=list)
    run_commands: list[str] = Field(default_factory=list)


class ConfigureResult(BaseModel):
    env_vars_configured: list[str]
    install_packages: list[str]
    commands_run: int
    output: str
    recreated: int = 0


class BackendState(BaseModel):
    """Live state of one backend sandbox, read from the backend."""

    backend: str
    backend_id: str
    alive: bool
    state: Literal["running", "stopped", "expired", "lost"]
    expires_at: UtcDateTime | None = None
    detail: str | None = None


class SandboxStatus(BaseModel):
    session: SessionInfo
    live: BackendState | None
    busy: bool = Field(
        False,
        description=(
            "The session's query timed out after 2 s, mostly because the "
            "session was running a program. `session` then comes from the "
            "database mirror, without events or packages."
        ),
    )


# Activity inputs and results.


class CreateInput(BaseModel):
    spec: SandboxSpec
    backend_id: str
    reason: Literal["create", "recreate"] = "create"


class CreateResult(BaseModel):
    backend: str
    backend_id: str
    setup_output: str


class ExecuteInput(BaseModel):
    spec: SandboxSpec
    backend_id: str
    request: ExecuteRequest
    settled_call_ids: list[str] = Field(
        default_factory=list,
        description=(
            "Calls whose results the session recorded in an earlier workflow "
            "task, so their start counts are no longer needed."
        ),
    )


class UploadInput(BaseModel):
    spec: SandboxSpec
    backend_id: str
    request: UploadRequest


class ConfigureInput(BaseModel):
    spec: SandboxSpec
    backend_id: str
    request: ConfigureRequest


class BackendRef(BaseModel):
    sandbox_id: str
    backend_id: str
    timeout: int = 0


class RecordInput(BaseModel):
    """A change of the database mirror of one sandbox."""

    spec: SandboxSpec
    status: str
    backend: str
    backend_id: str | None = None
    recreated: int = 0
    delete: bool = False
