"""Uploads are all-or-nothing, and invalid names and content types are
rejected before anything is written."""

import base64
import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import app.storage.local as local
from app.db import get_engine
from app.settings import Settings
from app.storage.http import build_storage_router, download_headers
from app.storage.local import (
    LocalStorage,
    StorageError,
    storage_for,
    validate_content_type,
    validate_path,
)
from app.tools import ToolContext, ToolError, invoke_tool, load_tools
from app.tools.storage import _decode_base64

load_tools()


async def upload(settings: Settings, **arguments: Any) -> dict[str, Any]:
    return await invoke_tool(ToolContext(settings), "storage_upload", arguments)


async def upload_error(settings: Settings, **arguments: Any) -> ToolError:
    with pytest.raises(ToolError) as caught:
        await upload(settings, **arguments)
    return caught.value


def rows(settings: Settings) -> list[tuple[Any, ...]]:
    with get_engine(settings.effective_database_url).connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT bucket, path, size, sha256, content_type "
                    "FROM storage_objects ORDER BY bucket, path"
                )
            )
        ]


def files(settings: Settings) -> list[str]:
    """Every file under the storage folder, temporary files included."""
    root = settings.resolved_data_dir / "storage"
    if not root.exists():
        return []
    return sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()
    )


def assert_clean_message(error: ToolError, settings: Settings) -> None:
    """No SQL, parameters or server paths reach the caller."""
    assert str(settings.resolved_data_dir) not in error.message
    for fragment in ("INSERT", "SELECT", "[SQL", "[parameters", "Errno"):
        assert fragment not in error.message


async def test_long_path_rejected_before_writing(settings: Settings) -> None:
    path = "/".join(["d" * 250] * 5)
    error = await upload_error(settings, bucket="bkt", path=path, content="x")
    assert error.kind == "invalid_argument"
    assert "1024" in error.message
    assert_clean_message(error, settings)
    assert files(settings) == []
    assert rows(settings) == []


async def test_long_content_type_keeps_previous(
    settings: Settings,
) -> None:
    old = await upload(settings, bucket="bkt", path="ct.txt", content="old")
    error = await upload_error(
        settings,
        bucket="bkt",
        path="ct.txt",
        content="new",
        content_type="a/" + "b" * 300,
    )
    assert error.kind == "invalid_argument"
    assert "content_type" in error.message
    assert "at most 200 characters" in error.message
    assert_clean_message(error, settings)
    assert (settings.resolved_data_dir / "storage/bkt/ct.txt").read_bytes() == b"old"
    assert rows(settings) == [("bkt", "ct.txt", 3, old["sha256"], "text/plain")]
    assert files(settings) == ["bkt/ct.txt"]


