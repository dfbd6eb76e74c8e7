"""Real components for the whole suite: one Temporal dev server, one
time-skipping server, one throwaway PostgreSQL, fresh databases per test."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from app.contracts.queues import ALL_QUEUES, NEURAL
from app.db import dispose_engines
from app.db.migrate import upgrade
from app.settings import Settings, get_settings
from app.temporal.client import build_data_converter, connect
from app.temporal.devserver import temporal_binary
from app.temporal.search_attributes import dev_server_args
from tests.support.postgres import TemporaryPostgres

# A fixed key, so every client of the session decodes every payload.
TEST_ENCRYPTION_KEY = "bmV4dXMtdGVzdC1rZXktMzItYnl0ZXMtbG9uZyEhISE="


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nexus")


@pytest.fixture(scope="session", autouse=True)
def stop_leftover_sandboxes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """Kill the timeout anchors of local sandboxes that tests left behind.

    A test that terminates a session workflow leaves its sandbox to expire at
    its timeout, as E2B would; this stops those anchors when the suite ends.
    """
    yield
    base = str(tmp_path_factory.getbasetemp())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv]
        if "nexus-sandbox-anchor" in words and any(w.startswith(base) for w in words):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="session", autouse=True)
def interruptible_commands() -> None:
    """Let the commands that tests start take Ctrl-C.

    A shell starts a background job (`make test &`) with SIGINT ignored, and
    every program started below inherits that, so a CLI would ignore the
    SIGINT a test sends it as a terminal's Ctrl-C. A handler, unlike an
    ignored signal, is reset to the default in a started program.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """Put back the root logger's handlers and level after each test.

    A CLI command run through `CliRunner` calls `configure_logging`, which
    binds a handler to the runner's stderr. That stream is closed once the
    command returns, so later tests' log records would print a logging
    error into whatever stderr they capture.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def fresh_process_settings() -> Iterator[None]:
    """Make each test's CLI commands read the environment again.

    `get_settings` reads it once per process, so a command run in process by
    `CliRunner(env=...)` would otherwise get the settings of the first test
    that ran one: its data folder, database and ports.
    """
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def session_settings(session_dir: Path) -> Settings:
    """Settings for the session's shared workers: SQLite in a session folder."""
    settings = Settings(
        data_dir=session_dir,
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
        temporal_address="127.0.0.1:1",  # replaced once the dev server is up
    )
    upgrade(settings.effective_database_url)
    return settings


@pytest.fixture(scope="session")
async def temporal_env(
    session_settings: Settings,
) -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal_binary()),
        data_converter=build_data_converter(session_settings),
        dev_server_extra_args=dev_server_args(),
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_address(temporal_env: WorkflowEnvironment) -> str:
    return str(temporal_env.client.service_client.config.target_host)


@pytest.fixture(scope="session")
def shared_settings(session_settings: Settings, temporal_address: str) -> Settings:
    return session_settings.model_copy(update={"temporal_address": temporal_address})


@pytest.fixture(scope="session")
async def client(shared_settings: Settings) -> Client:
    return await connect(shared_settings)


@pytest.fixture(scope="session")
async def time_skipping_env(
    session_settings: Settings,
) -> AsyncIterator[WorkflowEnvironment]:
    binary = Path(str(temporal_binary())).with_name("temporal-test-server")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(binary),
        data_converter=build_data_converter(session_settings),
    )
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class PostgresHandle:
    admin_url: str
    server: TemporaryPostgres | None = None


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresHandle]:
    """A PostgreSQL server: NEXUS_TEST_DATABASE_URL, or one that this session
    starts and removes (`server` is set then, so a test can restart it)."""
    configured = os.environ.get("NEXUS_TEST_DATABASE_URL")
    if configured:
        yield PostgresHandle(configured)
        return
    server = TemporaryPostgres()
    server.start()
    try:
        yield PostgresHandle(server.admin_url, server)
    finally:
        dispose_engines()
        server.stop()


@pytest.fixture
def restartable(request: pytest.FixtureRequest) -> PostgresHandle:
    """The session's PostgreSQL server, which a test may stop and start; the
    test is skipped where NEXUS_TEST_DATABASE_URL names another server."""
    handle: PostgresHandle = request.getfixturevalue("postgres")
    if handle.server is None:
        pytest.skip("needs a PostgreSQL started by the test setup, to restart it")
    return handle


