"""The local backend: a sandbox is a folder under the data dir with a warm
runner process, under bubblewrap when `bwrap` is installed.

The runner (app/sandbox/runner.py) starts at creation inside the sandbox's
namespaces and forks a process group per execution, so an execution costs
two forks instead of a bubblewrap setup and an interpreter start. It also
ends the sandbox at its timeout like an E2B sandbox ends, even when nobody
calls it. It exits when its lifetime passes without a keep-alive, and its
anchor (`/bin/sh`, the runner's parent) then removes the folder. Killing the
anchor or the runner, or removing the folder, loses the sandbox; the session
workflow then recreates it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.contracts.sandbox import BackendState
from app.sandbox.backend import (
    DISK_LIMIT_NOTE,
    BackendSandbox,
    OutputSink,
    RunOutput,
    SandboxBackend,
    SandboxBackendError,
    SandboxConfigurationError,
    SandboxLostError,
    resolve_inside,
    resolve_workdir,
)
from app.sandbox.runner import descendants
from app.sandbox.templates import TEMPLATE_FILES

logger = logging.getLogger(__name__)

_RUNNER_PATH = Path(__file__).parent / "runner.py"
# Where bubblewrap shows the runner's file (read-only) inside a sandbox.
_INSIDE_RUNNER = "/run/nexus/runner.py"
# How long a new runner may take to respond to its first request.
_RUNNER_START_TIMEOUT = 30.0
# Set the rlimits given as JSON in argv[1], then exec argv[2:].
_LIMITED_EXEC = (
    "import json, os, resource, sys\n"
    "for name, (soft, hard) in json.loads(sys.argv[1]).items():\n"
    "    resource.setrlimit(getattr(resource, name), (soft, hard))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
# Seconds an unused spare runner lives before it ends itself.
_SPARE_LIFETIME = 300
# A spare starts once no creation or execution has run for this many
# seconds: starting bubblewrap and an interpreter beside the first call of
# a new sandbox made that call 4 ms slower on a 2-core machine.
_REFILL_IDLE = 0.2
# The name (`$0`) of the anchor shell, which with its cwd finds it in /proc.
_ANCHOR_NAME = "nexus-sandbox-anchor"
# The suffix that the kernel appends to a /proc cwd whose folder was removed.
_DELETED = " (deleted)"
# How long past an execution's timeout the host waits for the runner's reply.
_REPLY_MARGIN = 30.0

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
    # All files of the sandbox folder, checked while a program runs (0: no
    # limit). RLIMIT_FSIZE caps each file only.
    disk_bytes: int = 0


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
        spares: started, empty sandboxes kept ready, so that a creation
            takes one instead of waiting for a runner to start.
    """

    name = "local"
    live_output = True

    def __init__(
        self,
        root: Path,
        *,
        use_bwrap: bool | None = None,
        allow_network: bool = False,
        limits: ResourceLimits | None = None,
        spares: int = 0,
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
        # The write end of each unclaimed spare's pipe. The kernel closes it
        # when this worker is killed, and the spare's runner then exits.
        self._ties: dict[str, int] = {}
        self.spares = spares
        self._spares: list[str] = []
        self._stale_spares_removed = False
        self._refill: asyncio.Task[None] | None = None
        self._calls_running = 0
        self._last_call = 0.0
        self._bwrap_base: list[str] | None = None
        self._warned_no_pids_cgroup = False

    # Paths and state.

    def folder(self, backend_id: str) -> Path:
        if not backend_id or "/" in backend_id or backend_id.startswith("."):
            raise ValueError(f"invalid sandbox backend id {backend_id!r}")
        return self.root / backend_id / "home"

    def _state_path(self, backend_id: str) -> Path:
        return self.root / backend_id / "state.json"

    def has_state(self, backend_id: str) -> bool:
        """Return whether the sandbox's state file is in this backend's folder."""
        return self._state_path(backend_id).is_file()

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
        if time.time() >= self._expires_at(backend_id, state):
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
        with self._call():
            created = await self._create(backend_id, template, timeout, metadata)
        if self.spares and not self._refilling():
            self._refill = asyncio.create_task(self._refill_when_idle())
        logger.info("created local sandbox %s (template %s)", backend_id, template)
        return created

    async def _create(
        self, backend_id: str, template: str, timeout: int, metadata: Mapping[str, str]
    ) -> BackendSandbox:
        await self.delete(backend_id)
        home = self.folder(backend_id)
        if not await self._take_spare(backend_id, timeout):
            home.mkdir(parents=True)
            (home / ".nexus" / "tmp").mkdir(parents=True)
            self._start_runner(backend_id, timeout)
            try:
                await self._ping(backend_id, self._check(backend_id), None)
            except SandboxLostError as error:
                await self.delete(backend_id)
                raise SandboxConfigurationError(
                    f"the runner of sandbox {backend_id} did not start ({error}); "
                    "check that python3 runs and, if bubblewrap is used, that "
                    "`bwrap` works for this user"
                ) from None
        for relative, text in TEMPLATE_FILES[template].items():
            target = home / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        state = self._read_state(backend_id) or {}
        self._write_state(
            backend_id, {**state, "metadata": {"template": template, **metadata}}
        )
        return BackendSandbox(backend_id, self._inside_home(backend_id))

    async def _take_spare(self, backend_id: str, timeout: int) -> bool:
        """Turn a spare (a started, empty sandbox) into `backend_id`.

        Renaming its folder keeps its runner: bubblewrap's bind mount, the
        runner's cwd and its socket follow the folder, not its name.
        """
        while self._spares:
            spare = self._spares.pop(0)
            state = self._read_state(spare)
            try:
                if state is None or self._lost_reason(spare, state) is not None:
                    raise SandboxLostError(f"spare {spare} ended")
                await self._ping(spare, state, timeout, claim=True)
            except SandboxLostError:
                await self.delete(spare)
                continue
            self._untie(spare)
            source, target = self.root / spare, self.root / backend_id
            source.rename(target)
            anchor = self._anchors.pop(spare, None)
            if anchor is not None:
                self._anchors[backend_id] = anchor
            socket_path = str(state["socket"])
            if socket_path.startswith(f"{source}/"):
                socket_path = f"{target}{socket_path[len(str(source)) :]}"
            now = time.time()
            self._write_state(
                backend_id,
                {
                    **state,
                    "backend_id": backend_id,
                    "socket": socket_path,
                    "timeout": timeout,
                    "expires_at": now + timeout,
                    "created_at": now,
                },
            )
            self._record_expiry(backend_id, now + timeout)
            return True
        return False

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Mark a creation or execution as running, for `_refill_when_idle`."""
        self._calls_running += 1
        try:
            yield
        finally:
            self._calls_running -= 1
            self._last_call = time.monotonic()

    def _refilling(self) -> bool:
        # A test's event loop may close with the task pending; it is gone then.
        task = self._refill
        return (
            task is not None
            and not task.done()
            and task.get_loop() is asyncio.get_running_loop()
        )

    async def _refill_when_idle(self) -> None:
        while len(self._spares) < self.spares:
            quiet = time.monotonic() - self._last_call
            if not self._calls_running and quiet >= _REFILL_IDLE:
                self._refill_spares()
                return
            await asyncio.sleep(max(_REFILL_IDLE - quiet, _REFILL_IDLE / 4))

    def _refill_spares(self) -> None:
        if not self._stale_spares_removed:
            self._stale_spares_removed = True
            self._remove_stale_spares()
        while len(self._spares) < self.spares:
            spare = f"_spare-{uuid.uuid4().hex[:12]}"
            (self.folder(spare) / ".nexus" / "tmp").mkdir(parents=True)
            try:
                self._start_runner(spare, _SPARE_LIFETIME, tie=True)
            except OSError as error:
                logger.warning("could not start a spare sandbox runner: %s", error)
                shutil.rmtree(self.root / spare, ignore_errors=True)
                return
            self._spares.append(spare)

    def _remove_stale_spares(self) -> None:
        """Remove the folders of spares that outlived their lifetime, which
        a killed worker and earlier versions left behind. A spare of a live
        worker is younger than that, so it is left alone."""
        horizon = time.time() - _SPARE_LIFETIME - 60
        for folder in self.root.glob("_spare-*"):
            try:
                if folder.stat().st_mtime < horizon:
                    shutil.rmtree(folder)
                    logger.info("removed the stale spare sandbox %s", folder.name)
            except OSError as error:
                logger.warning("could not remove stale spare %s: %s", folder, error)

    async def close(self) -> None:
        """End the spare runners and the runners of sandboxes whose folder was
        removed (other sandboxes stay until their end)."""
        if self._refilling():
            assert self._refill is not None
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        self._refill = None
        spares, self._spares = self._spares, []
        for spare in spares:
            await self.delete(spare)
        self._end_orphaned_anchors()

    def _check_claude(self, env: Mapping[str, str]) -> None:
        if shutil.which("claude") is None:
            raise SandboxConfigurationError(
                "template claude-code needs the `claude` command on PATH (install "
                "it with `npm install -g @anthropic-ai/claude-code`); it is missing"
            )
        if not env.get("ANTHROPIC_API_KEY"):
            raise SandboxConfigurationError(
                "template claude-code needs an Anthropic API key; pass "
                "anthropic_key, or set ANTHROPIC_API_KEY on the sandbox worker "
                "with NEXUS_SANDBOX_SHARE_ANTHROPIC_KEY=true, which lets every "
                "caller of sandbox tools read it"
            )

    def _socket_path(self, backend_id: str) -> Path:
        path = self.root / backend_id / "runner.sock"
        if len(os.fsencode(path)) < 100:
            return path
        # Unix socket paths are limited to 108 bytes: use a private folder.
        folder = Path(tempfile.gettempdir()) / f"nexus-sandbox-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:24]
        return folder / f"{digest}.sock"

    def _start_runner(self, backend_id: str, timeout: int, tie: bool = False) -> None:
        """Start the anchor and its runner, which responds once it is up.

        With `tie`, for a spare, the runner also exits when this process
        dies, until `_take_spare` claims it.
        """
        folder = self.folder(backend_id)
        socket_path = self._socket_path(backend_id)
        socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tie_write: int | None = None
        try:
            listener.bind(str(socket_path))
            listener.listen(64)
            fd = listener.fileno()
            arguments = [str(fd), str(timeout)]
            env = self.base_env(backend_id)
            inherited = [fd]
            if tie:
                # os.pipe() fds are not inherited, so only this runner gets
                # the read end and no other child keeps the write end open.
                tie_read, tie_write = os.pipe()
                inherited.append(tie_read)
                arguments.append(str(tie_read))
            if self.bwrap:
                options = self._bwrap_options(backend_id, self.allow_network)
                options += ["--ro-bind", str(_RUNNER_PATH), _INSIDE_RUNNER]
                for name, value in env.items():
                    options += ["--setenv", name, value]
                options += ["--chdir", INSIDE_HOME]
                options_fd = _options_file(options)
                inherited.append(options_fd)
                command = [str(self.bwrap), "--args", str(options_fd), "--"]
                command += ["python3", _INSIDE_RUNNER, *arguments]
            else:
                command = ["python3", str(_RUNNER_PATH), *arguments]
            # The anchor removes the folder once the runner has ended; the
            # runner ends at the sandbox's timeout.
            # The folder's path is read from the kernel, not taken from the
            # arguments: a spare's folder is renamed when a sandbox takes it.
            # A spare that ends unused (its worker was killed) is removed with its
            # state file. A sandbox's own folder keeps its state until `delete`,
            # because `delete` reads it.
            script = (
                'shift; "$@"; f=$(readlink "/proc/$$/cwd") && '
                'case "$f" in */_spare-*/home) rm -rf -- "${f%/home}";; '
                '*/home) rm -rf -- "$f";; esac'
            )
            anchor_args = [str(folder), *command]
            procs = self._make_pids_cgroup()
            if procs is not None:
                # The anchor joins the cgroup before it starts anything, so
                # every process of the sandbox counts against its limit.
                script = f'echo $$ > "$1" || exit 1; shift; {script}'
                anchor_args = [str(procs), *anchor_args]
            anchor = subprocess.Popen(
                ["/bin/sh", "-c", script, _ANCHOR_NAME, *anchor_args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=str(folder),
                env=env,
                start_new_session=True,
                pass_fds=inherited,
            )
        except BaseException:
            if tie_write is not None:
                os.close(tie_write)
            raise
        finally:
            listener.close()
            for passed in inherited[1:]:
                os.close(passed)
        if tie_write is not None:
            self._ties[backend_id] = tie_write
        self._reap_exited_anchors()
        self._anchors[backend_id] = anchor
        now = time.time()
        self._write_state(
            backend_id,
            {
                "backend_id": backend_id,
                "anchor_pid": anchor.pid,
                "anchor_start": _process_start(anchor.pid),
                "cgroup": None if procs is None else str(procs.parent),
                "socket": str(socket_path),
                "timeout": timeout,
                "expires_at": now + timeout,
                "created_at": now,
            },
        )
        self._record_expiry(backend_id, now + timeout)

    def _make_pids_cgroup(self) -> Path | None:
        """Create a pids cgroup whose `pids.max` is the process limit, and
        return its `cgroup.procs` file. Returns None for a worker that is not
        root, which RLIMIT_NPROC limits, or where cgroups are not writable.

        The kernel does not apply RLIMIT_NPROC to root, and a worker run by
        root runs sandbox code as host root, so only the cgroup limits its
        processes there. A sandbox's cgroup is removed when it is stopped or
        deleted, and an installer's when it ends. Empty cgroups that are left,
        such as those of sandboxes that expired or whose worker was killed,
        are removed here (`rmdir` fails on one that has processes).
        """
        if os.geteuid() != 0:
            return None  # RLIMIT_NPROC applies
        root = _pids_cgroup_root()
        if root is None:
            self._warn_no_pids_cgroup("no writable pids cgroup hierarchy")
            return None
        now = time.time()
        for old in root.glob("nexus-sandbox-*"):
            # A young one may be a new sandbox's whose anchor has not joined yet.
            with contextlib.suppress(OSError):
                if now - old.stat().st_mtime > 60:
                    old.rmdir()
        cgroup = root / f"nexus-sandbox-{uuid.uuid4().hex}"
        try:
            cgroup.mkdir()
        except OSError as error:
            self._warn_no_pids_cgroup(f"creating {cgroup} failed: {error}")
            return None
        try:
            (cgroup / "pids.max").write_text(f"{self.limits.processes}\n")
        except OSError as error:
            self._warn_no_pids_cgroup(f"writing {cgroup}/pids.max failed: {error}")
            with contextlib.suppress(OSError):
                cgroup.rmdir()
            return None
        return cgroup / "cgroup.procs"

    def _warn_no_pids_cgroup(self, reason: str) -> None:
        if not self._warned_no_pids_cgroup:
            self._warned_no_pids_cgroup = True
            logger.warning(
                "sandboxes have no process limit: the worker runs as root, "
                "which RLIMIT_NPROC does not limit, and %s",
                reason,
            )

    def _write_state(self, backend_id: str, state: Mapping[str, object]) -> None:
        path = self._state_path(backend_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(path)

    def _record_expiry(self, backend_id: str, expires_at: float) -> None:
        """Record when the sandbox ends as the mtime of its `expiry` file.

        Every execution extends the sandbox's life. One `utime` call takes
        microseconds. Rewriting the state file (a write and a rename) took
        0.2 to 0.8 ms of each execution.
        """
        path = self.root / backend_id / "expiry"
        try:
            os.utime(path, (expires_at, expires_at))
        except FileNotFoundError:
            path.touch()
            os.utime(path, (expires_at, expires_at))

    def _expires_at(self, backend_id: str, state: Mapping[str, object]) -> float:
        try:
            return os.stat(self.root / backend_id / "expiry").st_mtime
        except FileNotFoundError:
            # Sandboxes created before the expiry file kept it in their state.
            return float(state.get("expires_at", 0))  # type: ignore[arg-type]

    def _reap_exited_anchors(self) -> None:
        """Wait for anchors that ended on their own or were killed elsewhere.

        An anchor is this process's child, so it stays a zombie until waited
        for: one that expired, or that another worker process killed on delete
        (the session's delete may run on the sandbox queue while its create ran
        here as a local activity).
        """
        for backend_id, anchor in list(self._anchors.items()):
            if anchor.poll() is not None:
                del self._anchors[backend_id]

    def _kill_anchor(self, backend_id: str, state: Mapping[str, object] | None) -> None:
        anchor = self._anchors.pop(backend_id, None)
        pids = []
        cgroups: set[Path] = set()
        if state is not None:
            pid = int(state.get("anchor_pid", 0))  # type: ignore[call-overload]
            if _process_alive(pid, str(state.get("anchor_start", ""))):
                pids.append(pid)
            socket_path = state.get("socket")
            if isinstance(socket_path, str):
                with contextlib.suppress(OSError):
                    os.unlink(socket_path)
            cgroup = state.get("cgroup")
            if isinstance(cgroup, str):
                cgroups.add(Path(cgroup))
        if anchor is not None and anchor.pid not in pids and anchor.poll() is None:
            pids.append(anchor.pid)
        # The state file is gone when the sandbox's folder was removed from
        # outside, and another worker process (or one since restarted) may
        # have started the anchor, so the anchor is also found by its cwd.
        home = _real_path(self.folder(backend_id))
        for pid, cwd in _anchor_processes(_real_path(self.root)).items():
            if cwd in (home, f"{home}{_DELETED}") and pid not in pids:
                pids.append(pid)
        self._end_anchors(pids, cgroups)
        if anchor is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                anchor.wait(timeout=5)

    def _end_anchors(self, pids: Sequence[int], cgroups: set[Path]) -> None:
        """SIGKILL each anchor with everything below it, and remove the pids
        cgroups of their sandboxes, which ends processes that left the tree."""
        for pid in pids:
            # Read before the kill, which takes the process's /proc entry.
            cgroup = _sandbox_cgroup_of(pid)
            if cgroup is not None:
                cgroups.add(cgroup)
            _kill_tree(pid)
        for cgroup in cgroups:
            # Off the event loop: the killed processes may take a moment to
            # leave the cgroup.
            threading.Thread(target=_remove_cgroup, args=(cgroup,), daemon=True).start()

    def _end_orphaned_anchors(self) -> None:
        """End the anchors below `root` whose sandbox folder was removed.

        Such a sandbox is lost for good: its session recreates it under a
        new id, and nothing else would end the old runner before its own
        timeout.
        """
        root = _real_path(self.root)
        orphans = {
            pid: cwd
            for pid, cwd in _anchor_processes(root).items()
            # Only a sandbox's own `<root>/<id>/home`, which code inside the
            # sandbox cannot make an anchor's cwd.
            if cwd[len(root) + 1 :].split("/")[1:] == [f"home{_DELETED}"]
        }
        for pid, cwd in orphans.items():
            logger.warning(
                "ending anchor process %s of a sandbox whose folder %s was removed",
                pid,
                cwd.removesuffix(_DELETED),
            )
        self._end_anchors(list(orphans), set())

    async def _request(
        self,
        backend_id: str,
        state: Mapping[str, object],
        message: Mapping[str, object],
        fds: Sequence[int] = (),
    ) -> socket.socket:
        """Connect to the sandbox's runner and send `message` with `fds`."""
        path = state.get("socket")
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A local connect only queues on the runner's backlog: no wait.
            connection.connect(str(path))
            body = json.dumps(message).encode()
            data = struct.pack("!I", len(body)) + body
            sent = socket.send_fds(connection, [data], list(fds))
            if sent < len(data):
                connection.sendall(data[sent:])
        except OSError as error:
            connection.close()
            raise SandboxLostError(
                f"sandbox {backend_id} is lost: its runner does not respond ({error})"
            ) from None
        connection.setblocking(False)
        return connection

    async def _reply(
        self,
        connection: socket.socket,
        timeout: float | None,
        data: bytearray | None = None,
    ) -> list[dict[str, object]]:
        """Read the runner's reply lines until it closes the connection.

        Args:
            data: receives the bytes as they come, so that a caller whose
                wait timed out can still read the lines that arrived.
        """
        loop = asyncio.get_running_loop()
        if data is None:
            data = bytearray()

        async def read() -> None:
            # A runner that died leaves its socket to the anchor until that
            # exits too: such a connection ends in a reset, with no reply.
            with contextlib.suppress(ConnectionResetError):
                while chunk := await loop.sock_recv(connection, 65536):
                    data.extend(chunk)

        await asyncio.wait_for(read(), timeout)
        return _reply_lines(data)

    async def _ping(
        self,
        backend_id: str,
        state: Mapping[str, object],
        lifetime: int | None,
        claim: bool = False,
    ) -> None:
        message: dict[str, object] = {"op": "ping"}
        if lifetime is not None:
            message["lifetime"] = lifetime
        if claim:
            # A claimed spare is a sandbox, which outlives its worker.
            message["claim"] = True
        connection = await self._request(backend_id, state, message)
        try:
            replies = await self._reply(connection, _RUNNER_START_TIMEOUT)
        except TimeoutError:
            replies = []
        finally:
            connection.close()
        if not replies:
            raise SandboxLostError(
                f"sandbox {backend_id} is lost: its runner closed the connection"
            )

    async def keep_alive(self, backend_id: str, timeout: int) -> None:
        state = self._check(backend_id)
        await self._ping(backend_id, state, timeout)
        self._record_expiry(backend_id, time.time() + timeout)

    async def home(self, backend_id: str) -> str:
        self._check(backend_id)
        return self._inside_home(backend_id)

    async def describe(self, backend_id: str) -> BackendState:
        state = self._read_state(backend_id)
        reason = self._lost_reason(backend_id, state)
        expires = None
        if state is not None:
            expires = datetime.fromtimestamp(self._expires_at(backend_id, state), UTC)
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
        """End the sandbox and remove its files, as E2B's kill does.

        Its state file, marked stopped, stays until `delete`: an execution
        that the stop ends reads the mark to say so. The session deletes the
        stopped sandbox once no call of it is running.
        """
        state = self._read_state(backend_id)
        if state is not None:
            # Marked before the kill, so that an execution the kill ends can
            # report that the sandbox was stopped.
            state["stopped"] = True
            self._write_state(backend_id, state)
        self._kill_anchor(backend_id, state)
        # A killed anchor no longer removes the folder, as it does when its
        # runner ends at the timeout.
        with contextlib.suppress(SandboxBackendError):
            # Logged by `_remove`. The sandbox is stopped all the same, and
            # the `delete` that follows tries the removal again.
            await self._remove(backend_id, self.folder(backend_id))
        logger.info("stopped local sandbox %s", backend_id)

    async def delete(self, backend_id: str) -> None:
        """Kill the sandbox and remove its folder, state file included.

        Raises:
            SandboxBackendError: a file could not be removed. The state file
                is then kept, so `describe` still finds the sandbox and a
                later `delete` can finish the removal.
        """
        state = self._read_state(backend_id)
        if state is not None:
            # Marked before the kill, as `stop` does, so that an execution the
            # kill ends reports the delete even if it reads the state file
            # before its removal.
            state["deleted"] = True
            self._write_state(backend_id, state)
        self._kill_anchor(backend_id, state)
        self._untie(backend_id)
        folder = self.root / backend_id
        if folder.exists():
            await self._remove(backend_id, self.folder(backend_id))
            await self._remove(backend_id, folder)
            logger.info("deleted local sandbox %s", backend_id)

    def _untie(self, backend_id: str) -> None:
        tie = self._ties.pop(backend_id, None)
        if tie is not None:
            os.close(tie)

    async def _remove(self, backend_id: str, path: Path) -> None:
        try:
            await asyncio.to_thread(_remove_tree, path)
        except OSError as error:
            where = path.relative_to(self.root)
            logger.warning(
                "could not remove %s of sandbox %s: %s", where, backend_id, error
            )
            raise SandboxBackendError(
                f"sandbox {backend_id} could not be fully removed: "
                f"{error.strerror} on {Path(error.filename or path).name!r} below "
                f"{str(where)!r} in the sandboxes folder; delete the sandbox again, "
                "or remove that folder by hand"
            ) from error

    # Files and processes.

    async def write_file(self, backend_id: str, path: str, content: bytes) -> str:
        self._check(backend_id)
        inside_home = self._inside_home(backend_id)
        inside = resolve_inside(inside_home, path)
        relative = inside[len(inside_home) + 1 :]
        # In a thread: a write of a large file on a slow disk would stall
        # every other call that this worker's event loop serves.
        await asyncio.to_thread(
            _write_below, self.folder(backend_id), relative, content, path
        )
        return inside

    async def read_file(self, backend_id: str, path: str, limit: int) -> bytes | None:
        inside_home = self._inside_home(backend_id)
        relative = resolve_inside(inside_home, path)[len(inside_home) + 1 :]
        return _read_below(self.folder(backend_id), relative, limit)

    async def remove_file(self, backend_id: str, path: str) -> None:
        inside_home = self._inside_home(backend_id)
        relative = resolve_inside(inside_home, path)[len(inside_home) + 1 :]
        _remove_below(self.folder(backend_id), relative)

    def _bwrap_options(self, backend_id: str, network: bool) -> list[str]:
        """Build bubblewrap's options, which name host paths.

        They go to bubblewrap through `--args FD` (see `_options_file`), not
        its command line, because every process in the sandbox can read the
        command line of its PID 1, a copy of bubblewrap.
        """
        if self._bwrap_base is None:
            base = ["--unshare-all", "--die-with-parent"]
            if os.geteuid() == 0:
                # Run by root, bubblewrap keeps root's capabilities inside.
                # With CAP_SYS_PTRACE, code could take the runner's listening
                # socket (pidfd_getfd) and reply to the host's requests.
                # Without privileges, bubblewrap grants none by default.
                base += ["--cap-drop", "ALL"]
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
            base += ["--proc", "/proc", "--dev", "/dev"]
            if self.limits.disk_bytes and _bwrap_sizes_tmpfs(self.bwrap):
                # /tmp is memory, outside the sandbox folder that the disk
                # limit measures, so it gets the same bound.
                base += ["--size", str(self.limits.disk_bytes)]
            base += ["--tmpfs", "/tmp"]
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
        keep_alive: int | None = None,
        on_output: OutputSink | None = None,
    ) -> RunOutput:
        with self._call():
            state = self._check(backend_id)
            # The runner takes the new lifetime with the request itself.
            expires_at = None if keep_alive is None else time.time() + keep_alive
            home = self._inside_home(backend_id)
            workdir = home if not cwd else resolve_workdir(home, cwd)
            if cwd:
                _check_workdir(self.folder(backend_id), home, workdir, cwd)
            full_env = {**self.base_env(backend_id), **env}
            if network and not self.allow_network and self.bwrap:
                # The runner has no network; installers get a process that has.
                if expires_at is not None:
                    self._record_expiry(backend_id, expires_at)
                    await self._ping(backend_id, state, keep_alive)
                return await self._spawn(
                    backend_id, argv, full_env, workdir, timeout, output_limit, True
                )
            message: dict[str, object] = {
                "op": "exec",
                "env": full_env,
                "cwd": workdir,
                "timeout": timeout,
                "limits": _limit_values(self.limits, timeout),
            }
            if keep_alive is not None:
                message["lifetime"] = keep_alive
            if len(argv) == 3 and argv[0] == "python3" and argv[1] == "-c":
                message["python"] = argv[2]
            elif (
                len(argv) == 2 and argv[0] == "python3" and not argv[1].startswith("-")
            ):
                message["file"] = argv[1]
            else:
                message["argv"] = list(argv)
            loop = asyncio.get_running_loop()
            pipes = [os.pipe(), os.pipe()] if capture_output else []
            started = time.perf_counter()
            try:
                connection = await self._request(
                    backend_id, state, message, [write for _, write in pipes]
                )
            except BaseException:
                for read, write in pipes:
                    os.close(read)
                    os.close(write)
                raise
            readers = []
            for (read, write), stream in zip(pipes, ("stdout", "stderr"), strict=False):
                os.close(write)
                sink = _labelled(on_output, stream)
                readers.append(
                    asyncio.create_task(_read_fd_capped(loop, read, output_limit, sink))
                )
            hung = False
            received = bytearray()
            watch = (
                asyncio.create_task(self._watch_disk(backend_id, connection))
                if self.limits.disk_bytes
                else None
            )
            try:
                if expires_at is not None:
                    # Recorded while the runner starts the program. A failure
                    # closes the connection below, which kills the program.
                    self._record_expiry(backend_id, expires_at)
                # The runner enforces `timeout`; this bound only covers a runner
                # that hangs. Closing the connection makes it kill the program.
                replies = await self._reply(
                    connection, timeout + _REPLY_MARGIN, received
                )
            except TimeoutError:
                # A pid received before the runner stopped responding shows
                # that the program started, so the call must not run again.
                replies, hung = _reply_lines(received, complete_only=True), True
            finally:
                over_disk = False
                if watch is not None:
                    if watch.done() and not watch.cancelled():
                        over_disk = watch.exception() is None and watch.result()
                    watch.cancel()
                connection.close()
            # The last: a warm supervisor that died taking over may have sent one.
            started_pid = next(
                (r["pid"] for r in reversed(replies) if "pid" in r), None
            )
            reply = next((r for r in replies if "timed_out" in r or "error" in r), None)
            if reply is None and isinstance(started_pid, int) and not self.bwrap:
                # Its supervisor died with the runner; without bubblewrap's PID
                # namespace the program's group would live on.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(started_pid, signal.SIGKILL)
            if hung:
                # A runner that does not respond (stopped with SIGSTOP, for
                # example) is treated as dead, as a killed one is. Ending it
                # closes the pipes it holds, even those of a request it never
                # took, and the next call finds the sandbox lost and
                # recreates it.
                logger.warning(
                    "runner of sandbox %s did not respond within %g s; ending it",
                    backend_id,
                    timeout + _REPLY_MARGIN,
                )
                self._kill_anchor(backend_id, state)
            if hung and started_pid is None:
                for reader in readers:
                    reader.cancel()
                raise SandboxLostError(
                    f"sandbox {backend_id} is lost: its runner did not respond "
                    f"within {timeout + _REPLY_MARGIN:g} s and was ended"
                )
            if not hung and started_pid is None and reply is None:
                # Nothing started, so the call is safe to repeat on a new sandbox.
                for reader in readers:
                    reader.cancel()
                raise SandboxLostError(
                    f"sandbox {backend_id} is lost: its runner closed the connection"
                )
            elapsed = time.perf_counter() - started
            outputs = [await reader for reader in readers] or [("", 0), ("", 0)]
            (out, out_dropped), (err, err_dropped) = outputs
            if hung:
                err += (
                    f"\n[sandbox runner did not respond within "
                    f"{timeout + _REPLY_MARGIN:g} s and was ended; the next call "
                    "recreates the sandbox]"
                )
                reply = {"exit_code": None, "timed_out": True}
            elif over_disk:
                err += (
                    f"\n[the sandbox's files {DISK_LIMIT_NOTE} of "
                    f"{self.limits.disk_bytes} bytes, so the program was stopped; "
                    "remove files, or raise NEXUS_SANDBOX_DISK_LIMIT]"
                )
                reply = {"exit_code": None, "timed_out": False}
            elif reply is None or "error" in reply:
                err += self._runner_failure_note(backend_id, reply)
                reply = {"exit_code": None, "timed_out": False}
            exit_code = reply.get("exit_code")
            return RunOutput(
                stdout=out,
                stderr=err,
                exit_code=exit_code if isinstance(exit_code, int) else None,
                timed_out=bool(reply.get("timed_out")),
                execution_time=elapsed,
                stdout_dropped_bytes=out_dropped,
                stderr_dropped_bytes=err_dropped,
            )

    async def _watch_disk(self, backend_id: str, connection: socket.socket) -> bool:
        """Stop the running program once the sandbox's files take more than
        the disk limit; return True if it did. Shutting the connection down
        makes the runner kill the program, as a hung caller's close does."""
        folder = self.folder(backend_id)
        while True:
            await asyncio.sleep(_DISK_CHECK_SECONDS)
            used = await asyncio.to_thread(_folder_bytes, folder)
            if used > self.limits.disk_bytes:
                logger.warning(
                    "sandbox %s takes %d bytes of disk, over its limit of %d; "
                    "stopping its program",
                    backend_id,
                    used,
                    self.limits.disk_bytes,
                )
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                return True

    def _runner_failure_note(
        self, backend_id: str, reply: Mapping[str, object] | None
    ) -> str:
        """Build the stderr note of an execution whose runner failed or ended."""
        state = self._read_state(backend_id)
        if state is None or state.get("deleted"):
            # The execution found the state file before it started, so only a
            # delete can have removed or marked it since.
            logger.info("sandbox %s was deleted during an execution", backend_id)
            return (
                f"\n[sandbox {backend_id} was deleted during this execution. A "
                "deleted sandbox is not recreated; create a new one]"
            )
        if state.get("stopped"):
            logger.info("sandbox %s was stopped during an execution", backend_id)
            return (
                f"\n[sandbox {backend_id} was stopped during this execution. A "
                "stopped sandbox is not recreated; create a new one]"
            )
        why = "it ended" if reply is None else str(reply["error"])
        logger.warning("runner of sandbox %s failed an execution: %s", backend_id, why)
        return (
            f"\n[sandbox runner failed during this execution: {why}; the next "
            "call recreates the sandbox if it is lost]"
        )

    async def _spawn(
        self,
        backend_id: str,
        argv: Sequence[str],
        full_env: Mapping[str, str],
        workdir: str,
        timeout: float,
        output_limit: int,
        network: bool,
    ) -> RunOutput:
        """Run `argv` in a bubblewrap of its own (for installers' network)."""
        options = self._bwrap_options(backend_id, network)
        for name, value in full_env.items():
            options += ["--setenv", name, value]
        options += ["--chdir", workdir]
        # A small launcher inside sets the rlimits: a preexec_fn would make
        # the worker fork instead of vfork, which JAX's threads warn about.
        limits = json.dumps(_limit_values(self.limits, timeout))
        options_fd = _options_file(options)
        command = [str(self.bwrap), "--args", str(options_fd), "--"]
        # -I keeps the working directory (the sandbox folder) and the user
        # site off the launcher's path, and -S skips `site` and its `.pth`
        # files: with the network granted, the launcher must import nothing
        # that sandbox code could have written.
        command += ["python3", "-I", "-S", "-c", _LIMITED_EXEC, limits, *argv]
        procs = self._make_pids_cgroup()
        if procs is not None:
            # As in `_start_runner`. With `exec`, bubblewrap stays the leader
            # of the process group that the timeout kills.
            join = 'echo $$ > "$1" || exit 1; shift; exec "$@"'
            command = ["/bin/sh", "-c", join, "nexus-installer", str(procs), *command]
        started = time.perf_counter()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(self.folder(backend_id)),
                env={},
                start_new_session=True,
                pass_fds=[options_fd],
            )
        finally:
            os.close(options_fd)
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
            # bubblewrap's own PID namespace ends every process in it with
            # its first one; the group kill covers bwrap itself.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if timed_out:
            await process.wait()
        if procs is not None:
            await asyncio.to_thread(_remove_cgroup, procs.parent)
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


