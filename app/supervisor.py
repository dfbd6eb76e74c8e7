"""`nexus up`: the embedded server, every typed worker and the HTTP/MCP server
in one command, all stopped together."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from app.api.keys import ensure_default_key
from app.contracts.queues import ALL_QUEUES
from app.datalock import DataFolderLock
from app.db.migrate import upgrade
from app.processes import STABLE_SECONDS, ManagedProcess, restart_delay, stop_all
from app.settings import Settings, keep_private
from app.temporal.devserver import EmbeddedServerError, EmbeddedTemporal

logger = logging.getLogger(__name__)


def worker_processes(
    settings: Settings, address: str, queues: Sequence[str] = ALL_QUEUES
) -> list[ManagedProcess]:
    """One process per queue, so JAX training never shares a GIL with workflow
    tasks and a crashed worker takes down only its own queue."""
    env = {**os.environ, "NEXUS_TEMPORAL_ADDRESS": address}
    logs = settings.resolved_data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return [
        ManagedProcess(
            f"worker {queue}",
            [sys.executable, "-m", "workers", "--queue", queue],
            env=env,
            log_path=logs / f"{queue}.log",
        )
        for queue in queues
    ]


def api_process(settings: Settings, address: str) -> ManagedProcess | None:
    """The HTTP and streamable MCP server, once the `app.api` package exists."""
    if importlib.util.find_spec("app.api") is None:
        return None
    env = {**os.environ, "NEXUS_TEMPORAL_ADDRESS": address}
    logs = settings.resolved_data_dir / "logs"
    return ManagedProcess(
        "http server",
        [sys.executable, "-m", "app.api"],
        env=env,
        log_path=logs / "http.log",
    )


class HttpPortInUseError(EmbeddedServerError):
    """The HTTP server's port is taken; the message names it and the fix."""


# Seconds that a stopping worker has to finish its activities (its graceful
# shutdown takes 10 s) before it is killed.
STOP_SECONDS = 20.0


