"""Child processes that end with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Move every object alive now out of the garbage collector's reach.

    Call it once a long-lived process has imported its modules and built
    its app, right before it serves. Those objects live as long as the
    process, yet a full collection scans them all. A realtime subscriber
    has about 120,000 of them, and its full collections took up to 110 ms
    on the 2-core development machine, delaying every event in flight.
    Frozen, a full collection scans only what was made since. Garbage is
    collected first, since a frozen cycle would never be freed.
    """
    gc.collect()
    gc.freeze()


def worker_identity(task_queue: str) -> str:
    """Return the identity a worker of `task_queue` in this process shows."""
    return f"{task_queue}@{socket.gethostname()}:{os.getpid()}"


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when its parent dies, so a
    killed supervisor leaves no process behind."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(
                pr_set_pdeathsig, signal.SIGTERM
            )


# A child that ran this long before it exited starts again at once: its
# exit is not part of a crash loop.
STABLE_SECONDS = 60.0
# The maximum wait between two starts of a child that keeps exiting.
MAX_BACKOFF_SECONDS = 60.0


def restart_delay(failures: int) -> float:
    """Return the seconds to wait before the start that follows `failures`
    quick exits in a row: none after the first, then 1, 2, 4 ... up to
    MAX_BACKOFF_SECONDS."""
    if failures <= 1:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, 2.0 ** (failures - 2))


class ManagedProcess:
    """One supervised child: started in its own process group, restarted with
    a back-off whenever it dies unexpectedly, stopped with SIGTERM and then
    SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        # Exits in a row of a child that ran for less than STABLE_SECONDS.
        self.failures = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.clock = clock

    def start(self) -> None:
        stdout = self.log_path.open("ab") if self.log_path else None
        try:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout else None,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            if stdout:
                stdout.close()
        self.started_at = self.clock()
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def poll_and_restart(self) -> None:
        """Restart the child if it exited, after a back-off that doubles with
        each quick exit in a row up to MAX_BACKOFF_SECONDS.

        A child is never given up on: a worker that exits while its database
        or Temporal is down starts again once they are back.
        """
        now = self.clock()
        if self.restart_at is None:
            process = self.process
            if process is None or process.poll() is None:
                return
            if now - self.started_at >= STABLE_SECONDS:
                self.failures = 0
            self.failures += 1
            delay = restart_delay(self.failures)
            logger.warning(
                "%s (pid %d) exited with code %s; restarting it in %.0f s "
                "(exit %d in a row)",
                self.name,
                process.pid,
                process.returncode,
                delay,
                self.failures,
            )
            self.restart_at = now + delay
        if now < self.restart_at:
            return
        self.restart_at = None
        try:
            self.start()
        except OSError as error:
            self.failures += 1
            delay = restart_delay(self.failures)
            logger.error(
                "failed to start %s (%s); trying again in %.0f s",
                self.name,
                error,
                delay,
            )
            self.restart_at = now + delay

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait for the child to exit; return False if it is still running."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


def stop_all(children: Sequence[ManagedProcess], timeout: float = 20.0) -> None:
    """SIGTERM every child at once, then SIGKILL those still running."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if not child.wait(max(0.0, deadline - time.monotonic())):
            logger.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
            child.signal(signal.SIGKILL)
            child.wait(5)
        logger.info("stopped %s", child.name)
