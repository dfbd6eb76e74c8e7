"""A real HTTP server for the API tests: uvicorn on a free 127.0.0.1 port,
workers on every queue, and a fresh SQLite database."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from app.api.http import create_app
from app.api.keys import create_key, revoke_key
from app.db.migrate import upgrade
from app.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, running_workers
from tests.support.servers import ThreadedServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ApiServer:
    base_url: str
    settings: Settings
    token: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


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
    url = api_settings.effective_database_url
    token, info = create_key(url, "tests")
    port = free_port()
    try:
        async with running_workers(client, api_settings):
            with ThreadedServer(create_app(api_settings), port):
                yield ApiServer(
                    f"http://127.0.0.1:{port}", api_settings, token, info.id
                )
    finally:
        # The next module's server creates its own key named "tests", and no
        # two active keys may share a name.
        revoke_key(url, info.id)


@pytest.fixture
def key_factory(api_settings: Settings) -> Iterator[Any]:
    def make(name: str, groups: list[str] | None = None) -> tuple[str, str]:
        token, info = create_key(api_settings.effective_database_url, name, groups)
        return token, info.id

    yield make