def _check_workdir(folder: Path, inside_home: str, workdir: str, cwd: str) -> None:
    """Raise ValueError if the working directory `workdir` (as seen inside)
    runs into a file, ends in a dangling symlink, or leads through symlinks
    out of `folder`.

    The runner creates a missing working directory, and its `makedirs` would
    fail with EEXIST or ENOTDIR there. Symlinks are followed as the kernel
    would, up to 40 of them, with a target inside the sandbox mapped to
    `folder`.
    """
    if workdir == inside_home:
        return
    pending = workdir[len(inside_home) + 1 :].split("/")
    path = folder
    hops = 0
    # How many of the next pending parts come from a symlink's target: a
    # missing one of those makes that symlink dangle.
    from_link = 0
    while pending:
        part = pending.pop(0)
        in_target = from_link > 0
        from_link = max(0, from_link - 1)
        if part in ("", "."):
            continue
        path = path.parent if part == ".." else path / part
        if path != folder and not str(path).startswith(str(folder) + os.sep):
            # Only a symlink's target can climb out: the request's own `..`
            # was rejected before.
            raise _workdir_error(cwd, "leads through symlinks out of the folder")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if in_target:
                raise _workdir_error(cwd, "is a dangling symlink") from None
            return  # the runner creates the rest
        if stat.S_ISLNK(mode):
            hops += 1
            if hops > 40:
                raise _workdir_error(cwd, "leads through too many symlinks")
            target = os.readlink(path)
            if target == inside_home or target.startswith(inside_home + "/"):
                path = folder
                target = target[len(inside_home) + 1 :]
            elif target.startswith("/"):
                raise _outside_error(cwd, target)
            else:
                path = path.parent
            parts = target.split("/")
            pending = [*parts, *pending]
            from_link = len(parts)
            continue
        if not stat.S_ISDIR(mode):
            raise _workdir_error(cwd, "runs into a file")


