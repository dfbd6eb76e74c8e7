"""Activities of user-defined workflows: persistence of executions and the
step types built into this capability."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from app.contracts.workflows import (
    SECRET_PARAMS,
    AuditEntry,
    ProgressRecord,
    RegisteredExecution,
    RegisterExecution,
    StepOutcome,
    StepRequest,
)
from app.sandbox.secrets import load_key
from app.services.audit import is_secret_name
from app.services.health import system_health
from app.settings import Settings
from app.storage.local import StorageError, storage_for
from app.workflows import store
from app.workflows.agents import resolve_agent
from app.workflows.steps import (
    EchoParams,
    ReportingParams,
    StorageParams,
    SystemInitializationParams,
    get_step_type,
)
from app.workflows.validation import DefinitionError, workflow_name_problems

ParamsT = TypeVar("ParamsT", bound=BaseModel)


def _attempt() -> int:
    return activity.info().attempt


def require_group(request: StepRequest, group: str) -> None:
    """Fail a step that would do what its run's key may not: a step type that
    works without the tool layer needs the group of the tools it stands for.

    Raises:
        ApplicationError: `group` is not among the run's groups.
    """
    if request.groups is not None and group not in request.groups:
        allowed = ", ".join(request.groups) or "none"
        raise step_error(
            request,
            f"a {request.type} step needs the tool group {group}, and this run "
            f"was started by a key limited to the groups: {allowed}; run it "
            f"with a key that may call {group} tools",
            kind="Forbidden",
            non_retryable=True,
        )


def step_error(
    request: StepRequest, message: str, *, kind: str, non_retryable: bool
) -> ApplicationError:
    """Build the error of a failed step attempt; details carry the attempt."""
    return ApplicationError(
        f"step {request.step!r} ({request.type}): {message}",
        {"attempt": _attempt()},
        type=kind,
        non_retryable=non_retryable,
    )


def parse_params(request: StepRequest, model: type[ParamsT]) -> ParamsT:
    """Validate a step's rendered params, or fail the step without retries."""
    try:
        return model.model_validate(request.params)
    except ValidationError as error:
        problems = "; ".join(
            _params_problem(request, item) for item in error.errors(include_url=False)
        )
        raise step_error(
            request,
            f"invalid params: {problems}",
            kind="InvalidStepParams",
            non_retryable=True,
        ) from None


_JSON_KINDS = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _params_problem(request: StepRequest, item: Any) -> str:
    """Describe one invalid params field; a value that a reference filled in
    is shown with that reference, unless the field may hold a secret."""
    path = ".".join(str(p) for p in item["loc"]) or "params"
    reference = request.references.get(path)
    secret = any(
        part in SECRET_PARAMS or (isinstance(part, str) and is_secret_name(part))
        for part in item["loc"]
    )
    if reference is None or secret:
        return f"{path}: {item['msg']}"
    value = item.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    return f"{path}: {{{{{reference}}}}} gave {shown} ({kind}); {item['msg']}"


@contextlib.contextmanager
def storage_errors(request: StepRequest) -> Iterator[None]:
    try:
        yield
    except StorageError as error:
        raise step_error(
            request, str(error), kind="StorageError", non_retryable=True
        ) from None


