"""The local backend: a sandbox is a folder under the data dir, its code runs
in a fresh process group, under bubblewrap when `bwrap` is installed.

Each sandbox also has an anchor process, `sleep TIMEOUT` followed by removal
of the folder, so a sandbox ends at its timeout like an E2B sandbox does even
when nobody calls it. Killing the anchor or removing the folder loses the
sandbox; the session workflow then recreates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.contracts.sandbox import BackendState
from app.sandbox.backend import (
    BackendSandbox,
    RunOutput,
    SandboxBackend,
    SandboxConfigurationError,
    SandboxLostError,
    resolve_inside,
)
from app.sandbox.templates import TEMPLATE_FILES

logger = logging.getLogger(__name__)

# Where the sandbox folder appears inside bubblewrap (E2B's home folder).
INSIDE_HOME = "/home/user"
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Host files that code needs to run (dynamic loader, TLS roots, name service);
# /etc/shadow, /root and the rest of the host stay invisible.
_ETC_ENTRIES = (
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "resolv.conf",
    "hosts",
    "nsswitch.conf",
    "passwd",
    "group",
    "localtime",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "mime.types",
)


@dataclass(frozen=True)
class ResourceLimits:
    """Per-process limits applied with setrlimit before code starts."""

    memory_bytes: int = 2 * 1024**3
    file_size_bytes: int = 1024**3
    processes: int = 512
    open_files: int = 1024


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


class LocalBackend(SandboxBackend):
    """Sandboxes as folders under `root`, run under bubblewrap where possible.

    Args:
        root: the folder that holds `<backend_id>/` sandbox folders and their
            state files.
        use_bwrap: None detects `bwrap`; False forces plain subprocesses.
        allow_network: let code open network connections (bubblewrap only
            shares the host network when this is True).
    """

    name = "local"

    def __init__(
        self,
        root: Path,
        *,
        use_bwrap: bool | None = None,
        allow_network: bool = False,
        limits: ResourceLimits | None = None,
    ) -> None:
        self.root = root
        self.bwrap = find_bwrap() if use_bwrap in (None, True) else None
        if use_bwrap is True and self.bwrap is None:
            raise SandboxConfigurationError(
                "bubblewrap was requested but `bwrap` is not on PATH; install the "
                "bubblewrap package"
            )
        self.allow_network = allow_network
        self.limits = limits or ResourceLimits()
        self._anchors: dict[str, subprocess.Popen[bytes]] = {}
        self._bwrap_base: list[str] | None = None

    # Paths and state.

    def folder(self, backend_id: str) -> Path:
        if not backend_id or "/" in backend_id or backend_id.startswith("."):
            raise ValueError(f"invalid sandbox backend id {backend_id!r}")
        return self.root / backend_id / "home"

    def _state_path(self, backend_id: str) -> Path:
        return self.root / backend_id / "state.json"

    def _read_state(self, backend_id: str) -> dict[str, object] | None:
        try:
            data = json.loads(self._state_path(backend_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _inside_home(self, backend_id: str) -> str:
        return INSIDE_HOME if self.bwrap else str(self.folder(backend_id))

    def _check(self, backend_id: str) -> dict[str, object]:
        state = self._read_state(backend_id)
        reason = self._lost_reason(backend_id, state)
        if reason is not None:
            # A sandbox that lost its folder may still have a live anchor.
            self._kill_anchor(backend_id, state)
            raise SandboxLostError(f"sandbox {backend_id} is lost: {reason}")
        assert state is not None
        return state

    def _lost_reason(
        self, backend_id: str, state: dict[str, object] | None
    ) -> str | None:
        if state is None:
            return "its state file is missing (never created or deleted)"
        if state.get("stopped"):
            return "it was stopped"
        expires = float(state.get("expires_at", 0))  # type: ignore[arg-type]
        if time.time() >= expires:
            return "it reached its timeout"
        if not self.folder(backend_id).is_dir():
            return "its folder was removed"
        pid = int(state.get("anchor_pid", 0))  # type: ignore[call-overload]
        if not _process_alive(pid, str(state.get("anchor_start", ""))):
            return f"its anchor process {pid} was killed"
        return None

    # Lifecycle.

    async def create(
        self,
        backend_id: str,
        *,
        template: str,
        timeout: int,
        env: Mapping[str, str],
        metadata: Mapping[str, str],
    ) -> BackendSandbox:
        if template not in TEMPLATE_FILES:
            raise SandboxConfigurationError(
                f"unknown template {template!r}; choose one of "
                f"{', '.join(TEMPLATE_FILES)}"
            )
        if template == "claude-code":
            self._check_claude(env)
        await self.delete(backend_id)
        home = self.folder(backend_id)
        home.mkdir(parents=True)
        (home / ".nexus").mkdir()
        for relative, text in TEMPLATE_FILES[template].items():
            target = home / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        self._start_anchor(backend_id, timeout, {"template": template, **metadata})
        logger.info("created local sandbox %s (template %s)", backend_id, template)
        return BackendSandbox(backend_id, self._inside_home(backend_id))

    def _check_claude(self, env: Mapping[str, str]) -> None:
        if shutil.which("claude") is None:
            raise SandboxConfigurationError(
                "template claude-code needs the `claude` command on PATH (install "
                "it with `npm install -g @anthropic-ai/claude-code`); it is missing"
            )
        if not env.get("ANTHROPIC_API_KEY"):
            raise SandboxConfigurationError(
                "template claude-code needs an Anthropic API key; pass "
                "anthropic_key, or set ANTHROPIC_API_KEY on the sandbox worker"
            )

    def _start_anchor(
        self, backend_id: str, timeout: int, metadata: Mapping[str, str]
    ) -> None:
        folder = self.folder(backend_id)
        previous = self._read_state(backend_id)
        anchor = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                'sleep "$1" && rm -rf -- "$2"',
                "nexus-sandbox-anchor",
                str(timeout),
                str(folder),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._anchors[backend_id] = anchor
        state = {
            "backend_id": backend_id,
            "anchor_pid": anchor.pid,
            "anchor_start": _process_start(anchor.pid),
            "timeout": timeout,
            "expires_at": time.time() + timeout,
            "metadata": dict(metadata),
            "created_at": (previous or {}).get("created_at", time.time()),
        }
        path = self._state_path(backend_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(path)

    def _kill_anchor(self, backend_id: str, state: Mapping[str, object] | None) -> None:
        anchor = self._anchors.pop(backend_id, None)
        if state is not None:
            pid = int(state.get("anchor_pid", 0))  # type: ignore[call-overload]
            if _process_alive(pid, str(state.get("anchor_start", ""))):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        if anchor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(anchor.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                anchor.wait(timeout=5)

    async def keep_alive(self, backend_id: str, timeout: int) -> None:
        state = self._check(backend_id)
        self._kill_anchor(backend_id, state)
        metadata = state.get("metadata")
        self._start_anchor(
            backend_id, timeout, metadata if isinstance(metadata, dict) else {}
        )

    async def home(self, backend_id: str) -> str:
        self._check(backend_id)
        return self._inside_home(backend_id)

    async def describe(self, backend_id: str) -> BackendState:
        state = self._read_state(backend_id)
        reason = self._lost_reason(backend_id, state)
        expires = None
        if state is not None and "expires_at" in state:
            expires = datetime.fromtimestamp(float(state["expires_at"]), UTC)  # type: ignore[arg-type]
        if reason is None:
            return BackendState(
                backend=self.name,
                backend_id=backend_id,
                alive=True,
                state="running",
                expires_at=expires,
            )
        if state is not None and state.get("stopped"):
            kind = "stopped"
        elif "timeout" in reason:
            kind = "expired"
        else:
            kind = "lost"
        return BackendState(
            backend=self.name,
            backend_id=backend_id,
            alive=False,
            state=kind,
            expires_at=expires,
            detail=reason,
        )

    async def stop(self, backend_id: str) -> None:
        state = self._read_state(backend_id)
        self._kill_anchor(backend_id, state)
        if state is not None:
            state["stopped"] = True
            self._state_path(backend_id).write_text(json.dumps(state))
        logger.info("stopped local sandbox %s", backend_id)

    async def delete(self, backend_id: str) -> None:
        state = self._read_state(backend_id)
        self._kill_anchor(backend_id, state)
        folder = self.root / backend_id
        if folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder, True)
            logger.info("deleted local sandbox %s", backend_id)

    # Files and processes.

    async def write_file(self, backend_id: str, path: str, content: bytes) -> str:
        self._check(backend_id)
        inside_home = self._inside_home(backend_id)
        inside = resolve_inside(inside_home, path)
        relative = inside[len(inside_home) + 1 :]
        host_home = self.folder(backend_id).resolve()
        target = host_home / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        # Code in the sandbox can plant symlinks; refuse any that lead outside.
        real_parent = target.parent.resolve()
        if real_parent != host_home and host_home not in real_parent.parents:
            raise ValueError(
                f"file path {path!r} goes through a symlink out of the sandbox folder"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(real_parent / target.name, flags, 0o644)
        except OSError as error:
            raise ValueError(f"cannot write file path {path!r}: {error}") from error
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        return inside

    def _bwrap_prefix(self, backend_id: str, network: bool) -> list[str]:
        if self._bwrap_base is None:
            base = [str(self.bwrap), "--unshare-all", "--die-with-parent"]
            base += ["--ro-bind", "/usr", "/usr"]
            for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                path = Path("/") / top
                if path.is_symlink():
                    base += ["--symlink", os.readlink(path), str(path)]
                elif path.is_dir():
                    base += ["--ro-bind", str(path), str(path)]
            for entry in _ETC_ENTRIES:
                path = Path("/etc") / entry
                if path.exists():
                    base += ["--ro-bind", str(path), str(path)]
            base += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
            self._bwrap_base = base
        return [
            *self._bwrap_base,
            *(["--share-net"] if network else []),
            "--bind",
            str(self.folder(backend_id)),
            INSIDE_HOME,
            "--clearenv",
        ]

    def base_env(self, backend_id: str) -> dict[str, str]:
        home = self._inside_home(backend_id)
        return {
            "PATH": _BASE_PATH,
            "HOME": home,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp" if self.bwrap else f"{home}/.nexus/tmp",
            "SANDBOX_HOME": home,
        }

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
    ) -> RunOutput:
        self._check(backend_id)
        home = self._inside_home(backend_id)
        workdir = home if not cwd else resolve_or_home(home, cwd)
        full_env = {**self.base_env(backend_id), **env}
        if self.bwrap:
            command = self._bwrap_prefix(backend_id, network or self.allow_network)
            for name, value in full_env.items():
                command += ["--setenv", name, value]
            command += ["--chdir", workdir, "--", *argv]
            host_cwd = str(self.folder(backend_id))
            process_env: dict[str, str] | None = {}
        else:
            Path(full_env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
            command = list(argv)
            host_cwd = workdir
            process_env = full_env
        Path(host_cwd).mkdir(parents=True, exist_ok=True)
        output = subprocess.PIPE if capture_output else subprocess.DEVNULL
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            cwd=host_cwd,
            env=process_env,
            start_new_session=True,
            preexec_fn=_limiter(self.limits, timeout),
        )
        readers = [
            asyncio.create_task(_read_capped(stream, output_limit))
            for stream in (process.stdout, process.stderr)
        ]
        timed_out = False
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            timed_out = True
        finally:
            # The group may outlive its leader (background jobs); end it all.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if timed_out:
            await process.wait()
        elapsed = time.perf_counter() - started
        (out, out_dropped), (err, err_dropped) = await asyncio.gather(*readers)
        return RunOutput(
            stdout=out,
            stderr=err,
            exit_code=None if timed_out else process.returncode,
            timed_out=timed_out,
            execution_time=elapsed,
            stdout_dropped_bytes=out_dropped,
            stderr_dropped_bytes=err_dropped,
        )

    def isolation(self) -> dict[str, object]:
        if self.bwrap:
            return {
                "status": "healthy",
                "backend": self.name,
                "isolation": "bubblewrap",
                "bwrap": self.bwrap,
                "network": "allowed" if self.allow_network else "none",
            }
        return {
            "status": "degraded",
            "backend": self.name,
            "isolation": "reduced",
            "detail": (
                "bwrap is not installed, so sandbox code runs as a plain "
                "subprocess with resource limits and can read the host's files "
                "and use its network; install the bubblewrap package"
            ),
        }


def resolve_or_home(home: str, cwd: str) -> str:
    """Return `cwd` inside the sandbox folder; absolute paths must stay inside."""
    if cwd in (home, home + "/"):
        return home
    return resolve_inside(home, cwd)


def _limiter(limits: ResourceLimits, timeout: float) -> Callable[[], None]:
    cpu = math.ceil(timeout) + 5

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files,) * 2)

    return apply


async def _read_capped(
    stream: asyncio.StreamReader | None, limit: int
) -> tuple[str, int]:
    """Read a stream to its end, keeping the first `limit` bytes."""
    if stream is None:
        return "", 0
    kept = bytearray()
    dropped = 0
    while chunk := await stream.read(65536):
        room = limit - len(kept)
        if room > 0:
            kept += chunk[:room]
        dropped += max(0, len(chunk) - max(room, 0))
    text = kept.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[output truncated: {dropped} bytes dropped]"
    return text, dropped


def _process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _process_alive(pid: int, start: str) -> bool:
    """True when `pid` runs and is the process that started at `start`."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] not in ("Z", "X") and fields[19] == start