def _outside_error(cwd: str, target: str) -> ValueError:
    return ValueError(
        f"working_dir {cwd!r} is invalid: it leads through a symlink to "
        f"{target!r}, outside the sandbox folder; use a folder inside it"
    )


def _workdir_error(cwd: str, problem: str) -> ValueError:
    return ValueError(
        f"working_dir {cwd!r} is invalid: it {problem} in the sandbox; use a "
        "folder, or a path that does not exist yet"
    )


def _pids_cgroup_root() -> Path | None:
    """Return the folder that sandboxes' pids cgroups go in, or None.

    That is the cgroup v1 `pids` hierarchy's root or, on cgroup v2, this
    process's own cgroup where its `pids` controller is enabled for children.
    """
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").is_file():
        return v1
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        own = next(line[3:] for line in lines if line.startswith("0::"))
        folder = Path("/sys/fs/cgroup") / own.lstrip("/")
        enabled = (folder / "cgroup.subtree_control").read_text().split()
    except (OSError, StopIteration):
        return None
    return folder if "pids" in enabled else None


def _options_file(options: Sequence[str]) -> int:
    """Write NUL-terminated `options` to an in-memory file for `bwrap --args`.

    Returns the file's descriptor, positioned at the start. The caller
    passes it to bubblewrap, which closes it once read, and closes its own
    copy.
    """
    data = b"".join(os.fsencode(option) + b"\0" for option in options)
    fd = os.memfd_create("nexus-bwrap-args", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_below(
    root: Path, relative: str, content: bytes, requested_path: str
) -> None:
    """Write `content` at `relative` below `root`, creating its folders.

    Each folder is opened relative to its parent with `O_NOFOLLOW`, so a
    symlink that code in the sandbox planted, or swaps in during the walk,
    cannot lead the write or a created folder out of `root`. Symlinks are
    therefore never followed, even ones that point inside the sandbox.

    The file itself is opened with `O_NONBLOCK` and must be a regular file:
    opening a FIFO that code in the sandbox made would otherwise wait for a
    reader.

    Raises:
        ValueError: a part of the path is a symlink or a file, the path names
            something other than a regular file, or the write failed. The
            message names `requested_path`, the caller's path.
    """
    *folders, name = relative.split("/")
    parent = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walked: list[str] = []
        for folder in folders:
            walked.append(folder)
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o755, dir_fd=parent)
            try:
                child = os.open(
                    folder,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                    dir_fd=parent,
                )
            except OSError as error:
                raise _write_error(
                    requested_path, "/".join(walked), parent, folder, error
                ) from None
            os.close(parent)
            parent = child
        _reject_special_file(requested_path, parent, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, 0o644, dir_fd=parent)
        except OSError as error:
            raise _write_error(requested_path, relative, parent, name, error) from None
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as handle:
        # Checked again on the open file: code in the sandbox can swap a
        # FIFO in after the `lstat`.
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise _not_regular_error(requested_path)
        os.set_blocking(handle.fileno(), True)
        handle.write(content)


