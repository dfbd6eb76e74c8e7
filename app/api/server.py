"""Start the HTTP server: migrations, the default key, TLS, uvicorn."""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from app.api.calls import ToolRunner
from app.api.http import create_app
from app.api.keys import ensure_default_key
from app.db.migrate import upgrade
from app.logs import configure_logging
from app.settings import Settings, settings_or_exit

logger = logging.getLogger(__name__)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Host, port and TLS options; TLS needs both NEXUS_TLS_CERT and
    NEXUS_TLS_KEY.

    Raises:
        ValueError: only one of the two TLS settings is set, or a file is
            missing or invalid.
    """
    options: dict[str, Any] = {"host": settings.http_host, "port": settings.http_port}
    cert, key = settings.tls_cert, settings.tls_key
    if (cert is None) != (key is None):
        raise ValueError(
            "TLS needs both NEXUS_TLS_CERT and NEXUS_TLS_KEY; set both, or neither "
            "to serve plain HTTP"
        )
    if cert is not None and key is not None:
        for name, path in (("NEXUS_TLS_CERT", cert), ("NEXUS_TLS_KEY", key)):
            if not path.is_file():
                raise ValueError(f"{name}={path} is not a file; point it at a PEM file")
        _check_tls_files(cert, key)
        options["ssl_certfile"] = str(cert)
        options["ssl_keyfile"] = str(key)
    return options


def _check_tls_files(cert: Path, key: Path) -> None:
    """Load the certificate and key as uvicorn will, so that a bad file is a
    one-line error naming its setting instead of a traceback at startup.

    Raises:
        ValueError: a file cannot be read, is not PEM of its kind, or the
            key does not belong to the certificate.
    """
    markers = (
        ("NEXUS_TLS_CERT", cert, "-----BEGIN CERTIFICATE-----", "a PEM certificate"),
        ("NEXUS_TLS_KEY", key, "PRIVATE KEY-----", "a PEM private key"),
    )
    for name, path, marker, kind in markers:
        try:
            text = path.read_text(errors="replace")
        except OSError as error:
            raise ValueError(
                f"{name}={path} cannot be read ({error.strerror}); make it "
                "readable by this user"
            ) from None
        if marker not in text:
            raise ValueError(
                f"{name}={path} is not {kind} (no {marker!r} line); point it at "
                f"{kind} file"
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password makes an encrypted key fail here instead of
        # prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        raise ValueError(
            f"NEXUS_TLS_CERT={cert} and NEXUS_TLS_KEY={key} cannot be loaded "
            f"together ({error.reason or error}); the key must be the "
            "certificate's unencrypted private key"
        ) from None


def main() -> None:
    settings = settings_or_exit()
    configure_logging(settings.log_level)
    try:
        options = uvicorn_options(settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    upgrade(settings.effective_database_url)
    ensure_default_key(settings)
    scheme = "https" if "ssl_certfile" in options else "http"
    logger.info(
        "HTTP API at %s://%s:%d (MCP at /mcp)",
        scheme,
        settings.http_host,
        settings.http_port,
    )
    application = create_app(settings)
    config = uvicorn.Config(
        application,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        **options,
    )
    StoppingServer(config, application.state.runner).run()


class StoppingServer(uvicorn.Server):
    """uvicorn's server, which also notifies the tool runner when a stop signal
    arrives: uvicorn waits for every request in flight before it exits, and
    the runner responds to those that outlast its grace (see `ToolRunner`)."""

    def __init__(self, config: uvicorn.Config, runner: ToolRunner) -> None:
        super().__init__(config)
        self.runner = runner

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runner.begin_stop()
        super().handle_exit(sig, frame)
