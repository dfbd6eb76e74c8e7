"""The E2B backend, through the `e2b` SDK's `AsyncSandbox` (e2b 2.x).

Running it for real needs an E2B API key and network access to E2B; the
tests drive it with a stand-in class that raises the SDK's own exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import e2b
import httpx

from app.contracts.sandbox import BackendState
from app.sandbox.backend import (
    BackendSandbox,
    OutputSink,
    RunOutput,
    SandboxBackend,
    SandboxBackendError,
    SandboxConfigurationError,
    SandboxLostError,
    SandboxRetryLaterError,
    resolve_inside,
    resolve_workdir,
)
from app.sandbox.runtime import REDACTED
from app.settings import mask_url_passwords

T = TypeVar("T")
logger = logging.getLogger(__name__)

E2B_HOME = "/home/user"
# Seconds `system_health` waits for E2B to list sandboxes.
HEALTH_PROBE_SECONDS = 5.0
# Our template names map to E2B's public templates.
_E2B_TEMPLATES = {
    "base": "base",
    "python": "code-interpreter-v1",
    "node": "base",
    "react": "base",
    "nextjs": "nextjs-developer",
    "vanilla": "base",
    "claude-code": "claude-code",
}


class E2BBackend(SandboxBackend):
    """Sandboxes on E2B.

    Args:
        api_key: the E2B API key (E2B_API_KEY).
        sandbox_class: `e2b.AsyncSandbox`, or a stand-in with its interface.
    """

    name = "e2b"

    def __init__(self, api_key: str, sandbox_class: Any = None) -> None:
        self.api_key = api_key
        self.sandbox_class = sandbox_class or e2b.AsyncSandbox
        # Connected sandboxes by E2B sandbox id; the backend id of an E2B
        # sandbox is the id E2B gave it, so any worker can reconnect.
        self._sandboxes: dict[str, Any] = {}
        self._timeouts: dict[str, int] = {}
        # The platform's backend id (`sbx_...-gN`) by E2B sandbox id, for
        # messages. A worker that only reconnected does not know it.
        self._owners: dict[str, str] = {}

    async def _translate(
        self, error: BaseException, backend_id: str, sandbox: Any = None
    ) -> SandboxBackendError:
        """Map an SDK exception to the backend interface's errors."""
        if isinstance(error, SandboxBackendError):
            return error
        message = f"E2B sandbox {self._describe_id(backend_id)}: {self._reason(error)}"
        if isinstance(
            error, e2b.SandboxNotFoundException | e2b.SandboxNotRunningException
        ):
            self._forget(backend_id)
            return SandboxLostError(message)
        if isinstance(error, e2b.AuthenticationException) or _status(error) in (
            401,
            403,
        ):
            return SandboxConfigurationError(
                f"{message}; E2B rejected the API key, so set a valid E2B_API_KEY"
            )
        if isinstance(error, e2b.InvalidArgumentException | e2b.TemplateException):
            return SandboxConfigurationError(f"{message}; fix the request")
        status = _status(error)
        if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
            # E2B refused the request as made, which a retry repeats.
            return SandboxConfigurationError(
                f"{message}; E2B rejected the request with HTTP {status}, so "
                "check the request and E2B's API address"
            )
        if isinstance(error, e2b.RateLimitException | e2b.ServiceBusyException):
            return SandboxRetryLaterError(f"{message}; retry later")
        if isinstance(error, e2b.TimeoutException):
            # A timeout is ambiguous: the sandbox may have ended at its own
            # timeout, or one request was slow. Ask the sandbox.
            if sandbox is not None:
                try:
                    running = await self._within(
                        self.probe_seconds, sandbox.is_running()
                    )
                except Exception as probe:
                    # A failed probe leaves the state unknown. Recreating
                    # here would kill a live sandbox and its files.
                    logger.warning(
                        "is_running probe for %s failed: %s", backend_id, probe
                    )
                    return SandboxRetryLaterError(
                        f"{message}; E2B could not be reached to check whether "
                        "the sandbox still runs, so it was kept. Retry later."
                    )
                if not running:
                    self._forget(backend_id)
                    return SandboxLostError(f"{message}; it is no longer running")
            return SandboxRetryLaterError(f"{message}; retry later")
        if status is not None and status >= 500:
            return SandboxRetryLaterError(
                f"{message}; E2B failed with HTTP {status}, so retry later"
            )
        if isinstance(error, httpx.TransportError | OSError):
            return SandboxRetryLaterError(
                f"{message}; E2B could not be reached, so retry later"
            )
        if not isinstance(error, e2b.SandboxException):
            # The SDK raises plain exceptions (KeyError, "Body of the
            # request is None") when a response does not parse.
            return SandboxRetryLaterError(
                f"{message}; E2B sent an invalid response, so retry later"
            )
        return SandboxRetryLaterError(f"{message}; retry later")

    def _describe_id(self, backend_id: str) -> str:
        """Name an E2B sandbox with the platform's id where this worker knows it."""
        owner = self._owners.get(backend_id)
        return f"{backend_id} ({owner})" if owner else backend_id

    def _forget(self, backend_id: str) -> None:
        self._sandboxes.pop(backend_id, None)

    # Bounds on one request to E2B, so that an API or sandbox that stops
    # responding fails the call (to be retried later) rather than keep it
    # waiting for the SDK's own 60 s per request and more.
    request_seconds = 30.0
    create_seconds = 90.0
    probe_seconds = 10.0

    @staticmethod
    async def _within(seconds: float, call: Awaitable[T]) -> T:
        """Await `call` for at most `seconds`, failing as E2B's own request
        timeout does."""
        try:
            return await asyncio.wait_for(call, seconds)
        except TimeoutError:
            raise e2b.TimeoutException(
                f"E2B did not respond within {seconds:g} s"
            ) from None

    async def _sandbox(self, backend_id: str, timeout: int | None = None) -> Any:
        sandbox = self._sandboxes.get(backend_id)
        if sandbox is not None:
            return sandbox
        try:
            # Without a timeout, connect resets a long-lived sandbox to 300 s.
            sandbox = await self._within(
                self.request_seconds,
                self.sandbox_class.connect(
                    backend_id,
                    timeout=timeout or self._timeouts.get(backend_id, 3600),
                    api_key=self.api_key,
                ),
            )
        except Exception as error:
            raise await self._translate(error, backend_id) from error
        self._sandboxes[backend_id] = sandbox
        return sandbox

    async def create(
        self,
        backend_id: str,
        *,
        template: str,
        timeout: int,
        env: Mapping[str, str],
        metadata: Mapping[str, str],
    ) -> BackendSandbox:
        # An earlier attempt whose outcome was unclear may have created the
        # sandbox after all. Adopting it keeps one billed sandbox per id.
        adopted = await self._adopt_earlier(backend_id, timeout)
        if adopted is not None:
            return adopted
        try:
            sandbox = await self._within(
                self.create_seconds,
                self.sandbox_class.create(
                    template=_E2B_TEMPLATES.get(template, template),
                    timeout=timeout,
                    envs=dict(env),
                    metadata={"nexus_backend_id": backend_id, **metadata},
                    api_key=self.api_key,
                ),
            )
            sandbox_id = sandbox.sandbox_id
            if not isinstance(sandbox_id, str) or not sandbox_id:
                raise ValueError(f"no sandbox id in the response: {sandbox_id!r}")
        except Exception as error:
            translated = await self._translate(error, backend_id)
            if _rejected(error):
                raise translated from error
            # The request may have created a sandbox that nothing refers to.
            cleanup = await self._kill_created(backend_id)
            raise type(translated)(f"{translated}{cleanup}") from error
        self._remember(sandbox, backend_id, timeout)
        logger.info("created E2B sandbox %s as %s", backend_id, sandbox_id)
        return BackendSandbox(sandbox_id, E2B_HOME)

    def _remember(self, sandbox: Any, backend_id: str, timeout: int) -> None:
        self._sandboxes[sandbox.sandbox_id] = sandbox
        self._timeouts[sandbox.sandbox_id] = timeout
        self._owners[sandbox.sandbox_id] = backend_id

    async def _created_ids(self, backend_id: str) -> list[str]:
        """Return the ids of the E2B sandboxes created for `backend_id`."""
        paginator = self.sandbox_class.list(
            query=e2b.SandboxQuery(metadata={"nexus_backend_id": backend_id}),
            api_key=self.api_key,
        )
        found: list[str] = []
        while paginator.has_next:
            page = await self._within(self.request_seconds, paginator.next_items())
            found.extend(info.sandbox_id for info in page)
        return found

    async def _adopt_earlier(
        self, backend_id: str, timeout: int
    ) -> BackendSandbox | None:
        """Connect to a sandbox an earlier create made for `backend_id`, and
        kill any more of them; return None when there is none."""
        try:
            found = await self._created_ids(backend_id)
        except Exception as error:
            translated = await self._translate(error, backend_id)
            raise type(translated)(
                "could not list E2B sandboxes to check for one that an earlier "
                f"create of {backend_id} made: {translated}"
            ) from error
        if not found:
            return None
        keep, *extra = found
        for sandbox_id in extra:
            await self._kill_quietly(sandbox_id, backend_id)
        try:
            sandbox = await self._within(
                self.request_seconds,
                self.sandbox_class.connect(keep, timeout=timeout, api_key=self.api_key),
            )
        except Exception as error:
            raise await self._translate(error, keep) from error
        self._remember(sandbox, backend_id, timeout)
        logger.info("adopted E2B sandbox %s created earlier for %s", keep, backend_id)
        return BackendSandbox(keep, E2B_HOME)

    async def _kill_created(self, backend_id: str) -> str:
        """Kill the sandboxes a failed create may have made for `backend_id`;
        return a sentence for the error when that could not be checked."""
        try:
            found = await self._created_ids(backend_id)
        except Exception as error:
            logger.warning(
                "could not list E2B sandboxes created for %s: %s", backend_id, error
            )
            return (
                f". Listing E2B sandboxes to remove one this create may have "
                f"made also failed ({self._reason(error)}); the next create "
                "checks again"
            )
        for sandbox_id in found:
            await self._kill_quietly(sandbox_id, backend_id)
        return ""

    async def _kill_quietly(self, sandbox_id: str, backend_id: str) -> None:
        try:
            await self._within(
                self.request_seconds,
                self.sandbox_class.kill(sandbox_id, api_key=self.api_key),
            )
        except Exception as error:
            logger.warning(
                "could not kill E2B sandbox %s created for %s: %s",
                sandbox_id,
                backend_id,
                self._reason(error),
            )
        else:
            logger.info("killed E2B sandbox %s created for %s", sandbox_id, backend_id)

    def _reason(self, error: BaseException) -> str:
        """Return the error's class and text with the API key masked, because
        an E2B reply may quote the key it rejected."""
        text = mask_url_passwords(str(error))
        if self.api_key:
            text = text.replace(self.api_key, REDACTED)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__

    async def home(self, backend_id: str) -> str:
        await self._sandbox(backend_id)
        return E2B_HOME

    async def run(
        self,
        backend_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        timeout: float,
        output_limit: int,
        capture_output: bool = True,
        network: bool = False,
        keep_alive: int | None = None,
        on_output: OutputSink | None = None,
    ) -> RunOutput:
        # NOTE: `on_output` is never called (no `live_output`), so the output
        # of an E2B command reaches the stream at its end. The `on_stdout` and
        # `on_stderr` callbacks of `commands.run` (e2b 2.x) could stream it.
        if keep_alive is not None:
            await self.keep_alive(backend_id, keep_alive)
        sandbox = await self._sandbox(backend_id)
        workdir = resolve_workdir(E2B_HOME, cwd) if cwd else E2B_HOME
        # setsid makes the process a group leader, so a timeout can kill the
        # whole group with `kill -- -PID`.
        command = "exec setsid " + shlex.join(argv)
        started = time.perf_counter()
        try:
            handle = await self._within(
                self.request_seconds,
                sandbox.commands.run(
                    command, background=True, envs=dict(env), cwd=workdir, timeout=0
                ),
            )
        except Exception as error:
            raise await self._translate(error, backend_id, sandbox) from error
        timed_out = False
        stdout = stderr = ""
        exit_code: int | None = None
        try:
            result = await asyncio.wait_for(handle.wait(), timeout)
            stdout, stderr, exit_code = result.stdout, result.stderr, result.exit_code
        except e2b.CommandExitException as exited:
            stdout, stderr, exit_code = exited.stdout, exited.stderr, exited.exit_code
        except TimeoutError:
            timed_out = True
            try:
                await self._within(
                    self.request_seconds, self._kill_group(sandbox, handle.pid)
                )
            except Exception as error:
                raise await self._translate(error, backend_id, sandbox) from error
        except asyncio.CancelledError:
            # An interrupt or a cancelled call: without the kill, the command
            # would run on in the sandbox until it exits or the sandbox ends.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kill_group(sandbox, handle.pid), 15)
            raise
        except Exception as error:
            raise await self._translate(error, backend_id, sandbox) from error
        elapsed = time.perf_counter() - started
        out, out_dropped = _cap(stdout or "", output_limit)
        err, err_dropped = _cap(stderr or "", output_limit)
        if not capture_output:
            out, err = "", ""
        return RunOutput(
            stdout=out,
            stderr=err,
            exit_code=exit_code,
            timed_out=timed_out,
            execution_time=elapsed,
            stdout_dropped_bytes=out_dropped,
            stderr_dropped_bytes=err_dropped,
        )

    @staticmethod
    async def _kill_group(sandbox: Any, pid: int) -> None:
        """Kill the process group that `run` started with setsid."""
        # A group that has ended already makes `kill` exit non-zero.
        with contextlib.suppress(e2b.CommandExitException):
            await sandbox.commands.run(f"kill -KILL -- -{pid}", timeout=10)

    async def write_file(self, backend_id: str, path: str, content: bytes) -> str:
        inside = resolve_inside(E2B_HOME, path)
        sandbox = await self._sandbox(backend_id)
        try:
            await self._within(
                self.create_seconds, sandbox.files.write(inside, content)
            )
        except Exception as error:
            raise await self._translate(error, backend_id, sandbox) from error
        return inside

    async def read_file(self, backend_id: str, path: str, limit: int) -> bytes | None:
        inside = resolve_inside(E2B_HOME, path)
        sandbox = await self._sandbox(backend_id)
        try:
            content = await self._within(
                self.create_seconds, sandbox.files.read(inside, format="bytes")
            )
        except e2b.NotFoundException:
            return None
        except Exception as error:
            raise await self._translate(error, backend_id, sandbox) from error
        return bytes(content[:limit])

    async def remove_file(self, backend_id: str, path: str) -> None:
        inside = resolve_inside(E2B_HOME, path)
        sandbox = await self._sandbox(backend_id)
        try:
            await self._within(self.request_seconds, sandbox.files.remove(inside))
        except e2b.NotFoundException:
            return
        except Exception as error:
            raise await self._translate(error, backend_id, sandbox) from error

    async def keep_alive(self, backend_id: str, timeout: int) -> None:
        self._timeouts[backend_id] = timeout
        sandbox = await self._sandbox(backend_id, timeout)
        try:
            await self._within(self.request_seconds, sandbox.set_timeout(timeout))
        except Exception as error:
            raise await self._translate(error, backend_id, sandbox) from error

    async def describe(self, backend_id: str) -> BackendState:
        try:
            sandbox = await self._sandbox(backend_id)
            running = await self._within(self.probe_seconds, sandbox.is_running())
        except SandboxLostError as error:
            return BackendState(
                backend=self.name,
                backend_id=backend_id,
                alive=False,
                state="lost",
                detail=str(error),
            )
        except Exception as error:
            raise await self._translate(error, backend_id) from error
        return BackendState(
            backend=self.name,
            backend_id=backend_id,
            alive=bool(running),
            state="running" if running else "lost",
        )

    async def stop(self, backend_id: str) -> None:
        await self.delete(backend_id)

    async def delete(self, backend_id: str) -> None:
        self._forget(backend_id)
        self._timeouts.pop(backend_id, None)
        try:
            await self.sandbox_class.kill(backend_id, api_key=self.api_key)
        except e2b.SandboxNotFoundException:
            return
        except Exception as error:
            raise await self._translate(error, backend_id) from error

    def isolation(self) -> dict[str, object]:
        return {"status": "healthy", "backend": self.name, "isolation": "e2b microVM"}

    async def health(self) -> dict[str, object]:
        """List one sandbox, so a rejected key or an unreachable E2B shows as
        unhealthy before a sandbox call fails on it."""
        report = self.isolation()
        started = time.perf_counter()
        try:
            paginator = self.sandbox_class.list(limit=1, api_key=self.api_key)
            await asyncio.wait_for(paginator.next_items(), HEALTH_PROBE_SECONDS)
        except TimeoutError:
            problem = (
                f"E2B did not answer a sandbox listing within "
                f"{HEALTH_PROBE_SECONDS:g} s, so sandbox calls may fail; "
                "check the network path to E2B"
            )
        except Exception as error:
            problem = f"E2B failed a sandbox listing: {self._reason(error)}"
            if isinstance(error, e2b.AuthenticationException) or _status(error) in (
                401,
                403,
            ):
                problem += "; E2B rejected the API key, so set a valid E2B_API_KEY"
            elif isinstance(error, httpx.TransportError | OSError):
                problem += "; check the network path to E2B"
        else:
            problem = ""
        report["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        if problem:
            logger.warning("E2B health check failed: %s", problem)
            report["status"] = "unhealthy"
            report["error"] = problem
        return report


def _rejected(error: BaseException) -> bool:
    """Return whether E2B clearly rejected a request, so it created nothing."""
    rejections = (
        e2b.AuthenticationException,
        e2b.InvalidArgumentException,
        e2b.TemplateException,
        e2b.RateLimitException,
    )
    status = _status(error)
    return isinstance(error, rejections) or (status is not None and status < 500)


def _status(error: BaseException) -> int | None:
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None


def _cap(text: str, limit: int) -> tuple[str, int]:
    data = text.encode()
    if len(data) <= limit:
        return text, 0
    dropped = len(data) - limit
    kept = data[:limit].decode("utf-8", errors="ignore")
    return kept + f"\n[output truncated: {dropped} bytes dropped]", dropped