def _reject_special_file(requested_path: str, parent: int, name: str) -> None:
    """Raise if `name` in the folder `parent` exists and is neither a regular
    file nor a symlink (which the `O_NOFOLLOW` open rejects on its own)."""
    try:
        mode = os.lstat(name, dir_fd=parent).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise _not_regular_error(requested_path)


def _not_regular_error(requested_path: str) -> ValueError:
    return ValueError(
        f"file_path {requested_path!r} names something in the sandbox that is "
        "not a regular file (a folder, FIFO, socket or device); remove it "
        "first or upload to another path"
    )


@contextlib.contextmanager
def _folder_below(
    root: Path, folders: list[str], absent: tuple[type[OSError], ...]
) -> Iterator[int | None]:
    """Open the folder `folders` below `root` and yield its descriptor, or
    None when `root` is missing or opening a folder raises one of `absent`.
    No symlink is followed, as in `_write_below`."""
    try:
        parent = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield None  # the sandbox's folder is gone, and all below it
        return
    try:
        for folder in folders:
            child: int | None
            try:
                child = os.open(
                    folder,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                    dir_fd=parent,
                )
            except absent:
                child = None
            if child is None:
                yield None
                return
            os.close(parent)
            parent = child
        yield parent
    finally:
        os.close(parent)


