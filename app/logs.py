"""Logging to stderr, so that stdout stays free for MCP protocol messages."""

import logging
import sys
import time
from collections.abc import Callable

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send every log record of this process to stderr at `level`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # The SDK core logs every poll at INFO; keep it at WARNING unless debugging.
    if level != "DEBUG":
        logging.getLogger("temporalio").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # Alembic logs its setup lines on every command that checks the schema.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # JAX logs each backend it could not start (such as 'tpu' without
        # libtpu) at INFO whenever it picks one.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


class RepeatedFailureLog:
    """Log the failures of a task that runs again and again (a periodic sync,
    a retried write) at a bounded rate.

    The first failure is logged with its traceback. While the failures go on,
    one line every `reminder_seconds` counts them, and one line reports when the
    task works again. A periodic loop that logged each failure wrote a
    traceback per run, every 2 s for as long as the database was down.

    Args:
        logger: the logger of the module that runs the task.
        task: the task as a noun phrase, such as "the sync of neural node
            workers".
        reminder_seconds: minimum seconds between two lines about one run of
            failures.
        clock: seconds from a monotonic clock.
    """

    def __init__(
        self,
        logger: logging.Logger,
        task: str,
        *,
        reminder_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.task = task
        self.reminder_seconds = reminder_seconds
        self.clock = clock
        self.failures = 0
        self._first_at = 0.0
        self._logged_at = 0.0
        self._logged_failures = 0

    def failed(self) -> None:
        """Count one failure; call it in the `except` block that caught it."""
        now = self.clock()
        self.failures += 1
        if self.failures == 1:
            self._first_at = self._logged_at = now
            self._logged_failures = 1
            self.logger.exception("%s failed; retrying", self.task)
            return
        if now - self._logged_at < self.reminder_seconds:
            return
        self.logger.error(
            "%s failed %d times in %.0f s, %d since the last line; the last "
            "error: %s; retrying",
            self.task,
            self.failures,
            now - self._first_at,
            self.failures - self._logged_failures,
            _last_error(),
        )
        self._logged_at = now
        self._logged_failures = self.failures

    def succeeded(self) -> None:
        """Note that the task worked; log it once after a run of failures."""
        if not self.failures:
            return
        self.logger.info(
            "%s works again after %d failures in %.0f s",
            self.task,
            self.failures,
            self.clock() - self._first_at,
        )
        self.failures = 0


def _last_error() -> str:
    """Return the exception being handled as `Type: message`, on one line."""
    error = sys.exc_info()[1]
    if error is None:
        return "unknown"
    # A database error's text can span lines (the SQL, a background link).
    first_line = str(error).strip().splitlines()[:1]
    return ": ".join([type(error).__name__, *first_line])
