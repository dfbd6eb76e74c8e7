"""Logging to stderr, so that stdout stays free for MCP protocol messages."""

import logging
import sys

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