class WorkflowActivities:
    """Persistence and built-in steps; each method is one activity."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    @activity.defn(name="workflow_register_execution")
    def register_execution(self, request: RegisterExecution) -> RegisteredExecution:
        # A run started from outside stores its snapshot under its name, which
        # workflow_create would have checked.
        problems = (
            workflow_name_problems(request.input.definition.name)
            if request.state.workflow_id is None or request.state.version is None
            else []
        )
        if problems:
            raise ApplicationError(
                str(DefinitionError(problems)),
                type="InvalidDefinition",
                non_retryable=True,
            )
        try:
            workflow_id, version = store.register_execution(
                self.url,
                request.state,
                request.input.definition,
                key=load_key(self.settings),
            )
        except (store.DefinitionDeletedError, store.DefinitionMismatchError) as error:
            activity.logger.warning(
                "rejected execution %s: %s", request.state.execution_id, error
            )
            kind = (
                "DefinitionDeleted"
                if isinstance(error, store.DefinitionDeletedError)
                else "InvalidDefinition"
            )
            raise ApplicationError(str(error), type=kind, non_retryable=True) from None
        agents: dict[str, str | None] = {}
        for step in request.state.steps:
            if not (step.agent or step.agent_type):
                continue
            resolution = resolve_agent(self.settings, step.agent, step.agent_type)
            agents[step.name] = resolution.agent_id
            if resolution.agent_id is None:
                # The step runs without an agent; the audit trail has the reason.
                store.append_audit(
                    self.url,
                    AuditEntry(
                        execution_id=request.state.execution_id,
                        workflow_id=workflow_id,
                        step=step.name,
                        event="step.agent_unresolved",
                        status="pending",
                        at=datetime.now(UTC),
                        details={
                            "agent": step.agent,
                            "agent_type": step.agent_type,
                            "reason": resolution.reason,
                        },
                    ),
                )
        activity.logger.info(
            "registered execution %s of workflow %s version %d",
            request.state.execution_id,
            workflow_id,
            version,
        )
        return RegisteredExecution(
            workflow_id=workflow_id, version=version, agents=agents
        )

    @activity.defn(name="workflow_record_progress")
    def record_progress(self, record: ProgressRecord) -> None:
        store.record_progress(self.url, record)

    @activity.defn(name="step_echo")
    def echo(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, EchoParams)
        return StepOutcome(output=params.model_dump(), attempt=_attempt())

    @activity.defn(name="step_unavailable")
    def unavailable(self, request: StepRequest) -> StepOutcome:
        step_type = get_step_type(request.type)
        missing = step_type.missing if step_type else "the type is not registered"
        raise step_error(
            request,
            f"step type {request.type!r} is not available: {missing}; remove the "
            "step or run a build that includes that capability",
            kind="StepTypeNotAvailable",
            non_retryable=True,
        )

    @activity.defn(name="step_system_initialization")
    async def system_initialization(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, SystemInitializationParams)
        require_group(request, "system")
        report = await system_health(self.settings, activity.client())
        problems: list[str] = []
        if report.database.status == "unhealthy":
            problems.append(f"database unhealthy: {report.database.error}")
        if report.temporal.status == "unhealthy":
            problems.append(f"Temporal unhealthy: {report.temporal.error}")
        for queue in params.queues:
            health = report.workers.get(queue)
            # Unhealthy: no poller, or the queue could not be described.
            if health is None or health.status == "unhealthy":
                problems.append(f"no worker polls task queue {queue!r}")
        if report.status == "degraded" and not params.allow_degraded:
            problems.append("platform is degraded and allow_degraded is false")
        if problems:
            # Retryable: a worker or the database may come up before the
            # attempts run out.
            raise step_error(
                request,
                "system is not ready: " + "; ".join(problems),
                kind="SystemNotReady",
                non_retryable=False,
            )
        output = {
            "status": report.status,
            "database": report.database.status,
            "temporal": report.temporal.status,
            "server_version": report.temporal.server_version,
            "queues": {
                name: {
                    "status": q.status,
                    "workflow_pollers": len(q.workflow_pollers),
                    "activity_pollers": len(q.activity_pollers),
                }
                for name, q in report.workers.items()
            },
            "database_latency_ms": report.database.latency_ms,
            "temporal_latency_ms": report.temporal.latency_ms,
        }
        return StepOutcome(output=output, attempt=_attempt())

    @activity.defn(name="step_storage")
    def storage(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, StorageParams)
        require_group(request, "storage")
        storage = storage_for(self.settings)
        output: dict[str, Any]
        with storage_errors(request):
            if params.operation == "put":
                data = self._content_bytes(request, params)
                info = storage.put(
                    params.bucket, params.path, data, params.content_type
                )
                output = {
                    "bucket": info.bucket,
                    "path": info.path,
                    "size": info.size,
                    "sha256": info.sha256,
                    "content_type": info.content_type,
                }
            elif params.operation == "get":
                # One read, so that size and sha256 describe the bytes even
                # while another upload replaces the object.
                data, info = storage.read(params.bucket, params.path)
                output = {
                    "bucket": info.bucket,
                    "path": info.path,
                    "size": info.size,
                    "sha256": info.sha256,
                    "content": self._content_text(request, data, params),
                    "encoding": params.encoding,
                }
            elif params.operation == "delete":
                deleted = storage.delete(params.bucket, params.path)
                output = {"bucket": params.bucket, "path": params.path}
                output["deleted"] = deleted
            else:
                names = storage.list(params.bucket, params.prefix)
                output = {"bucket": params.bucket, "paths": names}
                output["count"] = len(names)
        return StepOutcome(output=output, attempt=_attempt())

    @staticmethod
    def _content_bytes(request: StepRequest, params: StorageParams) -> bytes:
        if params.content is None:
            raise step_error(
                request,
                "operation put needs params.content",
                kind="InvalidStepParams",
                non_retryable=True,
            )
        if params.encoding == "utf-8":
            return params.content.encode()
        try:
            return base64.b64decode(params.content, validate=True)
        except binascii.Error:
            raise step_error(
                request,
                "params.content is not valid base64",
                kind="InvalidStepParams",
                non_retryable=True,
            ) from None

    @staticmethod
    def _content_text(request: StepRequest, data: bytes, params: StorageParams) -> str:
        if params.encoding == "base64":
            return base64.b64encode(data).decode()
        try:
            return data.decode()
        except UnicodeDecodeError as error:
            # Replacing the bytes would return text that the step's own size
            # and sha256 do not describe.
            raise step_error(
                request,
                f"object {params.path!r} is not valid UTF-8 (byte {error.start}); "
                "get it with params.encoding base64",
                kind="InvalidStepParams",
                non_retryable=True,
            ) from None

    @activity.defn(name="step_reporting")
    def reporting(self, request: StepRequest) -> StepOutcome:
        params = parse_params(request, ReportingParams)
        require_group(request, "storage")
        names = params.steps if params.steps is not None else sorted(request.upstream)
        unknown = [n for n in names if n not in request.upstream]
        if unknown:
            raise step_error(
                request,
                f"params.steps names {unknown}, which are not upstream steps with "
                f"output; upstream: {sorted(request.upstream)}",
                kind="InvalidStepParams",
                non_retryable=True,
            )
        markdown = render_report(request, params, names)
        path = params.path or f"workflows/{request.execution_id}/{request.step}.md"
        with storage_errors(request):
            info = storage_for(self.settings).put(
                params.bucket, path, markdown.encode(), "text/markdown"
            )
        output = {
            "bucket": info.bucket,
            "path": info.path,
            "size": info.size,
            "sha256": info.sha256,
            "steps_reported": names,
        }
        return StepOutcome(output=output, attempt=_attempt())


def render_report(
    request: StepRequest, params: ReportingParams, names: list[str]
) -> str:
    """Render upstream outputs as Markdown: one section and table per step."""
    lines = [f"# {params.title}", ""]
    lines.append(f"- execution: `{request.execution_id}`")
    if request.workflow_id:
        lines.append(f"- workflow: `{request.workflow_id}`")
    lines.append(f"- report step: `{request.step}`")
    lines.append("")
    if params.notes:
        lines += [params.notes, ""]
    for name in names:
        output = request.upstream[name]
        lines += [f"## {name}", "", "| field | value |", "| --- | --- |"]
        for key, value in output.items():
            shown = value if isinstance(value, str) else json.dumps(value)
            shown = str(shown).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {key} | {shown} |")
        if not output:
            lines.append("| (no output) | |")
        lines.append("")
    return "\n".join(lines)
