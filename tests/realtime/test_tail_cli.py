"""`nexus realtime tail`: it deletes its subscription however it is stopped,
and `--count` stops it after exactly that many events."""

import json
import os
import select
import signal
import subprocess
import sys
import time

from app.realtime.service import list_subscriptions
from app.settings import Settings
from tests.realtime.helpers import create_items, insert_items


def start_tail(settings: Settings, *options: str) -> subprocess.Popen[str]:
    """Start `nexus realtime tail items OPTIONS` and wait until it subscribed."""
    environment = {
        **os.environ,
        "NEXUS_DATA_DIR": str(settings.data_dir),
        "NEXUS_DATABASE_URL": settings.effective_database_url,
        "NEXUS_TEMPORAL_ADDRESS": settings.temporal_address or "",
        "NEXUS_ENCRYPTION_KEY": settings.encryption_key.get_secret_value()
        if settings.encryption_key
        else "",
    }
    tail = subprocess.Popen(
        [sys.executable, "-m", "app", "realtime", "tail", "items", *options],
        env=environment,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tail.stderr is not None
    deadline = time.monotonic() + 60
    subscribed = ""
    while "subscribed as" not in subscribed and time.monotonic() < deadline:
        ready, _, _ = select.select([tail.stderr], [], [], 1.0)
        if ready:
            subscribed += tail.stderr.readline()
    if "subscribed as" not in subscribed:
        tail.kill()
        raise AssertionError(f"tail did not subscribe within 60 s: {subscribed!r}")
    return tail


def test_tail_sigterm_deletes_subscription(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    tail = start_tail(settings, "--filter", "n=gt.1")
    try:
        assert [s.table for s in list_subscriptions(url)] == ["items"]
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(timeout=60) == 0
    finally:
        if tail.poll() is None:
            tail.kill()
    assert list_subscriptions(url) == []


def test_tail_count_prints_exactly_that_many(settings: Settings) -> None:
    url = settings.effective_database_url
    create_items(url)
    tail = start_tail(settings, "--count", "2")
    try:
        # One transaction, so all four arrive in one batch.
        insert_items(url, [{"name": f"tail-{i}", "n": i} for i in range(4)])
        out, _ = tail.communicate(timeout=60)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0
    printed = [json.loads(line) for line in out.splitlines()]
    assert [event["new"]["n"] for event in printed] == [0, 1]
    assert list_subscriptions(url) == []


def test_tail_count_below_one_rejected() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    for value in ("0", "-1"):
        result = CliRunner().invoke(
            cli, ["realtime", "tail", "items", "--count", value]
        )
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--count'" in result.output
