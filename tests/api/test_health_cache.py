"""The shared system_health reading of the HTTP server."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from app.contracts.system import HealthReport
from app.services.health import system_health
from app.services.health_cache import HealthSnapshots
from app.settings import Settings
from tests.api.conftest import ApiServer
from tests.api.test_http import post


class CountingProbe:
    """A real health reading that counts how often it ran."""

    def __init__(self, settings: Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self.calls = 0

    async def __call__(self) -> HealthReport:
        self.calls += 1
        return await system_health(self.settings, self.client)


async def test_reading_reused_with_age(client: Client, settings: Settings) -> None:
    probe = CountingProbe(settings, client)
    snapshots = HealthSnapshots(max_age=3600)
    first = await snapshots.read(probe)
    second = await snapshots.read(probe)
    assert probe.calls == 1
    assert first.age_seconds == 0.0
    assert second.timestamp == first.timestamp
    assert second.age_seconds >= 0.0
    assert second.database == first.database


async def test_concurrent_callers_share_reading(
    client: Client, settings: Settings
) -> None:
    probe = CountingProbe(settings, client)
    snapshots = HealthSnapshots(max_age=3600)
    reports = await asyncio.gather(*(snapshots.read(probe) for _ in range(10)))
    assert probe.calls == 1
    assert len({report.timestamp for report in reports}) == 1


async def test_old_reading_renewed(client: Client, settings: Settings) -> None:
    probe = CountingProbe(settings, client)
    snapshots = HealthSnapshots(max_age=3600)
    first = await snapshots.read(probe)
    # Past half its life: returned once more while a new reading starts.
    snapshots._read_at -= 2000
    aged = await snapshots.read(probe)
    assert aged.timestamp == first.timestamp
    assert aged.age_seconds >= 2000
    assert snapshots._reading is not None
    renewed = await snapshots._reading
    assert probe.calls == 2
    assert renewed.timestamp > first.timestamp
    # Past its life: the caller waits for a new reading.
    snapshots._read_at -= 4000
    fresh = await snapshots.read(probe)
    assert probe.calls == 3
    assert fresh.age_seconds == 0.0


async def test_zero_max_age_reads_live(client: Client, settings: Settings) -> None:
    probe = CountingProbe(settings, client)
    snapshots = HealthSnapshots(max_age=0)
    for _ in range(3):
        report = await snapshots.read(probe)
        assert report.age_seconds == 0.0
    assert probe.calls == 3


async def test_server_health_states_age(api_server: ApiServer) -> None:
    response = await post(api_server, "/api/tools/system_health", {})
    assert response.status_code == 200
    age = response.json()["age_seconds"]
    assert 0.0 <= age <= api_server.settings.api_health_max_age_seconds
