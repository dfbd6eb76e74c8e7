"""A real HTTP server for the API tests: uvicorn on a free 127.0.0.1 port,
workers on every queue, and a fresh SQLite database."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from temporalio.client import Client

from app.api.http import create_app
from app.api.keys import create_key
from app.db.migrate import upgrade
from app.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, running_workers

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ApiServer:
    base_url: str
    settings: Settings
    token: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class ThreadedServer:
    """uvicorn in a background thread with its own event loop."""

    def __init__(self, app: Any, port: int, **options: Any) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def server_env(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess that uses the same database and Temporal."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")
    }
    env.update(
        NEXUS_DATA_DIR=str(settings.data_dir),
        NEXUS_DATABASE_URL=settings.effective_database_url,
        NEXUS_TEMPORAL_ADDRESS=settings.effective_temporal_address,
        NEXUS_ENCRYPTION_KEY=TEST_ENCRYPTION_KEY,
        NEXUS_LOG_LEVEL="INFO",
    )
    return env


@pytest.fixture(scope="session")
def api_settings(
    tmp_path_factory: pytest.TempPathFactory, temporal_address: str
) -> Settings:
    data_dir = tmp_path_factory.mktemp("api")
    settings = Settings(
        data_dir=data_dir,
        temporal_address=temporal_address,
        encryption_key=TEST_ENCRYPTION_KEY,
        api_rate_limit=10_000,
        api_rate_burst=10_000,
    )
    upgrade(settings.effective_database_url)
    return settings


# Module scope, because the workers of this fixture must stop before another
# module's tests start their own on the same task queues.
@pytest.fixture(scope="module")
async def api_server(
    client: Client, api_settings: Settings
) -> AsyncIterator[ApiServer]:
    """The HTTP API with workers on every queue, so tools run end to end."""
    token, info = create_key(api_settings.effective_database_url, "tests")
    port = free_port()
    async with running_workers(client, api_settings):
        with ThreadedServer(create_app(api_settings), port):
            yield ApiServer(f"http://127.0.0.1:{port}", api_settings, token, info.id)


@pytest.fixture
def key_factory(api_settings: Settings) -> Iterator[Any]:
    def make(name: str, groups: list[str] | None = None) -> tuple[str, str]:
        token, info = create_key(api_settings.effective_database_url, name, groups)
        return token, info.id

    yield make
