"""Sandbox tools: durable sandboxes on the local or E2B backend."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from app.contracts.sandbox import (
    CALL_INPUT_LIMIT,
    SPEC_LIMIT,
    BackendState,
    ExecuteRequest,
    ExecuteResult,
    Language,
    SessionEvent,
    Template,
    check_env_names,
    payload_size_problem,
)
from app.contracts.types import UtcDateTime
from app.sandbox import service
from app.sandbox.backend import SandboxConfigurationError, SandboxSetupError
from app.sandbox.health import register_isolation_check
from app.sandbox.runtime import package_problem
from app.sandbox.service import CreateOptions, SandboxServiceError
from app.services.audit import is_secret_name
from app.tools.registry import ToolContext, ToolError, tool

_KINDS: dict[str, Any] = {
    "not_found": "not_found",
    "invalid_argument": "invalid_argument",
    # The server's settings (such as E2B_API_KEY) or the E2B request are
    # wrong, so a retry fails the same way until someone fixes them.
    "configuration": "conflict",
    "timed_out": "unavailable",
    "connection_lost": "unavailable",
    "failed": "failed",
}

register_isolation_check()


def _check_packages(value: list[str] | None) -> list[str] | None:
    for package in value or []:
        name = package.removeprefix("pip:").removeprefix("npm:")
        # pip and npm read an item that starts with "-" as an option.
        if not name.strip() or name.lstrip().startswith("-"):
            raise ValueError(
                f"package {package!r} is invalid; give one package name or "
                "requirement per item (for example requests==2.32.3 or "
                "npm:lodash), not an installer option"
            )
        # Which installer an item without a prefix goes to depends on the
        # template, so such an item is checked here only where neither would
        # take it, and against its installer when the sandbox is set up.
        if package.startswith(("pip:", "npm:")):
            problems = [package_problem(package[:3], name)]
        else:
            problems = [package_problem("pip", name), package_problem("npm", name)]
        if all(problem is not None for problem in problems):
            # Each reason names its installer. Both are given for an item
            # without a prefix, because the template that picks one is not
            # known here.
            reasons = ", and ".join(str(problem) for problem in problems)
            raise ValueError(f"package {package!r} cannot be installed: {reasons}")
    return value


def _check_command(command: str) -> str:
    # bash runs an empty command as success, so a blank item would be
    # counted in `commands_run` without running anything.
    if not command.strip():
        raise ValueError(
            "the command is empty; give one shell command per item or leave the "
            "item out"
        )
    return _without_nul("the command", command)


def _without_nul(field: str, value: str) -> str:
    # Neither a program text nor a command line can hold one: the sandbox
    # would be started, or the program run, only to fail.
    if "\x00" in value:
        raise ValueError(
            f"{field} contains a NUL character at position {value.index(chr(0))}, "
            "which no program text can hold; remove it"
        )
    return value


# The maximum size in bytes, encoded as JSON, of an input that the sandbox's
# spec keeps (env vars, packages, commands, metadata). Sealing makes an env
# var value about a third larger, and the spec as a whole has SPEC_LIMIT bytes.
_SPEC_FIELD_LIMIT = SPEC_LIMIT // 4
# Env vars get more, so that one value at Linux's limit for an environment
# string (131072 bytes) fails with that limit's own error.
_ENV_FIELD_LIMIT = SPEC_LIMIT * 3 // 8


def _check_sizes(model: BaseModel, limits: dict[str, int]) -> None:
    """Reject a field whose JSON encoding is over its limit, before the call
    reaches a workflow, where Temporal would fail it on every retry."""
    for field, limit in limits.items():
        value = getattr(model, field)
        if value is None:
            continue
        problem = payload_size_problem(field, value, limit)
        if problem is not None:
            raise ValueError(problem)


def _tool_error(error: SandboxServiceError) -> ToolError:
    return ToolError(error.message, kind=_KINDS.get(error.kind, "failed"))


class SandboxCreateInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    template: Template = Field(description="Sandbox template.")
    name: str | None = Field(None, max_length=200)
    env_vars: dict[str, str] | None = Field(
        None, description="Environment variables; values are stored encrypted."
    )
    anthropic_key: str | None = Field(
        None,
        description="Anthropic API key, set as ANTHROPIC_API_KEY (encrypted).",
        json_schema_extra={"secret": True},
    )
    timeout: int = Field(3600, gt=0, le=86400, description="Lifetime in seconds.")
    metadata: dict[str, str] | None = Field(
        None, description="String keys and string values."
    )
    install_packages: list[str] | None = Field(
        None, description="pip packages (npm for node templates; `npm:`/`pip:` prefix)."
    )
    startup_script: str | None = Field(None, description="bash run after installs.")

    @field_validator("startup_script")
    @classmethod
    def _script(cls, value: str | None) -> str | None:
        return None if value is None else _without_nul("startup_script", value)

    @field_validator("install_packages")
    @classmethod
    def _packages(cls, value: list[str] | None) -> list[str] | None:
        return _check_packages(value)

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_env_names(value)

    @model_validator(mode="after")
    def _sizes(self) -> SandboxCreateInput:
        spec_fields = ("anthropic_key", "metadata", "install_packages")
        limits = dict.fromkeys(spec_fields, _SPEC_FIELD_LIMIT)
        limits["startup_script"] = _SPEC_FIELD_LIMIT
        _check_sizes(self, {**limits, "env_vars": _ENV_FIELD_LIMIT})
        return self

    @field_validator("metadata")
    @classmethod
    def _no_secret_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # Metadata is labels: shown by sandbox_list and sandbox_status and
        # stored in plain text, so a key that names a secret is refused.
        for key in value or {}:
            if is_secret_name(key):
                raise ValueError(
                    f"metadata key {key!r} names a secret, and metadata is shown "
                    "and stored in plain text; pass secrets as env_vars, which "
                    "are sealed"
                )
        return value


class SandboxCreateResult(BaseModel):
    sandbox_id: str
    name: str | None
    template: str
    status: str
    backend: str
    env_vars_configured: list[str]
    timeout: int
    metadata: dict[str, str]
    install_packages: list[str]
    created_at: UtcDateTime | None


@tool("sandbox_create", group="sandbox")
async def sandbox_create(
    ctx: ToolContext, args: SandboxCreateInput
) -> SandboxCreateResult:
    """Create a sandbox from a template (base, python, node, claude-code, react,
    nextjs, vanilla) on the configured backend, install its packages and run its
    startup script. Returns sandbox_id; env var values are never returned. The
    sandbox is durable: if it dies, the next call recreates it."""
    options = CreateOptions(
        template=args.template,
        name=args.name,
        env_vars=args.env_vars or {},
        anthropic_key=args.anthropic_key,
        timeout=args.timeout,
        metadata={str(k): str(v) for k, v in (args.metadata or {}).items()},
        install_packages=args.install_packages or [],
        startup_script=args.startup_script,
    )
    try:
        info = await service.create_sandbox(await ctx.client(), ctx.settings, options)
    except SandboxServiceError as error:
        raise _tool_error(error) from None
    except SandboxSetupError as error:
        raise ToolError(str(error), kind="invalid_argument") from None
    except SandboxConfigurationError as error:
        raise ToolError(str(error), kind="conflict") from None
    return SandboxCreateResult(
        sandbox_id=info.sandbox_id,
        name=info.name,
        template=info.template,
        status=info.status,
        backend=info.backend,
        env_vars_configured=info.env_vars_configured,
        timeout=info.timeout,
        metadata=info.metadata,
        install_packages=info.install_packages,
        created_at=info.created_at,
    )


class SandboxExecuteInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sandbox_id: str = Field(min_length=1)
    code: str = Field(min_length=1, description="Program text to run.")
    language: Language = "python"
    env_vars: dict[str, str] | None = Field(None, description="For this run only.")
    mask_env_vars: list[str] | None = Field(
        None,
        description=(
            "Names of env vars, of this run or of the sandbox, whose values are "
            "replaced with ******** in stdout, stderr and the sandbox's logs, "
            "whatever their names."
        ),
    )
    working_dir: str | None = Field(None, description="Inside the sandbox folder.")
    timeout: float = Field(60, gt=0, le=86400, description="Seconds; kills the run.")
    capture_output: bool = True
    call_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description=(
            "An idempotency key: a call with the call_id of an earlier call to "
            "this sandbox gets that call's result, or waits for it, rather than "
            "run the code again. Letters, digits and _ . : - only."
        ),
    )

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_env_names(value)

    @field_validator("mask_env_vars")
    @classmethod
    def _mask_names(cls, value: list[str] | None) -> list[str] | None:
        check_env_names(dict.fromkeys(value or [], ""))
        return value

    @model_validator(mode="after")
    def _sizes(self) -> SandboxExecuteInput:
        _check_sizes(
            self, {"code": CALL_INPUT_LIMIT // 2, "env_vars": _ENV_FIELD_LIMIT}
        )
        return self

    @field_validator("code")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("code is empty; pass the program to run")
        return _without_nul("code", value)


@tool("sandbox_execute", group="sandbox")
async def sandbox_execute(ctx: ToolContext, args: SandboxExecuteInput) -> ExecuteResult:
    """Run code (python, javascript or bash) in a sandbox and return stdout,
    stderr, exit_code, status (completed, failed, timed_out) and the measured
    execution_time in seconds. A timeout kills the whole process group; long
    output is cut with a marker. `recreated` counts sandboxes rebuilt because
    the old one was lost, and `runs` the starts of the program: above 1 when
    a worker died while it ran and the sandbox ran it again."""
    request = ExecuteRequest(
        code=args.code,
        language=args.language,
        working_dir=args.working_dir,
        timeout=args.timeout,
        capture_output=args.capture_output,
        mask_env=list(args.mask_env_vars or []),
    )
    try:
        return await service.execute(
            await ctx.client(),
            ctx.settings,
            args.sandbox_id,
            request,
            args.env_vars,
            call_id=args.call_id or f"execute-{uuid.uuid4().hex}",
        )
    except SandboxServiceError as error:
        raise _tool_error(error) from None


class SandboxIdInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sandbox_id: str = Field(min_length=1)


class SandboxStatusResult(BaseModel):
    sandbox_id: str
    name: str | None
    template: str
    status: str = Field(description="Session status: running, stopped, failed, ...")
    backend: str
    backend_id: str | None
    live: BackendState | None = Field(description="Read from the backend now.")
    env_vars_configured: list[str]
    timeout: int
    recreated: int
    created_at: UtcDateTime | None
    events: list[SessionEvent]
    error: str | None
    busy: bool = Field(
        description=(
            "True when the session's query timed out after 2 s, mostly because "
            "the sandbox was running a program. The session fields then come "
            "from the database mirror and `events` is empty. `live` is read "
            "from the backend here where this process can, else null."
        )
    )


@tool("sandbox_status", group="sandbox")
async def sandbox_status(ctx: ToolContext, args: SandboxIdInput) -> SandboxStatusResult:
    """Read a sandbox's state live from its backend (alive, expired, lost) with
    its session: template, env var names, recreation count and events."""
    try:
        status = await service.status(await ctx.client(), ctx.settings, args.sandbox_id)
    except SandboxServiceError as error:
        raise _tool_error(error) from None
    session = status.session
    return SandboxStatusResult(
        sandbox_id=session.sandbox_id,
        name=session.name,
        template=session.template,
        status=session.status,
        backend=session.backend,
        backend_id=session.backend_id,
        live=status.live,
        env_vars_configured=session.env_vars_configured,
        timeout=session.timeout,
        recreated=session.recreated,
        created_at=session.created_at,
        events=session.events,
        error=session.error,
        busy=status.busy,
    )


class SandboxListInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    status: Literal["running", "stopped", "all"] = "all"


class SandboxSummary(BaseModel):
    sandbox_id: str
    name: str | None
    template: str
    status: str
    backend: str
    env_vars_configured: list[str]
    metadata: dict[str, Any]
    recreated: int
    created_at: UtcDateTime
    updated_at: UtcDateTime


class SandboxListResult(BaseModel):
    sandboxes: list[SandboxSummary]
    count: int


@tool("sandbox_list", group="sandbox")
async def sandbox_list(ctx: ToolContext, args: SandboxListInput) -> SandboxListResult:
    """List sandboxes (running, stopped or all) from the database mirror;
    use sandbox_status for live state."""
    rows = await service.list_sandboxes(ctx.settings, args.status)
    items = [
        SandboxSummary(
            sandbox_id=row.id,
            name=row.name,
            template=row.template,
            status=row.status,
            backend=row.backend,
            env_vars_configured=list(row.env_var_names),
            metadata=dict(row.sandbox_metadata),
            recreated=row.recreated,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows
    ]
    return SandboxListResult(sandboxes=items, count=len(items))


class SandboxConfigureInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sandbox_id: str = Field(min_length=1)
    env_vars: dict[str, str] | None = None
    anthropic_key: str | None = Field(None, json_schema_extra={"secret": True})
    install_packages: list[str] | None = None
    run_commands: list[Annotated[str, AfterValidator(_check_command)]] | None = None

    @field_validator("install_packages")
    @classmethod
    def _packages(cls, value: list[str] | None) -> list[str] | None:
        return _check_packages(value)

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_env_names(value)

    @model_validator(mode="after")
    def _sizes(self) -> SandboxConfigureInput:
        fields = ("anthropic_key", "install_packages", "run_commands")
        limits = dict.fromkeys(fields, _SPEC_FIELD_LIMIT)
        _check_sizes(self, {**limits, "env_vars": _ENV_FIELD_LIMIT})
        return self


class SandboxConfigureResult(BaseModel):
    sandbox_id: str
    env_vars_configured: list[str]
    install_packages: list[str]
    commands_run: int
    output: str
    recreated: int


@tool("sandbox_configure", group="sandbox")
async def sandbox_configure(
    ctx: ToolContext, args: SandboxConfigureInput
) -> SandboxConfigureResult:
    """Change a sandbox for all later executions: add env vars (encrypted),
    an Anthropic key, packages, or run setup commands. The change is recorded
    and reapplied if the sandbox is recreated."""
    try:
        result = await service.configure(
            await ctx.client(),
            ctx.settings,
            args.sandbox_id,
            env_vars=args.env_vars,
            anthropic_key=args.anthropic_key,
            install_packages=args.install_packages,
            run_commands=args.run_commands,
        )
    except SandboxServiceError as error:
        raise _tool_error(error) from None
    return SandboxConfigureResult(sandbox_id=args.sandbox_id, **result.model_dump())


class SandboxUploadInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sandbox_id: str = Field(min_length=1)
    file_path: str = Field(min_length=1, description="Relative to the sandbox folder.")
    content: str

    @model_validator(mode="after")
    def _sizes(self) -> SandboxUploadInput:
        _check_sizes(self, {"content": CALL_INPUT_LIMIT})
        return self


class SandboxUploadResult(BaseModel):
    sandbox_id: str
    path: str
    size: int
    recreated: int


@tool("sandbox_upload", group="sandbox")
async def sandbox_upload(
    ctx: ToolContext, args: SandboxUploadInput
) -> SandboxUploadResult:
    """Write a text file into a sandbox; paths that leave the sandbox folder
    are rejected."""
    try:
        result = await service.upload(
            await ctx.client(), args.sandbox_id, args.file_path, args.content
        )
    except SandboxServiceError as error:
        raise _tool_error(error) from None
    return SandboxUploadResult(sandbox_id=args.sandbox_id, **result.model_dump())


class SandboxLogsInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sandbox_id: str = Field(min_length=1)
    lines: int = Field(100, ge=1, le=1000)


class SandboxLogsResult(BaseModel):
    sandbox_id: str
    lines: list[str]
    count: int


@tool("sandbox_logs", group="sandbox")
async def sandbox_logs(ctx: ToolContext, args: SandboxLogsInput) -> SandboxLogsResult:
    """Return the most recent output lines of a sandbox (setup, stdout, stderr)."""
    try:
        lines = await service.logs(await ctx.client(), args.sandbox_id, args.lines)
    except SandboxServiceError as error:
        raise _tool_error(error) from None
    return SandboxLogsResult(sandbox_id=args.sandbox_id, lines=lines, count=len(lines))


class SandboxEndResult(BaseModel):
    sandbox_id: str
    status: str
    recreated: int


@tool("sandbox_stop", group="sandbox")
async def sandbox_stop(ctx: ToolContext, args: SandboxIdInput) -> SandboxEndResult:
    """Stop a sandbox: kill it on the backend and end its session."""
    client = await ctx.client()
    try:
        info = await service.stop_sandbox(client, args.sandbox_id)
    except SandboxServiceError as error:
        if error.kind != "not_found":
            raise _tool_error(error) from None
        # The session has ended. A sandbox that was stopped, deleted or failed
        # to create returns that status, and an unknown id is still not found.
        try:
            info = (await service.status(client, ctx.settings, args.sandbox_id)).session
        except SandboxServiceError as unknown:
            raise _tool_error(unknown) from None
    return SandboxEndResult(
        sandbox_id=info.sandbox_id, status=info.status, recreated=info.recreated
    )


@tool("sandbox_delete", group="sandbox")
async def sandbox_delete(ctx: ToolContext, args: SandboxIdInput) -> SandboxEndResult:
    """Delete a sandbox: kill it, remove its files and its list entry, and end
    its session."""
    try:
        info = await service.delete_sandbox(
            await ctx.client(), ctx.settings, args.sandbox_id
        )
    except SandboxServiceError as error:
        raise _tool_error(error) from None
    return SandboxEndResult(
        sandbox_id=info.sandbox_id, status=info.status, recreated=info.recreated
    )
