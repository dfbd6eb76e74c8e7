"""Start the HTTP server: migrations, the default key, TLS, uvicorn."""

from __future__ import annotations

import logging
import sys
from typing import Any

import uvicorn

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
        ValueError: only one of the two TLS settings is set, or a file is missing.
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
        options["ssl_certfile"] = str(cert)
        options["ssl_keyfile"] = str(key)
    return options


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
    uvicorn.run(
        create_app(settings),
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        **options,
    )
