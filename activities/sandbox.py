"""Sandbox activities: thin adapters from the contracts to the sandbox backend.

They run on the `nexus-sandbox` queue (the mirror write runs on
`nexus-orchestration`). Secret values are unsealed here, right before a
process starts, and redacted from everything that goes back into history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from temporalio import activity
from temporalio.exceptions import ApplicationError

from app.contracts.sandbox import (
    BACKEND_ERROR,
    CONFIGURATION_ERROR,
    INVALID_ERROR,
    LOST_ERROR,
    RETRY_LATER_ERROR,
    SETUP_ERROR,
    BackendRef,
    BackendState,
    ConfigureInput,
    ConfigureResult,
    CreateInput,
    CreateResult,
    ExecuteInput,
    ExecuteResult,
    RecordInput,
    SandboxSpec,
    UploadInput,
    UploadResult,
)
from app.realtime.output import OutputWriter
from app.sandbox import runtime, store
from app.sandbox.backend import (
    SandboxBackend,
    SandboxBackendError,
    SandboxConfigurationError,
    SandboxLostError,
    SandboxRetryLaterError,
    SandboxSetupError,
)
from app.sandbox.output_stream import ExecutionStream
from app.sandbox.secrets import SealError, load_key, unseal_env
from app.settings import Settings

# Extra lifetime granted past an execution's own timeout, so the sandbox
# cannot reach its end while code still runs.
_EXECUTION_MARGIN = 30


def _as_application_error(error: Exception) -> ApplicationError:
    if isinstance(error, SandboxSetupError):
        return ApplicationError(str(error), type=SETUP_ERROR, non_retryable=True)
    if isinstance(error, SandboxLostError):
        return ApplicationError(str(error), type=LOST_ERROR, non_retryable=True)
    if isinstance(error, SandboxRetryLaterError):
        return ApplicationError(str(error), type=RETRY_LATER_ERROR)
    if isinstance(error, SandboxConfigurationError | SealError):
        return ApplicationError(
            str(error), type=CONFIGURATION_ERROR, non_retryable=True
        )
    if isinstance(error, SandboxBackendError):
        return ApplicationError(str(error), type=BACKEND_ERROR, non_retryable=True)
    return ApplicationError(str(error), type=INVALID_ERROR, non_retryable=True)


@contextlib.asynccontextmanager
async def _backend_errors(backend_id: str) -> AsyncIterator[None]:
    try:
        yield
    except (SandboxBackendError, SealError, ValueError) as error:
        activity.logger.warning(
            "sandbox call on %s failed: %s: %s",
            backend_id,
            type(error).__name__,
            str(error).splitlines()[0],
        )
        raise _as_application_error(error) from None


@contextlib.asynccontextmanager
async def _heartbeats(every: float = 10.0) -> AsyncIterator[None]:
    async def beat() -> None:
        # The first beat waits: a short call then sends none at all.
        while True:
            await asyncio.sleep(every)
            activity.heartbeat()

    if activity.info().is_local:
        # Local activities have no heartbeat; their workflow task keeps them.
        yield
        return
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


_CREATE_ADVICE = {
    "create": "Fix the packages or the startup script and create the sandbox "
    "again; this one was not created.",
    "recreate": "The sandbox was lost, and its setup failed when it was "
    "recreated; create a new sandbox.",
}


def _setup_command_names(spec: SandboxSpec) -> list[str]:
    """Name the setup commands of a creation as its errors call them."""
    names = [
        f"setup command {index + 1} {runtime.quote_command(command)}"
        for index, command in enumerate(spec.setup_commands)
    ]
    if spec.startup_script and spec.setup_commands[:1] == [spec.startup_script]:
        names[0] = "the startup script"
    return names


class SandboxActivities:
    """Sandbox lifecycle and execution, on the backend the settings choose."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _backend(self) -> SandboxBackend:
        try:
            return runtime.get_backend(self.settings)
        except SandboxConfigurationError as error:
            raise _as_application_error(error) from None

    def _env(
        self, spec: SandboxSpec, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        key = load_key(self.settings)
        env = unseal_env(key, spec.sandbox_id, spec.sealed_env)
        env.update(unseal_env(key, spec.sandbox_id, dict(extra or {})))
        # The worker's own key goes into sandboxes, where their code can read
        # it, only where the operator chose to share it.
        if (
            spec.template == "claude-code"
            and "ANTHROPIC_API_KEY" not in env
            and self.settings.sandbox_share_anthropic_key
        ):
            configured = self.settings.anthropic_api_key
            if configured is not None and configured.get_secret_value():
                env["ANTHROPIC_API_KEY"] = configured.get_secret_value()
        return env

    def _require_recorded_backend(self, spec: SandboxSpec, backend: str) -> None:
        """Refuse to recreate a sandbox on another backend than the one it
        was created on (the worker's NEXUS_SANDBOX_BACKEND changed since). A
        call there finds no such sandbox, and a recreation would silently
        replace the sandbox and its files with an empty one elsewhere."""
        row = store.get_record(self.settings.effective_database_url, spec.sandbox_id)
        if row is None or row.backend == backend:
            return
        activity.logger.warning(
            "not recreating sandbox %s on %s: it was created on %s",
            spec.sandbox_id,
            backend,
            row.backend,
        )
        raise ApplicationError(
            f"sandbox {spec.sandbox_id} was created on the {row.backend} backend, "
            f"and this worker uses {backend} (NEXUS_SANDBOX_BACKEND), where it does "
            f"not exist; run the sandbox worker with NEXUS_SANDBOX_BACKEND="
            f"{row.backend} to use it, or delete it and create a new sandbox",
            type=CONFIGURATION_ERROR,
            non_retryable=True,
        )

    @activity.defn(name="sandbox_create")
    async def create(self, request: CreateInput) -> CreateResult:
        """Create the sandbox, install its packages and run its setup commands."""
        spec = request.spec
        backend = self._backend()
        if request.reason == "recreate":
            await asyncio.to_thread(self._require_recorded_backend, spec, backend.name)
        activity.logger.info(
            "%s sandbox %s as %s (template %s)",
            request.reason,
            spec.sandbox_id,
            request.backend_id,
            spec.template,
        )
        async with _backend_errors(request.backend_id), _heartbeats():
            env = self._env(spec)
            created = await backend.create(
                request.backend_id,
                template=spec.template,
                timeout=spec.timeout,
                env=env,
                metadata=spec.metadata,
            )
            try:
                output = await runtime.apply_setup(
                    backend,
                    created.backend_id,
                    template=spec.template,
                    packages=spec.install_packages,
                    commands=list(spec.setup_commands),
                    env=env,
                    settings=self.settings,
                    command_names=_setup_command_names(spec),
                    lifetime=spec.timeout,
                )
            except SandboxSetupError as failure:
                await backend.delete(created.backend_id)
                raise SandboxSetupError(
                    failure.failure,
                    failure.output,
                    failure.completed,
                    advice=_CREATE_ADVICE[request.reason],
                ) from None
            except BaseException:
                await backend.delete(created.backend_id)
                raise
        return CreateResult(
            backend=backend.name, backend_id=created.backend_id, setup_output=output
        )

    @activity.defn(name="sandbox_execute")
    async def execute(self, request: ExecuteInput) -> ExecuteResult:
        """Run code in the sandbox, after extending its life past the timeout.

        Its output goes to the sandbox's output stream while it runs.
        """
        backend = self._backend()
        lifetime = max(
            request.spec.timeout, int(request.request.timeout) + _EXECUTION_MARGIN
        )
        async with _backend_errors(request.backend_id), _heartbeats():
            env = self._env(request.spec, request.request.sealed_env)
            writer = OutputWriter(
                self.settings.effective_database_url,
                "sandbox",
                request.spec.sandbox_id,
            )
            stream = ExecutionStream(
                writer,
                runtime.masked_values(env, request.request),
                request.request.call_id,
            )
            return await runtime.execute(
                backend,
                request.backend_id,
                request.request,
                env,
                self.settings,
                keep_alive=lifetime,
                stream=stream,
                settled_call_ids=request.settled_call_ids,
            )

    @activity.defn(name="sandbox_upload")
    async def upload(self, request: UploadInput) -> UploadResult:
        """Write one file into the sandbox folder."""
        backend = self._backend()
        data = request.request.content.encode()
        async with _backend_errors(request.backend_id):
            await backend.keep_alive(request.backend_id, request.spec.timeout)
            path = await backend.write_file(
                request.backend_id, request.request.file_path, data
            )
        return UploadResult(path=path, size=len(data))

    @activity.defn(name="sandbox_configure")
    async def configure(self, request: ConfigureInput) -> ConfigureResult:
        """Install more packages and run commands; the workflow records them."""
        backend = self._backend()
        spec = request.spec
        change = request.request
        info = activity.info()
        async with _backend_errors(request.backend_id), _heartbeats():
            env = self._env(spec, change.sealed_env)
            await backend.keep_alive(request.backend_id, spec.timeout)
            try:
                output = await runtime.apply_setup(
                    backend,
                    request.backend_id,
                    template=spec.template,
                    packages=change.install_packages,
                    commands=change.run_commands,
                    env=env,
                    settings=self.settings,
                    command_names=[
                        f"run_commands[{index}] {runtime.quote_command(command)}"
                        for index, command in enumerate(change.run_commands)
                    ],
                    lifetime=spec.timeout,
                    # The same for every attempt of this activity, so that a
                    # retry after a dead worker resumes instead of repeating.
                    progress_key=f"configure:{info.workflow_run_id}:{info.activity_id}",
                )
            except SandboxSetupError as failure:
                raise SandboxSetupError(
                    failure.failure,
                    failure.output,
                    failure.completed,
                    advice=_configure_advice(failure.completed),
                ) from None
        names = sorted({*spec.sealed_env, *change.sealed_env})
        return ConfigureResult(
            env_vars_configured=names,
            install_packages=[*spec.install_packages, *change.install_packages],
            commands_run=len(change.run_commands),
            output=output,
        )

    @activity.defn(name="sandbox_describe")
    async def describe(self, ref: BackendRef) -> BackendState:
        """Read the sandbox's live state from the backend."""
        async with _backend_errors(ref.backend_id):
            return await self._backend().describe(ref.backend_id)

    @activity.defn(name="sandbox_stop")
    async def stop(self, ref: BackendRef) -> None:
        """Kill the sandbox's processes on the backend."""
        async with _backend_errors(ref.backend_id):
            await self._backend().stop(ref.backend_id)

    @activity.defn(name="sandbox_delete")
    async def delete(self, ref: BackendRef) -> None:
        """Kill the sandbox and remove its files on the backend."""
        async with _backend_errors(ref.backend_id):
            await self._backend().delete(ref.backend_id)


def _configure_advice(completed: list[str]) -> str:
    """Say what a configure that failed partway kept: nothing in the
    session, but the changes of the steps that ran, which cannot be undone."""
    if completed:
        ran = (
            f"Before it, {', '.join(completed)} ran, and their changes to the "
            "sandbox's files stay. "
        )
    else:
        ran = "Nothing of this configure ran before it. "
    return (
        ran + "The session recorded nothing of this configure: its env vars "
        "are not set, and a recreation repeats none of its packages or "
        "commands. Fix the failing step and send the configure again; the "
        "steps that ran then run once more."
    )


class SandboxRecordActivities:
    """The database mirror write, a light activity on the orchestration queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="sandbox_record")
    async def record(self, change: RecordInput) -> None:
        await asyncio.to_thread(
            store.record, self.settings.effective_database_url, change
        )