def _read_below(root: Path, relative: str, limit: int) -> bytes | None:
    """Return up to `limit` bytes of the file `relative` below `root`, or None
    when it is not there. No symlink is followed, as in `_write_below`."""
    *folders, name = relative.split("/")
    # Any error on a folder (missing, a file, a symlink) means no such file.
    with _folder_below(root, folders, absent=(OSError,)) as parent:
        if parent is None:
            return None
        # O_NONBLOCK: code in the sandbox could put a FIFO there, whose open
        # would wait for a writer.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ValueError(
                f"cannot read {relative} in the sandbox: {error}"
            ) from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ValueError(f"{relative} in the sandbox is not a regular file")
        return file.read(limit)


def _remove_below(root: Path, relative: str) -> None:
    """Remove the file `relative` below `root` if it is there.

    As in `_write_below`, no folder symlink is followed, because code in the
    sandbox could plant one that leads out of `root`. A path through such a
    link removes nothing (opening it as a folder fails with ENOTDIR). A
    symlink at the end of the path is removed itself, not its target.
    """
    *folders, name = relative.split("/")
    absent = (FileNotFoundError, NotADirectoryError)
    with _folder_below(root, folders, absent) as parent:
        if parent is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)


def _write_error(
    requested_path: str, part: str, parent: int, name: str, error: OSError
) -> ValueError:
    """Build the error for `part` of `requested_path`, which could not be opened."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
            return ValueError(
                f"file path {requested_path!r} goes through the symlink "
                f"{part!r}, and uploads do not follow symlinks; use a path "
                "without symlinks"
            )
    return ValueError(
        f"cannot write file path {requested_path!r}: {part!r} failed with "
        f"{error.strerror}; use a path whose folders are folders"
    )


def _limit_values(limits: ResourceLimits, timeout: float) -> dict[str, list[int]]:
    """Build the rlimits of one process, keyed by `resource` constant name."""
    cpu = math.ceil(timeout) + 5
    return {
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_AS": [limits.memory_bytes] * 2,
        "RLIMIT_FSIZE": [limits.file_size_bytes] * 2,
        "RLIMIT_NPROC": [limits.processes] * 2,
        "RLIMIT_NOFILE": [limits.open_files] * 2,
    }


def _labelled(sink: OutputSink | None, stream: str) -> Callable[[bytes], None] | None:
    if sink is None:
        return None
    return lambda data: sink(stream, data)


async def _read_fd_capped(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    limit: int,
    on_kept: Callable[[bytes], None] | None = None,
) -> tuple[str, int]:
    """Read the pipe `fd` to its end (closing it), keeping `limit` bytes and
    passing each piece it keeps to `on_kept`.

    It reads with `add_reader` and `os.read`, not `connect_read_pipe`,
    because uvloop's `connect_read_pipe` closes the descriptor twice (libuv
    and the file object each close it). In a worker with threads, the second
    close can hit a descriptor that another thread opened in between.
    """
    kept = bytearray()
    dropped = 0
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        nonlocal dropped
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as error:
            if not ended.done():
                ended.set_exception(error)
            return
        if not chunk:
            if not ended.done():
                ended.set_result(None)
            return
        room = limit - len(kept)
        if room > 0:
            kept.extend(chunk[:room])
            if on_kept is not None:
                on_kept(chunk[:room])
        dropped += max(0, len(chunk) - max(room, 0))

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return _captured(kept, dropped)


def _remove_tree(path: Path) -> None:
    """Remove the folder `path` with everything below it; a missing one is fine.

    Code in a sandbox owns its files and may leave folders without write or
    search permission (`chmod -w`, as Go's module cache does), whose entries
    a worker that is not root cannot remove. Such folders are given their
    owner's permissions back and the removal runs once more. Symlinks are
    removed, never followed.

    Raises:
        OSError: the first entry that the second pass could not remove.
    """
    failures: list[OSError] = []

    def record(error: BaseException) -> None:
        # An entry removed meanwhile (by the sandbox's anchor) is no failure.
        if isinstance(error, FileNotFoundError):
            return
        if not isinstance(error, OSError):
            raise error
        failures.append(error)

    for attempt in range(2):
        if attempt:
            _restore_owner_permissions(path)
        failures.clear()
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda _f, _p, error: record(error))
        else:
            shutil.rmtree(path, onerror=lambda _f, _p, info: record(info[1]))
        if not failures:
            return
    raise failures[0]


def _restore_owner_permissions(path: Path) -> None:
    """Give `path` and every folder below it read, write and search
    permission for its owner, without following symlinks.

    The sandbox's processes are dead by the time its files are removed, so
    nothing can swap a symlink in between the `lstat` and the `chmod`.
    """
    folders = [str(path)]
    while folders:
        folder = folders.pop()
        with contextlib.suppress(OSError):
            mode = os.lstat(folder).st_mode
            if not stat.S_ISDIR(mode):
                continue
            os.chmod(folder, stat.S_IMODE(mode) | stat.S_IRWXU)
            with os.scandir(folder) as entries:
                folders += [e.path for e in entries if e.is_dir(follow_symlinks=False)]


# How often a running program's sandbox folder is measured against the disk
# limit. A walk of a folder of some thousand files takes a few milliseconds.
_DISK_CHECK_SECONDS = 1.0


@functools.cache
def _bwrap_sizes_tmpfs(bwrap: str) -> bool:
    """Return whether this bubblewrap takes `--size` for a tmpfs (0.8 on)."""
    try:
        help_text = subprocess.run(
            [bwrap, "--help"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in help_text.stdout + help_text.stderr


def _folder_bytes(folder: Path) -> int:
    """Return the disk that the files below `folder` take (allocated blocks,
    so a sparse file counts what it uses), without following links."""
    total = 0
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += info.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return total


def _remove_cgroup(cgroup: Path) -> None:
    """Kill what is left in a sandbox's pids cgroup and remove it.

    `rmdir` fails while a process is in it, and a killed process leaves it
    only once the kernel has ended it, so this tries for up to a second. A
    cgroup still there after that is removed by the sweep in
    `_make_pids_cgroup` when the next sandbox starts.
    """
    if not cgroup.name.startswith("nexus-sandbox-"):
        return  # only ever a cgroup that this backend made
    deadline = time.monotonic() + 1.0
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                logger.debug("pids cgroup %s is still busy; left for the sweep", cgroup)
                return
        with contextlib.suppress(OSError, ValueError):
            for line in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(line), signal.SIGKILL)
        time.sleep(0.02)


def _real_path(path: Path) -> str:
    """Return `path` as the kernel shows a process's cwd: absolute, with no
    symlinks."""
    return os.path.realpath(path)


def _anchor_processes(root: str) -> dict[int, str]:
    """Return the cwd of each anchor process whose cwd is below `root`, by pid.

    A process is an anchor by its command line (`/bin/sh -c SCRIPT
    nexus-sandbox-anchor ...`) and its cwd, a sandbox folder, together. The
    cwd of a removed folder ends with `_DELETED`. Processes whose cwd cannot
    be read (another user's, without root) are skipped.
    """
    prefix = f"{root}/"
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            if not cwd.startswith(prefix):
                continue
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"/bin/sh", b"-c"] and argv[3:4] == [_ANCHOR_NAME.encode()]:
            found[int(name)] = cwd
    return found


def _sandbox_cgroup_of(pid: int) -> Path | None:
    """Return the pids cgroup that `_make_pids_cgroup` made and `pid` is in,
    or None."""
    root = _pids_cgroup_root()
    if root is None:
        return None
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name = line.rsplit("/", 1)[-1]
        if name.startswith("nexus-sandbox-") and (root / name).is_dir():
            return root / name
    return None


def _kill_tree(pid: int) -> None:
    """SIGKILL the group of `pid` and every process below `pid`.

    Without bubblewrap's PID namespace, a program that called `setsid` is
    in no group of ours; it is found through its parent links.
    """
    for _ in range(3):
        found = descendants(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for child in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        if not found:
            return


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
    return _captured(kept, dropped)


def _captured(kept: bytearray, dropped: int) -> tuple[str, int]:
    """Return the kept output as text, with a marker when bytes were dropped.

    A cut that split a character drops its first bytes too, so the text does
    not end in a replacement character that the program never wrote.
    """
    if dropped:
        end = _utf8_complete_end(kept)
        dropped += len(kept) - end
        del kept[end:]
    text = kept.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[output truncated: {dropped} bytes dropped]"
    return text, dropped


def _utf8_complete_end(data: bytes | bytearray) -> int:
    """Return the length of `data` without a UTF-8 sequence cut at its end."""
    # The incremental decoder keeps an incomplete last sequence buffered.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data, final=False)
    pending, _ = decoder.getstate()
    return len(data) - len(pending)


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


def _reply_lines(data: bytes | bytearray, complete_only: bool = False) -> list[dict]:
    """Parse the runner's reply lines in `data` and return the JSON objects.

    With `complete_only`, a last line without its newline is left out,
    because it may still be arriving.
    """
    chunks = bytes(data).split(b"\n")
    if complete_only:
        chunks = chunks[:-1]
    lines = [json.loads(chunk) for chunk in chunks if chunk.strip()]
    return [line for line in lines if isinstance(line, dict)]
