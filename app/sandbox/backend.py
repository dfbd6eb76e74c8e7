"""The interface every sandbox backend implements, and its errors."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from app.contracts.sandbox import BackendState

# The words of the local backend's note on a program that the disk limit
# stopped, which setup errors look for.
DISK_LIMIT_NOTE = "took more than its disk limit"


class SandboxBackendError(Exception):
    """Base class of backend failures; the message names the sandbox and fix."""


class SandboxLostError(SandboxBackendError):
    """The sandbox is gone (expired, killed, not found): recreate it."""


class SandboxRetryLaterError(SandboxBackendError):
    """The backend is busy or rate limited: the same call may work later."""


class SandboxConfigurationError(SandboxBackendError):
    """A setting or request that no retry can fix (bad key, missing tool)."""


# Characters of a failed setup step's output that its error quotes.
SETUP_OUTPUT_TAIL = 4000


class SandboxSetupError(SandboxConfigurationError):
    """An installer or setup command that failed in the sandbox: an error in
    the caller's packages or commands, which no retry fixes.

    Attributes:
        failure: the step and how it ended ("the startup script exited with
            code 7").
        output: the step's stdout and stderr, secrets masked.
        completed: the steps that ran before it, named as in `failure`.
    """

    def __init__(
        self,
        failure: str,
        output: str,
        completed: Sequence[str],
        advice: str = "Fix it and try again.",
    ) -> None:
        self.failure = failure
        self.output = output
        self.completed = list(completed)
        super().__init__(self.explain(advice))

    def explain(self, advice: str) -> str:
        """Return the message: the failure, `advice` (whole sentences) and
        the end of the step's output."""
        tail = self.output.strip()[-SETUP_OUTPUT_TAIL:]
        if tail:
            return f"{self.failure}. {advice} Its output ends:\n{tail}"
        return f"{self.failure}. {advice} It printed no output."


@dataclass(frozen=True)
class BackendSandbox:
    """A sandbox as a backend created it.

    Attributes:
        home: the sandbox folder as code inside the sandbox sees it.
    """

    backend_id: str
    home: str


# Receives output while a program runs: the stream ("stdout" or "stderr")
# and the bytes just read. Called on the event loop, so it must not block.
OutputSink = Callable[[str, bytes], None]


@dataclass(frozen=True)
class RunOutput:
    """The outcome of one process; output beyond the cap is already cut."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    execution_time: float
    stdout_dropped_bytes: int = 0
    stderr_dropped_bytes: int = 0


class SandboxBackend(abc.ABC):
    """Creates, runs code in and removes sandboxes of one kind.

    Every method that addresses an existing sandbox raises `SandboxLostError`
    when it no longer exists, so the session can recreate it.
    """

    name: str
    # Whether `run` calls its `on_output` while the program runs. A backend
    # without live output never calls it.
    live_output: bool = False

    @abc.abstractmethod
    async def create(
        self,
        backend_id: str,
        *,
        template: str,
        timeout: int,
        env: Mapping[str, str],
        metadata: Mapping[str, str],
    ) -> BackendSandbox:
        """Create an empty sandbox from `template` that lives `timeout` seconds."""

    @abc.abstractmethod
    async def home(self, backend_id: str) -> str:
        """Return the sandbox folder as processes inside see it."""

    @abc.abstractmethod
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
        """Run `argv` with exactly `env` (plus the backend's base variables).

        `timeout` kills the whole process tree; output beyond `output_limit`
        bytes per stream is dropped and counted. `network` grants network
        access to this process even where the sandbox has none (installers).
        `keep_alive` first extends the sandbox's life to that many seconds,
        as `keep_alive()` does, in the same request where the backend can.
        A backend with `live_output` passes each piece of output that it
        keeps to `on_output` as it is read, so the pieces of one stream add up
        to the start of that stream in the result. The result may hold more:
        a truncation marker, a note on a failed runner.
        """

    @abc.abstractmethod
    async def write_file(self, backend_id: str, path: str, content: bytes) -> str:
        """Write `content` at `path` relative to the sandbox folder.

        Returns the path as seen inside. Raises `ValueError` for a path that
        leaves the sandbox folder.
        """

    @abc.abstractmethod
    async def read_file(self, backend_id: str, path: str, limit: int) -> bytes | None:
        """Return up to `limit` bytes of the file at `path` relative to the
        sandbox folder, or None when it is not there.

        Raises `ValueError` for a path that leaves the sandbox folder.
        """

    @abc.abstractmethod
    async def remove_file(self, backend_id: str, path: str) -> None:
        """Remove the file at `path` relative to the sandbox folder.

        A missing file or sandbox is not an error. Raises `ValueError` for a
        path that leaves the sandbox folder.
        """

    @abc.abstractmethod
    async def keep_alive(self, backend_id: str, timeout: int) -> None:
        """Extend the sandbox's life to `timeout` seconds from now."""

    @abc.abstractmethod
    async def describe(self, backend_id: str) -> BackendState:
        """Read the sandbox's live state; a lost sandbox is a state, not an error."""

    @abc.abstractmethod
    async def stop(self, backend_id: str) -> None:
        """Kill the sandbox's processes; a sandbox already gone is not an error."""

    @abc.abstractmethod
    async def delete(self, backend_id: str) -> None:
        """Kill the sandbox and remove everything it stored."""

    def isolation(self) -> dict[str, object]:
        """Describe how well this backend isolates code, for `system_health`."""
        return {"status": "healthy", "backend": self.name}

    async def health(self) -> dict[str, object]:
        """Report this backend's `sandbox` component of `system_health`.

        A backend behind a remote service checks that the service responds.
        """
        return self.isolation()


def resolve_inside(home: str, path: str) -> str:
    """Join `path` to the sandbox folder `home`, rejecting traversal.

    Raises:
        ValueError: `path` is empty, contains a NUL byte, or leaves `home`
            (through `..` or an absolute path outside it).
    """
    if not path or "\0" in path:
        raise ValueError(f"file path {path!r} is empty or contains a NUL byte")
    _check_name_lengths("file_path", path)
    joined, root = _join_normalized(home, path)
    if joined != root and not joined.startswith(root + "/"):
        raise ValueError(
            f"file path {path!r} leaves the sandbox folder {root}; use a path "
            "relative to it without '..'"
        )
    if joined == root:
        raise ValueError(f"file path {path!r} names the sandbox folder itself")
    return joined


def resolve_workdir(home: str, cwd: str) -> str:
    """Resolve the working directory `cwd`, absolute or relative to the
    sandbox folder `home`, to a path inside `home` or `home` itself.

    Raises:
        ValueError: `cwd` is empty, contains a NUL byte or leaves `home`.
            The message names the `working_dir` field and the fix.
    """
    if not cwd or "\0" in cwd:
        raise ValueError(f"working_dir {cwd!r} is empty or contains a NUL byte")
    _check_name_lengths("working_dir", cwd)
    joined, root = _join_normalized(home, cwd)
    if joined != root and not joined.startswith(root + "/"):
        raise ValueError(
            f"working_dir {cwd!r} is outside the sandbox folder {root}; use a "
            f"path inside it ({root}/...) or a path relative to it without '..'"
        )
    return joined


# Linux's NAME_MAX: the max bytes of one file name (a path component).
_NAME_MAX = 255


def _check_name_lengths(field: str, path: str) -> None:
    """Raise ValueError naming `field` if a component of `path` is longer
    than a file name can be, which `open` would reject with ENAMETOOLONG."""
    for part in path.split("/"):
        if len(part.encode()) > _NAME_MAX:
            raise ValueError(
                f"{field} {path!r} is invalid: its component {part[:40]!r}... "
                f"is {len(part.encode())} bytes, and a file name can be at most "
                f"{_NAME_MAX} bytes; use shorter names"
            )


def _join_normalized(home: str, path: str) -> tuple[str, str]:
    """Return `path` joined to `home` and normalized, and `home` normalized."""
    import posixpath

    return posixpath.normpath(posixpath.join(home, path)), posixpath.normpath(home)