async def test_failed_row_write_keeps_previous(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await upload(settings, bucket="bkt", path="m.txt", content="old")

    def broken(connection: Any, values: dict[str, Any]) -> None:
        raise OperationalError("INSERT INTO storage_objects", {"p": 1}, Exception())

    monkeypatch.setattr(local, "_write_row", broken)
    error = await upload_error(settings, bucket="bkt", path="m.txt", content="new")
    assert error.kind == "failed"
    assert "unchanged" in error.message
    assert_clean_message(error, settings)
    assert (settings.resolved_data_dir / "storage/bkt/m.txt").read_bytes() == b"old"
    assert rows(settings) == [("bkt", "m.txt", 3, old["sha256"], "text/plain")]
    assert files(settings) == ["bkt/m.txt"]


async def test_failed_commit_restores_previous(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await upload(settings, bucket="bkt", path="c.txt", content="old")

    def broken(transaction: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(local, "_commit", broken)
    error = await upload_error(settings, bucket="bkt", path="c.txt", content="new")
    assert error.kind == "failed"
    assert_clean_message(error, settings)
    assert (settings.resolved_data_dir / "storage/bkt/c.txt").read_bytes() == b"old"
    assert rows(settings) == [("bkt", "c.txt", 3, old["sha256"], "text/plain")]
    assert files(settings) == ["bkt/c.txt"]
    # A new object whose commit fails leaves no file and no folder behind.
    error = await upload_error(settings, bucket="bkt", path="n/e/w.txt", content="x")
    assert error.kind == "failed"
    assert files(settings) == ["bkt/c.txt"]
    assert not (settings.resolved_data_dir / "storage/bkt/n").exists()


async def test_failed_rename_keeps_previous(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await upload(settings, bucket="bkt", path="r.txt", content="old")

    def full(source: Any, target: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(local.os, "replace", full)
    error = await upload_error(settings, bucket="bkt", path="r.txt", content="new")
    monkeypatch.undo()
    assert error.kind == "failed"
    assert "No space left on device" in error.message
    assert_clean_message(error, settings)
    assert (settings.resolved_data_dir / "storage/bkt/r.txt").read_bytes() == b"old"
    assert rows(settings) == [("bkt", "r.txt", 3, old["sha256"], "text/plain")]
    assert files(settings) == ["bkt/r.txt"]


async def test_overwrite_keeps_created_at(settings: Settings) -> None:
    await upload(settings, bucket="bkt", path="o.txt", content="one")
    query = text("SELECT created_at FROM storage_objects")
    with get_engine(settings.effective_database_url).connect() as connection:
        created = connection.execute(query).scalar_one()
    second = await upload(settings, bucket="bkt", path="o.txt", content="second")
    assert rows(settings) == [("bkt", "o.txt", 6, second["sha256"], "text/plain")]
    with get_engine(settings.effective_database_url).connect() as connection:
        assert connection.execute(query).scalar_one() == created


@pytest.mark.parametrize("bucket", ["abc\n", "abc\r\n", "\nabc"])
async def test_bucket_with_line_break_rejected(settings: Settings, bucket: str) -> None:
    error = await upload_error(settings, bucket=bucket, path="x.txt", content="hi")
    assert error.kind == "invalid_argument"
    assert "invalid bucket name" in error.message
    assert files(settings) == []
    assert not (settings.resolved_data_dir / "storage").exists() or not any(
        (settings.resolved_data_dir / "storage").iterdir()
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain\r\nX-Evil: 1",
        "text/plain\n",
        "text",
        "text/",
        "/plain",
        "text/plain; charset",
        "text/pläin",
        " text/plain",
    ],
)
def test_invalid_content_type_rejected(content_type: str) -> None:
    with pytest.raises(StorageError) as caught:
        validate_content_type(content_type)
    assert "content_type" in str(caught.value)
    assert repr(content_type) in str(caught.value)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/csv; charset=utf-8",
        'multipart/mixed; boundary="a b;c"',
        "application/vnd.api+json",
        "Text/Plain;charset=UTF-8",
    ],
)
def test_valid_content_type_kept(content_type: str) -> None:
    assert validate_content_type(content_type) == content_type


async def test_upload_with_crlf_content_type_rejected(settings: Settings) -> None:
    old = await upload(settings, bucket="bkt", path="ct.txt", content="old")
    error = await upload_error(
        settings,
        bucket="bkt",
        path="ct.txt",
        content="x",
        content_type="text/plain\r\nX-Evil: 1",
    )
    assert error.kind == "invalid_argument"
    assert "content_type 'text/plain\\r\\nX-Evil: 1'" in error.message
    assert rows(settings) == [("bkt", "ct.txt", 3, old["sha256"], "text/plain")]
    result = await upload(
        settings,
        bucket="bkt",
        path="ct.txt",
        content="x",
        content_type="text/csv; charset=utf-8",
    )
    assert result["content_type"] == "text/csv; charset=utf-8"


async def signed_get(settings: Settings, path: str) -> httpx.Response:
    signed = await invoke_tool(
        ToolContext(settings), "storage_get_url", {"bucket": "web", "path": path}
    )
    parts = urlsplit(signed["url"])
    app = FastAPI()
    app.include_router(build_storage_router(settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.get(f"{parts.path}?{parts.query}")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/html",
        "image/svg+xml",
        "application/xhtml+xml",
        "text/xml",
        "application/xml",
        "application/javascript",
        "text/javascript",
        "TEXT/HTML; charset=utf-8",
        "application/pdf",
    ],
)
def test_active_content_types_are_attachments(content_type: str) -> None:
    media_type, headers = download_headers('dir/pågé "1".html', content_type)
    assert media_type == content_type
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"] == (
        'attachment; filename="p_g_ _1_.html"; '
        "filename*=UTF-8''p%C3%A5g%C3%A9%20%221%22.html"
    )


@pytest.mark.parametrize(
    "content_type", ["text/plain", "image/png", "application/json", "video/mp4"]
)
def test_passive_content_types_are_inline(content_type: str) -> None:
    media_type, headers = download_headers("a.bin", content_type)
    assert media_type == content_type
    assert headers == {"X-Content-Type-Options": "nosniff"}


async def test_html_is_served_as_attachment(settings: Settings) -> None:
    await upload(
        settings,
        bucket="web",
        path="dir/page.html",
        content="<script>alert(1)</script>",
    )
    response = await signed_get(settings, "dir/page.html")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-disposition"].startswith(
        'attachment; filename="page.html"'
    )


