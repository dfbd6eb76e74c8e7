"""Storage operations on one object at once: an upload and a delete leave
file and row together. Hooks pause one operation at the racy point, so each
interleaving happens on every run."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import app.storage.local as local
from app.db import get_engine
from app.settings import Settings
from app.storage.local import StorageFailure, storage_for
from app.tools import ToolContext, ToolError, invoke_tool, load_tools

load_tools()

OLD = b"A" * 1000
NEW = b"B" * 1000


def row(settings: Settings, bucket: str, path: str) -> tuple[Any, ...] | None:
    with get_engine(settings.effective_database_url).connect() as connection:
        found = connection.execute(
            text(
                "SELECT size, sha256, content_type FROM storage_objects "
                "WHERE bucket = :bucket AND path = :path"
            ),
            {"bucket": bucket, "path": path},
        ).first()
    return None if found is None else tuple(found)


def object_file(settings: Settings, bucket: str, path: str) -> Path:
    return settings.resolved_data_dir / "storage" / bucket / path


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_delete_waits_for_upload_in_progress(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(settings)
    storage.put("bkt", "o.txt", OLD, "text/csv")
    target = object_file(settings, "bkt", "o.txt")
    paused = threading.Event()
    resume = threading.Event()
    make_folders = local._make_folders

    # The upload holds its row lock here, before it renames its file.
    def pausing(*arguments: Any) -> None:
        paused.set()
        assert resume.wait(30)
        make_folders(*arguments)

    monkeypatch.setattr(local, "_make_folders", pausing)
    with ThreadPoolExecutor(max_workers=2) as pool:
        uploading = pool.submit(storage.put, "bkt", "o.txt", NEW, "text/csv")
        assert paused.wait(30)
        deleting = pool.submit(storage.delete, "bkt", "o.txt")
        # A delete that ignores the lock removes the old file at once. One
        # that waits for it leaves the file, and this wait runs out.
        wait_until(lambda: not target.exists(), timeout=1.0)
        resume.set()
        uploading.result(timeout=60)
        assert deleting.result(timeout=60) is True
    recorded = row(settings, "bkt", "o.txt")
    assert target.exists() == (recorded is not None)
    # The delete ran after the upload committed.
    assert not target.exists()


def test_concurrent_upload_delete_consistent(
    settings: Settings,
) -> None:
    storage = storage_for(settings)
    target = object_file(settings, "bkt", "o.txt")
    mismatches = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for round_number in range(40):
            storage.put("bkt", "o.txt", OLD, "text/csv")
            start = threading.Barrier(2)

            def upload(start: threading.Barrier = start) -> None:
                start.wait()
                storage.put("bkt", "o.txt", NEW, "text/csv")

            def delete(start: threading.Barrier = start) -> None:
                start.wait()
                storage.delete("bkt", "o.txt")

            for future in [pool.submit(upload), pool.submit(delete)]:
                future.result(timeout=60)
            recorded = row(settings, "bkt", "o.txt")
            if target.exists() != (recorded is not None):
                mismatches.append((round_number, target.exists(), recorded))
            if target.exists() and recorded is not None:
                assert recorded[1] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert mismatches == []


def test_failed_delete_commit_keeps_object(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(settings)
    storage.put("bkt", "d/o.txt", OLD, "text/csv")

    def broken(transaction: Any) -> None:
        raise local.OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(local, "_commit", broken)
    with pytest.raises(StorageFailure, match="the object is unchanged"):
        storage.delete("bkt", "d/o.txt")
    assert object_file(settings, "bkt", "d/o.txt").read_bytes() == OLD
    assert row(settings, "bkt", "d/o.txt") == (
        len(OLD),
        hashlib.sha256(OLD).hexdigest(),
        "text/csv",
    )
    assert (
        list(
            (settings.resolved_data_dir / "storage" / local.TEMPORARY_FOLDER).iterdir()
        )
        == []
    )


async def test_failed_delete_is_failed_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage_for(settings).put("bkt", "o.txt", OLD)

    def broken(transaction: Any) -> None:
        raise local.OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(local, "_commit", broken)
    with pytest.raises(ToolError) as caught:
        await invoke_tool(
            ToolContext(settings), "storage_delete", {"bucket": "bkt", "path": "o.txt"}
        )
    assert caught.value.kind == "failed"
    assert "COMMIT" not in caught.value.message
