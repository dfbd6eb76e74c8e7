"""The one way every caller (CLI, API, workers, tests) connects to Temporal."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from app.settings import Settings
from app.temporal.converter import nexus_data_converter

logger = logging.getLogger(__name__)

# Capabilities that need a payload codec (the secrets codec) register a
# factory here; `build_data_converter` applies it to the pydantic converter
# of app/temporal/converter.py.
_codec_factories: list[Callable[[Settings, DataConverter], DataConverter]] = []


def register_converter_hook(
    hook: Callable[[Settings, DataConverter], DataConverter],
) -> None:
    if hook not in _codec_factories:
        _codec_factories.append(hook)


def build_data_converter(settings: Settings) -> DataConverter:
    converter = nexus_data_converter
    for hook in _codec_factories:
        converter = hook(settings, converter)
    return converter


@functools.cache
def quiet_runtime() -> Runtime:
    """Return a runtime whose SDK core logs errors only. The default runtime
    prints a coloured WARN line to stderr for every retried gRPC call, which
    breaks into the progress bars of a command while its server is down."""
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    return Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=quiet)))


async def connect(
    settings: Settings,
    *,
    address: str | None = None,
    wait_seconds: float = 0.0,
    identity: str | None = None,
    runtime: Runtime | None = None,
) -> Client:
    """Connect to the configured Temporal frontend.

    Args:
        settings: where to connect and which namespace to use.
        address: overrides the settings' address (tests pass their server's).
        wait_seconds: keep retrying this long while the server is not up yet.
        identity: worker or client identity shown in the web UI.
        runtime: the SDK runtime of the client; None uses the default one.

    Raises:
        RuntimeError: the frontend did not answer in time; the message names
            the address.
    """
    target = address or settings.effective_temporal_address
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        try:
            kwargs: dict[str, object] = {}
            if identity:
                kwargs["identity"] = identity
            return await Client.connect(
                target,
                namespace=settings.namespace,
                data_converter=build_data_converter(settings),
                runtime=runtime,
                **kwargs,  # type: ignore[arg-type]
            )
        except RuntimeError as error:
            if asyncio.get_running_loop().time() >= deadline:
                raise RuntimeError(
                    f"cannot reach Temporal at {target}: {error}; start it with "
                    "`nexus up`, or set NEXUS_TEMPORAL_ADDRESS to a running frontend"
                ) from error
            logger.debug("Temporal at %s not reachable yet: %s", target, error)
            await asyncio.sleep(0.5)
