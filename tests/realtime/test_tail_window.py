"""The shared tail window serves every cursor exactly what the log holds."""

import threading

import pytest

from app.realtime import service
from app.realtime.service import fetch_changes, fetch_page
from tests.realtime.helpers import create_items, insert_items


def ids_after(url: str, after: int) -> list[int]:
    return [c.id for c in fetch_changes(url, "items", after, service.SCAN_PAGE)]


def test_window_matches_the_log_from_any_cursor(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "SCAN_PAGE", 10)
    monkeypatch.setattr(service, "WINDOW_CHANGES", 30)
    create_items(database_url)
    insert_items(database_url, [{"name": f"r{i}", "n": i} for i in range(25)])
    first = ids_after(database_url, 0)[0] - 1
    # A subscriber at the start fills the window; it then grows at the tail.
    assert [c.id for c in fetch_page(database_url, "items", first)] == ids_after(
        database_url, first
    )
    cursor = first
    seen: list[int] = []
    for batch in range(6):
        insert_items(database_url, [{"name": f"b{batch}", "n": batch}] * 15)
        while page := fetch_page(database_url, "items", cursor):
            seen += [c.id for c in page]
            cursor = page[-1].id
    every = [c.id for c in fetch_changes(database_url, "items", first, 10_000)]
    assert seen == every
    # The window now holds only the newest changes: a cursor left far behind
    # reads the log itself, and every cursor gets the log's next page.
    for after in (first, first + 7, every[40], every[-12], every[-1]):
        assert [c.id for c in fetch_page(database_url, "items", after)] == ids_after(
            database_url, after
        ), after


def test_concurrent_readers_miss_nothing(database_url: str) -> None:
    create_items(database_url)
    insert_items(database_url, [{"name": "start", "n": 0}])
    start = ids_after(database_url, 0)[0]
    results: list[list[int]] = [[] for _ in range(4)]
    done = threading.Event()

    def read(index: int) -> None:
        cursor = start
        while True:
            page = fetch_page(database_url, "items", cursor)
            results[index] += [c.id for c in page]
            if page:
                cursor = page[-1].id
            elif done.is_set() and not ids_after(database_url, cursor):
                return

    readers = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for reader in readers:
        reader.start()
    for batch in range(40):
        insert_items(database_url, [{"name": f"c{batch}", "n": n} for n in range(7)])
    done.set()
    for reader in readers:
        reader.join(timeout=60)
    expected = [c.id for c in fetch_changes(database_url, "items", start, 10_000)]
    assert len(expected) == 280
    assert all(result == expected for result in results)