class Stack:
    """The embedded server (when no address is set), the workers and the HTTP
    server, started and stopped as one unit. `serve_api=False` leaves the
    HTTP server out, for commands that use only the workers."""

    def __init__(self, settings: Settings, *, serve_api: bool = True) -> None:
        self.settings = settings
        self.server: EmbeddedTemporal | None = None
        self.address = settings.effective_temporal_address
        self.children: list[ManagedProcess] = []
        self.want_api = serve_api
        self.serves_api = False
        self.server_started_at = 0.0
        self.server_failures = 0
        self.server_restart_at: float | None = None

    def start(self) -> str:
        """Migrate, start everything and return the Temporal address.

        Raises:
            EmbeddedServerError: a port is taken (checked before anything is
                written or started) or the server did not start.
        """
        if self.want_api:
            self._check_http_port()
        if self.settings.embedded:
            self.server = EmbeddedTemporal(self.settings)
            # Every port is checked before the database is migrated or a key
            # is written, so that a failed start leaves the data folder as it was.
            asyncio.run(self.server.check_startable())
        upgrade(self.settings.effective_database_url)
        if self.want_api:
            # Here rather than in the HTTP process, whose stderr goes to a
            # log file, so that this terminal shows where a new key is.
            ensure_default_key(self.settings)
        if self.server is not None:
            self.address = asyncio.run(self.server.start())
            self.server_started_at = time.monotonic()
        self.children = worker_processes(self.settings, self.address)
        api = api_process(self.settings, self.address) if self.want_api else None
        if api is not None:
            self.children.append(api)
            self.serves_api = True
        for child in self.children:
            child.start()
        return self.address

    def _check_http_port(self) -> None:
        # The HTTP server would die at its bind with the error only in its
        # log, while everything else ran on without it.
        host, port = self.settings.http_host, self.settings.http_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                raise HttpPortInUseError(
                    f"the HTTP port {port} on {host} cannot be used "
                    f"({error.strerror}); stop the process that listens there, or "
                    "set NEXUS_HTTP_PORT to a free port"
                ) from None

    def supervise(self) -> None:
        """Restart the embedded server and children that died; call this
        about once a second."""
        self._restart_server_if_exited()
        for child in self.children:
            child.poll_and_restart()

    def _restart_server_if_exited(self) -> None:
        """Restart the embedded server that this stack started, with the
        workers' back-off, when it exited.

        A restart rather than a stop of `nexus up`, because the history is
        in temporal.db and the workers and the HTTP server reconnect on their
        own, so runs go on where they were.
        """
        server = self.server
        if server is None or server.reused:
            return
        now = time.monotonic()
        if self.server_restart_at is None:
            ended = server.reap()
            if ended is None:
                return
            if now - self.server_started_at >= STABLE_SECONDS:
                self.server_failures = 0
            self.server_failures += 1
            delay = restart_delay(self.server_failures)
            logger.error("%s; restarting it in %.0f s", ended, delay)
            self.server_restart_at = now + delay
        if now < self.server_restart_at:
            return
        self.server_restart_at = None
        try:
            # NOTE: this blocks the supervisor, and so a stop request, until
            # the server responds or its start times out (60 s).
            asyncio.run(server.start())
        except EmbeddedServerError as error:
            self.server_failures += 1
            delay = restart_delay(self.server_failures)
            logger.error(
                "failed to restart the embedded Temporal server (%s); trying "
                "again in %.0f s",
                error,
                delay,
            )
            self.server_restart_at = time.monotonic() + delay
            return
        self.server_started_at = time.monotonic()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop every child, killing those that have not drained their work
        within `timeout` seconds, then the embedded server."""
        if self.children:
            # A start refused before any child (a locked data folder, a busy
            # port) prints its one-line error alone.
            logger.info("stopping %d processes", len(self.children))
        stop_all(self.children, timeout)
        self.children = []
        if self.server is not None:
            self.server.stop()
            self.server = None


def http_url(settings: Settings) -> str:
    """Return the base URL of the HTTP API that `nexus up` serves."""
    scheme = "https" if settings.tls_cert and settings.tls_key else "http"
    host = settings.http_host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.http_port}"


def address_lines(settings: Settings, stack: Stack) -> list[str]:
    """Return the lines that tell where each part of a started stack is."""
    lines = [f"Temporal   {stack.address} (namespace {settings.namespace})"]
    server = stack.server
    if server is not None and not server.reused:
        lines.append(f"Web UI     {server.ui_url}")
    elif server is not None and server.reused_ui_url is not None:
        lines.append(f"Web UI     {server.reused_ui_url} (of the reused server)")
    if stack.serves_api:
        base = http_url(settings)
        lines.append(f"HTTP API   {base} (POST /api/tools/TOOL, /openapi.json)")
        lines.append(f"MCP        {base}/mcp")
    lines.append(f"Database   {settings.masked()['database_url']}")
    lines.append(f"Logs       {settings.resolved_data_dir / 'logs'}")
    return lines


def reports_folder_warning(settings: Settings) -> str | None:
    """Return why the workers cannot write benchmark reports, or None. The
    workers take this process's settings, and every benchmark run on them
    would fail at its first step."""
    from app.benchmark.report import ReportsFolderError, check_reports_writable

    try:
        check_reports_writable(settings, workers=True)
    except ReportsFolderError as error:
        return f"{error}; until then every benchmark run fails at its start"
    return None


def run_up(settings: Settings, *, stop_event: threading.Event | None = None) -> int:
    """Run everything until SIGINT or SIGTERM (or `stop_event`), then stop it all."""
    stop = stop_event or threading.Event()
    stack = Stack(settings)
    lock = DataFolderLock(settings.resolved_data_dir)
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        keep_private(settings.resolved_data_dir)
        # Taken before the ports are checked, so that a second `nexus up` of
        # this folder gets this error whatever its ports are.
        lock.acquire(
            {"Temporal": stack.address, "HTTP API": http_url(settings)},
        )
        stack.start()
        for line in address_lines(settings, stack):
            print(line, file=sys.stderr)
        warning = reports_folder_warning(settings)
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
        print("Press Ctrl-C to stop.", file=sys.stderr)
        while not stop.wait(1.0):
            stack.supervise()
    finally:
        stack.stop()
        lock.release()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("nexus up stopped")
    return 0