async def test_plain_content_is_served_inline_with_nosniff(settings: Settings) -> None:
    await upload(settings, bucket="web", path="notes.txt", content="hello")
    response = await signed_get(settings, "notes.txt")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "content-disposition" not in response.headers
    assert response.headers["content-type"].startswith("text/plain")


async def test_stored_invalid_type_served_as_octet_stream(
    settings: Settings,
) -> None:
    await upload(settings, bucket="web", path="old.txt", content="hello")
    with get_engine(settings.effective_database_url).begin() as connection:
        connection.execute(
            text("UPDATE storage_objects SET content_type = :value"),
            {"value": "text/plain\r\nX-Evil: 1"},
        )
    response = await signed_get(settings, "old.txt")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["content-type"] == "application/octet-stream"
    assert "x-evil" not in response.headers
    assert response.headers["content-disposition"].startswith("attachment;")


async def test_file_folder_conflicts_rejected(settings: Settings) -> None:
    await upload(settings, bucket="bkt", path="a/b.txt", content="x")
    error = await upload_error(settings, bucket="bkt", path="a/b.txt/c", content="y")
    assert error.kind == "invalid_argument"
    assert "'a/b.txt' is an object" in error.message
    assert_clean_message(error, settings)
    error = await upload_error(settings, bucket="bkt", path="a", content="y")
    assert error.kind == "invalid_argument"
    assert "'a' is a folder that contains objects such as 'a/b.txt'" in (error.message)
    assert_clean_message(error, settings)
    assert files(settings) == ["bkt/a/b.txt"]
    assert rows(settings)[0][:3] == ("bkt", "a/b.txt", 1)


async def test_emptied_folder_can_become_object(
    settings: Settings,
) -> None:
    await upload(settings, bucket="bkt", path="e/f/x.txt", content="x")
    await invoke_tool(
        ToolContext(settings), "storage_delete", {"bucket": "bkt", "path": "e/f/x.txt"}
    )
    assert not (settings.resolved_data_dir / "storage/bkt/e").exists()
    result = await upload(settings, bucket="bkt", path="e", content="now a file")
    assert result["path"] == "e"


async def test_too_long_segment_rejected(settings: Settings) -> None:
    error = await upload_error(
        settings, bucket="bkt", path="a/" + "s" * 300, content="x"
    )
    assert error.kind == "invalid_argument"
    assert "255" in error.message
    assert_clean_message(error, settings)
    # The limit counts UTF-8 bytes, as the filesystem does.
    error = await upload_error(settings, bucket="bkt", path="ü" * 128, content="x")
    assert "255" in error.message
    assert files(settings) == []


@pytest.mark.parametrize(
    "path", ["a/./b.txt", "a//b.txt", "a/b.txt/", "./b.txt", ".", "a/."]
)
def test_dot_and_empty_segments_rejected(path: str) -> None:
    with pytest.raises(StorageError) as caught:
        validate_path(path)
    assert repr(path) in str(caught.value)
    assert "several names" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "character"),
    [
        ("nl\nx.txt", "U+000A at position 2"),
        ("a/b\r.txt", "U+000D at position 3"),
        ("tab\there.txt", "U+0009 at position 3"),
        ("nul\x00.txt", "U+0000 at position 3"),
        ("esc\x1b[31m.txt", "U+001B at position 3"),
        ("del\x7f.txt", "U+007F at position 3"),
    ],
)
async def test_control_character_in_path_rejected(
    settings: Settings, path: str, character: str
) -> None:
    error = await upload_error(settings, bucket="bkt", path=path, content="hi")
    assert error.kind == "invalid_argument"
    assert repr(path) in error.message
    assert f"control character {character}" in error.message
    assert "leading slash" not in error.message
    assert files(settings) == []
    assert rows(settings) == []


