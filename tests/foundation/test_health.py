from temporalio.client import Client

from app.contracts.queues import ALL_QUEUES
from app.services.health import system_health
from app.settings import Settings


async def test_health_sees_every_queue_poller(
    client: Client, workers: Settings
) -> None:
    report = await system_health(workers, client)
    assert report.status == "healthy", report.model_dump_json(indent=2)
    assert report.database.status == "healthy"
    assert report.database.latency_ms is not None
    assert report.temporal.namespace_state == "REGISTERED"
    assert report.temporal.server_version
    for queue in ALL_QUEUES:
        pollers = report.workers[queue].activity_pollers
        assert pollers, f"no activity poller on {queue}"
        assert pollers[0].identity.startswith(queue)
    assert report.memory.rss > 0
    assert report.uptime >= 0
    dumped = report.model_dump(mode="json", by_alias=True)
    assert {"heapTotal", "heapUsed", "rss"} <= dumped["memory"].keys()


async def test_health_without_temporal_is_unhealthy(settings: Settings) -> None:
    report = await system_health(settings, None)
    assert report.status == "unhealthy"
    assert report.temporal.status == "unhealthy"
    assert report.database.status == "healthy"
    assert all(q.status == "unhealthy" for q in report.workers.values())


async def test_health_with_dead_database(tmp_path, client: Client) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
    )
    report = await system_health(settings, client)
    assert report.status == "unhealthy"
    assert report.database.status == "unhealthy"
    assert report.database.error
    assert "nobody@127.0.0.1:1" in report.database.url