@contextlib.asynccontextmanager
async def postgres_stopped(handle: PostgresHandle) -> AsyncIterator[None]:
    """Stop the PostgreSQL server of `handle` for the body of the block, and
    start it again at the end, even when the body fails."""
    assert handle.server is not None
    server = handle.server
    await asyncio.to_thread(server.pg_ctl, "stop")
    try:
        yield
    finally:
        await asyncio.to_thread(server.pg_ctl, "start")


def _fresh_postgres_database(admin_url: str) -> tuple[str, str]:
    name = f"nexus_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    base = admin_url.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def _drop_postgres_database(admin_url: str, name: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def _fresh_database(
    request: pytest.FixtureRequest, tmp_path: Path, *, migrate: bool
) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nexus.db'}"
        if migrate:
            upgrade(url)
        yield url
        return
    admin_url = request.getfixturevalue("postgres").admin_url
    name, url = _fresh_postgres_database(admin_url)
    if migrate:
        upgrade(url)
    try:
        yield url
    finally:
        dispose_engines()
        _drop_postgres_database(admin_url, name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database on each backend."""
    yield from _fresh_database(request, tmp_path, migrate=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on each backend that no migration has touched."""
    yield from _fresh_database(request, tmp_path, migrate=False)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, temporal_address: str) -> Settings:
    """Settings of one test: its own data folder and database on each backend,
    the session's Temporal server."""
    return Settings(
        data_dir=tmp_path,
        reports_dir=tmp_path / "reports",
        database_url=database_url,
        temporal_address=temporal_address,
        encryption_key=TEST_ENCRYPTION_KEY,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_workers(
    client: Client,
    settings: Settings,
    queues: Sequence[str] = ALL_QUEUES,
    *,
    graceful_shutdown_timeout: timedelta | None = None,
) -> AsyncIterator[None]:
    """Run the project's typed workers for `queues` in this process, with the
    audit writer of a worker process. At the end they stop as under `nexus
    up`, with the running activities cancelled after
    `graceful_shutdown_timeout` (default: the workers' own)."""
    from workers.run import GRACEFUL_SHUTDOWN_TIMEOUT, build_worker, worker_audit

    grace = (
        GRACEFUL_SHUTDOWN_TIMEOUT
        if graceful_shutdown_timeout is None
        else graceful_shutdown_timeout
    )
    workers = [
        build_worker(client, settings, queue, graceful_shutdown_timeout=grace)
        for queue in queues
    ]
    async with contextlib.AsyncExitStack() as stack:
        # Entered first, so it writes its queued events after the workers
        # stopped, as in a worker process.
        await stack.enter_async_context(worker_audit(settings))
        for worker in workers:
            await stack.enter_async_context(worker)
        await wait_for_pollers(client, settings.namespace, queues)
        if NEURAL in queues and settings.neural_embedded_nodes:
            # Cluster nodes deployed by the test get workers, as under nexus up.
            from workers.neural_nodes import NodeWorkerPool

            stop = asyncio.Event()
            pool = asyncio.create_task(NodeWorkerPool(client, settings, 0.5).run(stop))
            try:
                yield
            finally:
                stop.set()
                await pool
            return
        yield


async def wait_for_pollers(
    client: Client, namespace: str, queues: Sequence[str], timeout: float = 30.0
) -> None:
    """Wait until the server lists an activity poller on every queue."""
    from app.services.health import describe_queue

    deadline = asyncio.get_running_loop().time() + timeout
    pending = list(queues)
    while pending:
        described = [await describe_queue(client, namespace, q) for q in pending]
        pending = [
            q for q, h in zip(pending, described, strict=True) if not h.activity_pollers
        ]
        if pending and asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no poller appeared on {pending} in {timeout} s")
        if pending:
            await asyncio.sleep(0.1)


@pytest.fixture
async def workers(client: Client, settings: Settings) -> AsyncIterator[Settings]:
    """Workers on every queue, bound to this test's settings."""
    async with running_workers(client, settings):
        yield settings
