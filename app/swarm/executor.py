"""Agent execution of code and shell commands in sandbox sessions.

`AgentExecutor` is the interface that swarm activities use. Its
implementation, `SandboxSessionExecutor`, gives each agent one sandbox of the
sandbox capability (a `SandboxSessionWorkflow` on the configured backend),
created the first time the agent works and recreated by its session when it
is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from app.contracts.sandbox import ExecuteRequest, SessionInfo
from app.sandbox import service as sandbox_service
from app.settings import Settings

logger = logging.getLogger(__name__)

# Sandbox ids a worker remembers as running; each entry is one short string.
RUNNING_CACHE_SIZE = 4096

# `status` from the sandbox session: `running` (with the backend's live
# state), `creating`, `stopped`, `deleted`, `failed`, or `not_created`.
SandboxState = str


@dataclass
class ExecutionOutput:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    duration_ms: float
    # Starts of the program for this call (see `ExecuteResult.runs`).
    runs: int = 1


class AgentExecutor(Protocol):
    """Sandboxes of agents: created on first use, stopped when agents leave."""

    backend: str

    async def ensure_sandbox(self, agent_id: str) -> str:
        """Return the agent's sandbox id, creating the sandbox if needed."""
        ...

    async def run_code(
        self,
        sandbox_id: str,
        language: str,
        code: str,
        *,
        env: Mapping[str, str],
        timeout: float,
        call_id: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> ExecutionOutput:
        """Run `code` in the sandbox and return what it printed and its exit;
        a `call_id` used before returns that call's output instead. Each
        `files` value goes to a file whose path is in that variable."""
        ...

    async def interrupt(self, sandbox_id: str, call_id: str) -> None:
        """Stop the program of the `run_code` call with `call_id`, whose
        caller no longer waits for it."""
        ...

    async def state(self, sandbox_id: str) -> SandboxState:
        """Read the sandbox's state from its session and backend now."""
        ...

    async def stop(self, sandbox_id: str) -> bool:
        """Stop the sandbox; return False when it was already stopped or absent."""
        ...


def agent_sandbox_id(agent_id: str) -> str:
    """Return the fixed sandbox id of an agent, so creating it is idempotent."""
    return f"sbx_{agent_id.removeprefix('agent_')}"


class SandboxSessionExecutor:
    """Agents' sandboxes as sandbox sessions, driven through the sandbox service."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.backend = f"sandbox-session:{settings.sandbox_backend}"
        # One lock per sandbox being ensured, with the number of callers that
        # use it. Agents get new ids with every swarm, so an entry goes when
        # its last caller is done, or a long-running worker keeps them all.
        self._creating: dict[str, tuple[asyncio.Lock, int]] = {}
        # Sandboxes seen running by this worker, oldest first, at most
        # RUNNING_CACHE_SIZE. A step on one of them goes straight to
        # `execute` without the session query. `run_code` drops an id whose
        # session is gone, so the next `ensure_sandbox` checks it again.
        self._running: OrderedDict[str, None] = OrderedDict()

    def _remember_running(self, sandbox_id: str) -> None:
        self._running[sandbox_id] = None
        self._running.move_to_end(sandbox_id)
        while len(self._running) > RUNNING_CACHE_SIZE:
            self._running.popitem(last=False)

    async def ensure_sandbox(self, agent_id: str) -> str:
        sandbox_id = agent_sandbox_id(agent_id)
        if sandbox_id in self._running:
            return sandbox_id
        lock, users = self._creating.get(sandbox_id, (asyncio.Lock(), 0))
        self._creating[sandbox_id] = (lock, users + 1)
        try:
            async with lock:
                return await self._ensure_locked(agent_id, sandbox_id)
        finally:
            lock, users = self._creating[sandbox_id]
            if users == 1:
                del self._creating[sandbox_id]
            else:
                self._creating[sandbox_id] = (lock, users - 1)

    def ensuring(self) -> int:
        """Return the number of sandboxes with an `ensure_sandbox` call in progress."""
        return len(self._creating)

    async def _ensure_locked(self, agent_id: str, sandbox_id: str) -> str:
        try:
            info = await sandbox_service.info(self.client, sandbox_id)
        except sandbox_service.SandboxServiceError as error:
            if error.kind != "not_found":
                raise
            info = None
        if info is None:
            logger.info("creating sandbox %s for agent %s", sandbox_id, agent_id)
            try:
                await sandbox_service.create_sandbox(
                    self.client,
                    self.settings,
                    sandbox_service.CreateOptions(
                        template="python",
                        name=f"agent {agent_id}",
                        metadata={"agent_id": agent_id, "purpose": "swarm agent"},
                        sandbox_id=sandbox_id,
                    ),
                )
                self._remember_running(sandbox_id)
                return sandbox_id
            except WorkflowAlreadyStartedError:
                # Another step of this agent (maybe on another worker)
                # started the session first; wait for it below.
                info = await sandbox_service.info(self.client, sandbox_id)
        if info.status == "creating":
            info = await self._wait_ready(sandbox_id)
        if info.status != "running":
            raise RuntimeError(
                f"sandbox {sandbox_id} of agent {agent_id} is {info.status}"
                f"{': ' + info.error if info.error else ''}"
            )
        self._remember_running(sandbox_id)
        return sandbox_id

    async def _wait_ready(self, sandbox_id: str) -> SessionInfo:
        handle = self.client.get_workflow_handle(
            sandbox_service.workflow_id(sandbox_id)
        )
        try:
            return await handle.execute_update("ready", result_type=SessionInfo)
        except (WorkflowUpdateFailedError, RPCError) as error:
            raise RuntimeError(
                f"sandbox {sandbox_id} did not become ready: {error}"
            ) from error

    async def run_code(
        self,
        sandbox_id: str,
        language: str,
        code: str,
        *,
        env: Mapping[str, str],
        timeout: float,
        call_id: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> ExecutionOutput:
        try:
            result = await sandbox_service.execute(
                self.client,
                self.settings,
                sandbox_id,
                ExecuteRequest(
                    code=code,
                    language=language,
                    timeout=timeout,
                    call_id=call_id,
                    file_env=dict(files or {}),
                ),
                env_vars=env,
                call_id=call_id,
            )
        except sandbox_service.SandboxServiceError:
            self._running.pop(sandbox_id, None)
            raise
        return ExecutionOutput(
            stdout=result.stdout,
            stderr=result.stderr,
            exit_code=result.exit_code if result.exit_code is not None else -1,
            timed_out=result.status == "timed_out",
            duration_ms=result.execution_time * 1000,
            runs=result.runs,
        )

    async def interrupt(self, sandbox_id: str, call_id: str) -> None:
        await sandbox_service.interrupt(self.client, sandbox_id, call_id)

    async def state(self, sandbox_id: str) -> SandboxState:
        try:
            status = await sandbox_service.status(
                self.client, self.settings, sandbox_id
            )
        except sandbox_service.SandboxServiceError as error:
            if error.kind == "not_found":
                return "not_created"
            raise
        if status.live is not None:
            return status.live.state
        return status.session.status

    async def stop(self, sandbox_id: str) -> bool:
        self._running.pop(sandbox_id, None)
        try:
            await sandbox_service.stop_sandbox(self.client, sandbox_id)
        except sandbox_service.SandboxServiceError as error:
            if error.kind == "not_found":
                return False
            raise
        return True


def build_executor(client: Client, settings: Settings) -> AgentExecutor:
    """Return the executor of agents for this deployment."""
    return SandboxSessionExecutor(client, settings)
