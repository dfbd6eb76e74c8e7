"""Storage operations on one object at once: a list skips objects deleted
meanwhile, an upload and a delete leave file and row together, and a download
describes the bytes it returns. Hooks pause one operation at the racy point,
so each interleaving happens on every run."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

import app.storage.local as local
from app.db import get_engine
from app.settings import Settings
from app.storage.http import build_storage_router
from app.storage.local import LocalStorage, StorageFailure, storage_for
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


def row_count(settings: Settings) -> int:
    with get_engine(settings.effective_database_url).connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM storage_objects")
            ).scalar_one()
        )


def object_file(settings: Settings, bucket: str, path: str) -> Path:
    return settings.resolved_data_dir / "storage" / bucket / path


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def list_paths(settings: Settings, bucket: str) -> list[str]:
    listed = await invoke_tool(
        ToolContext(settings), "storage_list", {"bucket": bucket}
    )
    return [item["path"] for item in listed["objects"]]


async def test_list_skips_object_deleted_after_walk(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(settings)
    for path in ("a.txt", "b/gone.txt", "c.txt"):
        storage.put("bkt", path, b"x")
    stat = LocalStorage.stat

    def deleting_first(self: LocalStorage, bucket: str, path: str) -> Any:
        if path == "b/gone.txt":
            storage.delete(bucket, path)
        return stat(self, bucket, path)

    monkeypatch.setattr(LocalStorage, "stat", deleting_first)
    assert await list_paths(settings, "bkt") == ["a.txt", "c.txt"]


async def test_list_skips_object_deleted_during_stat(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(settings)
    for path in ("a.txt", "b/gone.txt", "c.txt"):
        storage.put("bkt", path, b"x")
    recorded = LocalStorage._recorded

    # The file exists when stat checks it, and is gone when stat reads it.
    def deleting_first(self: LocalStorage, bucket: str, path: str) -> Any:
        if path == "b/gone.txt":
            storage.delete(bucket, path)
        return recorded(self, bucket, path)

    monkeypatch.setattr(LocalStorage, "_recorded", deleting_first)
    assert await list_paths(settings, "bkt") == ["a.txt", "c.txt"]


async def test_list_skips_folder_deleted_during_walk(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(settings)
    for path in ("a.txt", "b/gone.txt", "c.txt"):
        storage.put("bkt", path, b"x")
    folder = object_file(settings, "bkt", "b")
    scandir = os.scandir

    # Deleting the folder's last object removes the folder just before the
    # walk lists it.
    def deleting_first(path: Any = ".") -> Any:
        if Path(path) == folder and folder.exists():
            storage.delete("bkt", "b/gone.txt")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", deleting_first)
    assert await list_paths(settings, "bkt") == ["a.txt", "c.txt"]


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


def replace_during_metadata_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upload NEW as text/csv once, right before the first metadata read, so a
    reader has OLD's bytes in hand when it looks up the metadata."""
    storage = storage_for(settings)
    recorded = LocalStorage._recorded
    replaced = threading.Event()

    def replacing_first(self: LocalStorage, bucket: str, path: str) -> Any:
        if not replaced.is_set():
            replaced.set()
            storage.put(bucket, path, NEW, "text/csv")
        return recorded(self, bucket, path)

    monkeypatch.setattr(LocalStorage, "_recorded", replacing_first)


async def test_download_describes_returned_bytes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage_for(settings).put("race", "obj.txt", OLD, "text/plain")
    replace_during_metadata_read(settings, monkeypatch)
    result = await invoke_tool(
        ToolContext(settings), "storage_download", {"bucket": "race", "path": "obj.txt"}
    )
    content = result["content"].encode()
    assert result["sha256"] == hashlib.sha256(content).hexdigest()
    assert result["size"] == len(content)
    assert result["content_type"] == ("text/csv" if content == NEW else "text/plain")


async def test_signed_download_etag_matches_bytes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage_for(settings).put("race", "obj.txt", OLD, "text/plain")
    signed = await invoke_tool(
        ToolContext(settings), "storage_get_url", {"bucket": "race", "path": "obj.txt"}
    )
    parts = urlsplit(signed["url"])
    replace_during_metadata_read(settings, monkeypatch)
    app = FastAPI()
    app.include_router(build_storage_router(settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get(f"{parts.path}?{parts.query}")
    assert response.status_code == 200
    sha256 = hashlib.sha256(response.content).hexdigest()
    assert response.headers["etag"] == f'"{sha256}"'
    expected_type = "text/csv" if response.content == NEW else "text/plain"
    assert response.headers["content-type"].startswith(expected_type)


async def test_file_changed_by_hand_is_described(settings: Settings) -> None:
    storage_for(settings).put("hand", "edited.csv", OLD, "text/plain")
    object_file(settings, "hand", "edited.csv").write_bytes(b"edited by hand")
    object_file(settings, "hand", "added.txt").write_bytes(b"added by hand")
    ctx = ToolContext(settings)
    for path, data in (
        ("edited.csv", b"edited by hand"),
        ("added.txt", b"added by hand"),
    ):
        result = await invoke_tool(
            ctx, "storage_download", {"bucket": "hand", "path": path}
        )
        assert result["content"].encode() == data
        assert result["sha256"] == hashlib.sha256(data).hexdigest()
        assert result["size"] == len(data)
    listed = await invoke_tool(ctx, "storage_list", {"bucket": "hand"})
    assert [(o["path"], o["size"], o["content_type"]) for o in listed["objects"]] == [
        ("added.txt", 13, "text/plain"),
        ("edited.csv", 14, "text/csv"),
    ]
    # Reading takes the object's lock without leaving a row behind.
    assert row(settings, "hand", "added.txt") is None
    assert row_count(settings) == 1