async def test_list_leaves_out_invalid_file_names(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    await upload(settings, bucket="bkt", path="ok.txt", content="hi")
    # As an earlier version stored a path with a tab.
    (settings.resolved_data_dir / "storage/bkt/tab\tx.txt").write_bytes(b"old")
    listed = await invoke_tool(ToolContext(settings), "storage_list", {"bucket": "bkt"})
    assert [item["path"] for item in listed["objects"]] == ["ok.txt"]
    assert "file left out of the list" in caplog.text
    assert "U+0009" in caplog.text


async def test_list_leaves_out_links_out_of_the_bucket(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await upload(settings, bucket="bkt", path="ok.txt", content="hi")
    outside = tmp_path / "outside.txt"
    outside.write_text("not in the bucket")
    (settings.resolved_data_dir / "storage/bkt/link").symlink_to(outside)
    listed = await invoke_tool(ToolContext(settings), "storage_list", {"bucket": "bkt"})
    assert [item["path"] for item in listed["objects"]] == ["ok.txt"]
    assert "symbolic link 'link' left out of the list" in caplog.text
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            ToolContext(settings), "storage_delete", {"bucket": "bkt", "path": "link"}
        )
    assert (
        "'link': on disk it is a symbolic link that leads out" in refused.value.message
    )
    assert outside.read_text() == "not in the bucket"


async def test_upload_with_empty_segment_rejected(settings: Settings) -> None:
    await upload(settings, bucket="bkt", path="a/b.txt", content="first")
    error = await upload_error(settings, bucket="bkt", path="a//b.txt", content="2nd")
    assert error.kind == "invalid_argument"
    assert "write it as 'a/b.txt'" in error.message
    assert (settings.resolved_data_dir / "storage/bkt/a/b.txt").read_bytes() == (
        b"first"
    )
    with pytest.raises(ToolError, match="invalid object path"):
        await invoke_tool(
            ToolContext(settings),
            "storage_download",
            {"bucket": "bkt", "path": "a/./b.txt"},
        )
    # Nothing is left to suggest for a path of '.' segments alone.
    dot = await upload_error(settings, bucket="bkt", path=".", content="x")
    assert dot.message.endswith("name the object, for example 'notes.txt'")


async def test_upload_prefix_names_are_ordinary_objects(settings: Settings) -> None:
    await upload(settings, bucket="bkt", path=".upload-secret", content="s")
    await upload(settings, bucket="bkt", path="d/.upload-x", content="t")
    listed = await invoke_tool(ToolContext(settings), "storage_list", {"bucket": "bkt"})
    assert [o["path"] for o in listed["objects"]] == [".upload-secret", "d/.upload-x"]
    # Temporary files live outside every bucket, and none is left behind.
    assert files(settings) == ["bkt/.upload-secret", "bkt/d/.upload-x"]


@pytest.mark.parametrize(
    "content", ["aGVsbG8=\n", "aGVs\nbG8=\r\n", " aGVsbG8= ", "aGVs\tbG8="]
)
def test_base64_ascii_whitespace_is_ignored(content: str) -> None:
    assert _decode_base64(content) == b"hello"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # Extra padding, and a last character whose unused bits are set: each
        # decodes to the bytes of another text, so only that text is accepted.
        ("YWJj=", "its padding or its last character"),
        ("aGVsbG9=", "its padding or its last character"),
        ("aGVs\x0bbG8=", "Only base64 data is allowed"),
    ],
)
def test_base64_other_forms_rejected(content: str, problem: str) -> None:
    with pytest.raises(ToolError, match="not valid base64") as caught:
        _decode_base64(content)
    assert problem in caught.value.message


def test_base64_non_ascii_whitespace_rejected() -> None:
    with pytest.raises(ToolError, match="not valid base64") as caught:
        _decode_base64("aGVs\u00a0bG8=")
    assert "line breaks are ignored" in caught.value.message


async def test_base64_as_the_base64_command_wraps_it(settings: Settings) -> None:
    data = bytes(range(256)) * 3
    wrapped = base64.encodebytes(data).decode()  # 76-character lines, like base64
    assert "\n" in wrapped.rstrip("\n")
    result = await upload(
        settings, bucket="bkt", path="w.bin", content=wrapped, encoding="base64"
    )
    assert result["size"] == len(data)
    assert (settings.resolved_data_dir / "storage/bkt/w.bin").read_bytes() == data


def test_concurrent_writers_file_matches_row(
    settings: Settings,
) -> None:
    storage = storage_for(settings)
    contents = [f"writer {n} ".encode() * (n + 1) for n in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            list(pool.map(lambda data: storage.put("bkt", "same.txt", data), contents))
    data = (settings.resolved_data_dir / "storage/bkt/same.txt").read_bytes()
    assert data in contents
    assert rows(settings) == [
        ("bkt", "same.txt", len(data), hashlib.sha256(data).hexdigest(), "text/plain")
    ]
    assert files(settings) == ["bkt/same.txt"]


def test_database_without_table_still_stores_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = LocalStorage(tmp_path / "storage", f"sqlite:///{tmp_path}/empty.db")
    info = storage.put("bkt", "x.txt", b"bytes")
    assert info.size == 5
    assert storage.get("bkt", "x.txt") == b"bytes"
    assert "run `nexus db upgrade`" in caplog.text
