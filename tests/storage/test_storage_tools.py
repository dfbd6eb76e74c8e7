import base64
import os
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.db import get_engine
from app.settings import Settings
from app.storage.http import build_storage_router
from app.storage.signing import signature, signing_key
from app.tools import ToolContext, ToolError, invoke_tool, load_tools

load_tools()

TEXT = "héllo\r\nwörld\n\ttabs and trailing spaces  \n"
BINARY = bytes(range(256)) + b"\x00\xff\xfe"


async def test_text_round_trip_byte_exact(settings: Settings) -> None:
    ctx = ToolContext(settings)
    uploaded = await invoke_tool(
        ctx, "storage_upload", {"bucket": "docs", "path": "a/b.txt", "content": TEXT}
    )
    assert uploaded["size"] == len(TEXT.encode())
    downloaded = await invoke_tool(
        ctx, "storage_download", {"bucket": "docs", "path": "a/b.txt"}
    )
    assert downloaded["content"] == TEXT
    assert downloaded["encoding"] == "utf-8"
    assert downloaded["content_type"] == "text/plain"
    assert downloaded["modified_at"] == uploaded["modified_at"]


async def test_binary_round_trip_byte_exact(settings: Settings) -> None:
    ctx = ToolContext(settings)
    content = base64.b64encode(BINARY).decode()
    uploaded = await invoke_tool(
        ctx,
        "storage_upload",
        {
            "bucket": "blobs",
            "path": "raw.bin",
            "content": content,
            "encoding": "base64",
            "content_type": "application/x-test",
        },
    )
    downloaded = await invoke_tool(
        ctx, "storage_download", {"bucket": "blobs", "path": "raw.bin"}
    )
    assert downloaded["encoding"] == "base64"
    assert base64.b64decode(downloaded["content"]) == BINARY
    assert downloaded["sha256"] == uploaded["sha256"]
    assert downloaded["content_type"] == "application/x-test"
    with get_engine(settings.effective_database_url).connect() as connection:
        row = connection.execute(
            text("SELECT size, sha256, content_type FROM storage_objects")
        ).one()
    assert row == (len(BINARY), uploaded["sha256"], "application/x-test")


async def test_base64_is_validated(settings: Settings) -> None:
    with pytest.raises(ToolError, match="not valid base64"):
        await invoke_tool(
            ToolContext(settings),
            "storage_upload",
            {"bucket": "blobs", "path": "x", "content": "@@@", "encoding": "base64"},
        )


async def test_list_and_delete(settings: Settings) -> None:
    ctx = ToolContext(settings)
    for path in ("r/1.json", "r/2.json", "other.txt"):
        await invoke_tool(
            ctx, "storage_upload", {"bucket": "runs", "path": path, "content": "{}"}
        )
    listed = await invoke_tool(
        ctx, "storage_list", {"bucket": "runs", "path": "r/", "limit": 1}
    )
    assert [o["path"] for o in listed["objects"]] == ["r/1.json"]
    assert listed["objects"][0]["content_type"] == "application/json"
    await invoke_tool(ctx, "storage_delete", {"bucket": "runs", "path": "r/1.json"})
    with pytest.raises(ToolError, match="not found"):
        await invoke_tool(ctx, "storage_delete", {"bucket": "runs", "path": "r/1.json"})
    with get_engine(settings.effective_database_url).connect() as connection:
        paths = connection.execute(
            text("SELECT path FROM storage_objects ORDER BY path")
        ).scalars()
        assert list(paths) == ["other.txt", "r/2.json"]


@pytest.mark.parametrize("prefix", ["/", "../", "a//", "a/./", "a\\"])
async def test_list_invalid_prefix_rejected(settings: Settings, prefix: str) -> None:
    ctx = ToolContext(settings)
    await invoke_tool(
        ctx, "storage_upload", {"bucket": "pre", "path": "a/b.txt", "content": "x"}
    )
    with pytest.raises(ToolError) as uploaded:
        await invoke_tool(
            ctx, "storage_upload", {"bucket": "pre", "path": prefix, "content": "x"}
        )
    with pytest.raises(ToolError) as listed:
        await invoke_tool(ctx, "storage_list", {"bucket": "pre", "path": prefix})
    assert listed.value.kind == "invalid_argument"
    assert listed.value.message == uploaded.value.message


async def test_list_partial_segment_prefixes(settings: Settings) -> None:
    ctx = ToolContext(settings)
    paths = ["a/b.txt", "a.txt", ".env", "..data", "a/.hidden"]
    for path in paths:
        await invoke_tool(
            ctx, "storage_upload", {"bucket": "part", "path": path, "content": "x"}
        )
    for prefix, expected in (
        ("", ["..data", ".env", "a/.hidden", "a/b.txt", "a.txt"]),
        ("a", ["a/.hidden", "a/b.txt", "a.txt"]),
        ("a/", ["a/.hidden", "a/b.txt"]),
        ("a/.", ["a/.hidden"]),
        (".", ["..data", ".env"]),
        ("..", ["..data"]),
    ):
        listed = await invoke_tool(
            ctx, "storage_list", {"bucket": "part", "path": prefix}
        )
        assert [o["path"] for o in listed["objects"]] == expected, prefix


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a\\b"])
async def test_traversal_rejected(settings: Settings, path: str) -> None:
    with pytest.raises(ToolError, match="invalid object path"):
        await invoke_tool(
            ToolContext(settings),
            "storage_upload",
            {"bucket": "docs", "path": path, "content": "x"},
        )


async def test_bad_bucket_rejected(settings: Settings) -> None:
    with pytest.raises(ToolError, match="invalid bucket name"):
        await invoke_tool(
            ToolContext(settings),
            "storage_upload",
            {"bucket": "Bad.Name", "path": "x", "content": "x"},
        )


async def test_signed_url_checks(settings: Settings) -> None:
    ctx = ToolContext(settings)
    content = base64.b64encode(BINARY).decode()
    await invoke_tool(
        ctx,
        "storage_upload",
        {
            "bucket": "share",
            "path": "d/f.bin",
            "content": content,
            "encoding": "base64",
        },
    )
    signed = await invoke_tool(
        ctx, "storage_get_url", {"bucket": "share", "path": "d/f.bin", "expires_in": 60}
    )
    parts = urlsplit(signed["url"])
    assert signed["expires_at"] - time.time() <= 60
    app = FastAPI()
    app.include_router(build_storage_router(settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        good = await http.get(f"{parts.path}?{parts.query}")
        assert good.status_code == 200
        assert good.content == BINARY
        forged = parts.query[:-4] + "0000"
        assert (await http.get(f"{parts.path}?{forged}")).status_code == 403
        # A shortened or non-ASCII signature is a wrong one too.
        for wrong in (parts.query[:-10], parts.query[:-1] + "\u00e9"):
            assert (await http.get(f"{parts.path}?{wrong}")).status_code == 403, wrong
        other = parts.path.replace("f.bin", "g.bin")
        assert (await http.get(f"{other}?{parts.query}")).status_code == 403
        key = signing_key(settings)
        past = int(time.time()) - 10
        token = signature(key, "share", "d/f.bin", past)
        expired = await http.get(f"{parts.path}?expires={past}&signature={token}")
        assert expired.status_code == 403
        assert "expired" in expired.json()["detail"]
        traversal = await http.get(
            f"/storage/v1/object/sign/share/d/..%2F..%2Fx?expires={past}"
            f"&signature={token}"
        )
        assert traversal.status_code in (400, 404)


async def test_signed_url_expires_canonical(settings: Settings) -> None:
    ctx = ToolContext(settings)
    await invoke_tool(
        ctx, "storage_upload", {"bucket": "share", "path": "c.txt", "content": "x"}
    )
    signed = await invoke_tool(
        ctx, "storage_get_url", {"bucket": "share", "path": "c.txt"}
    )
    parts = urlsplit(signed["url"])
    expires = str(signed["expires_at"])
    token = parse_qs(parts.query)["signature"][0]
    app = FastAPI()
    app.include_router(build_storage_router(settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        good = await http.get(f"{parts.path}?expires={expires}&signature={token}")
        assert good.status_code == 200
        # The same number written another way is not the signed URL.
        for spelling in (f"0{expires}", f"%2B{expires}", f"{expires}.0", " " + expires):
            other = await http.get(f"{parts.path}?expires={spelling}&signature={token}")
            assert other.status_code == 422, spelling
            assert "expires" in other.json()["detail"][0]["loc"], spelling


async def test_url_expiry_range(settings: Settings) -> None:
    with pytest.raises(ToolError, match="expires_in"):
        await invoke_tool(
            ToolContext(settings),
            "storage_get_url",
            {"bucket": "share", "path": "x", "expires_in": 0},
        )


@pytest.mark.parametrize(
    ("first", "second", "fragment"),
    [
        (
            None,
            {"path": "q", "content": "hi", "content_type": "not found"},
            "invalid content_type 'not found'",
        ),
        (
            {"path": "x/not found", "content": "a"},
            {"path": "x/not found/y", "content": "b"},
            "'x/not found' is an object",
        ),
    ],
)
async def test_invalid_upload_mentioning_not_found(
    settings: Settings,
    first: dict[str, str] | None,
    second: dict[str, str],
    fragment: str,
) -> None:
    ctx = ToolContext(settings)
    if first is not None:
        await invoke_tool(ctx, "storage_upload", {"bucket": "data", **first})
    with pytest.raises(ToolError) as caught:
        await invoke_tool(ctx, "storage_upload", {"bucket": "data", **second})
    assert caught.value.kind == "invalid_argument"
    assert fragment in caught.value.message


async def test_missing_object_is_not_found(settings: Settings) -> None:
    ctx = ToolContext(settings)
    for tool in ("storage_download", "storage_get_url"):
        with pytest.raises(ToolError) as caught:
            await invoke_tool(ctx, tool, {"bucket": "data", "path": "missing.txt"})
        assert caught.value.kind == "not_found"
        assert "'missing.txt' not found in bucket 'data'" in caught.value.message


async def test_folder_path_download_not_found_no_leak(settings: Settings) -> None:
    ctx = ToolContext(settings)
    await invoke_tool(
        ctx, "storage_upload", {"bucket": "dirs", "path": "a/b/c.txt", "content": "x"}
    )
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ToolError) as caught:
            await invoke_tool(ctx, "storage_download", {"bucket": "dirs", "path": "a"})
        assert caught.value.kind == "not_found", caught.value.message
    # No descriptor of the folder stays open (a few may come and go with
    # the thread pool, but not one per call).
    assert len(os.listdir("/proc/self/fd")) < before + 5


async def test_calls_for_a_limited_key_keep_to_its_groups(settings: Settings) -> None:
    """A call made for a key later, as a workflow step or a swarm action is,
    may not use a tool outside the key's groups, and the refusal is audited."""
    await invoke_tool(
        ToolContext(settings),
        "storage_upload",
        {"bucket": "private", "path": "s.txt", "content": "not for this key"},
    )
    limited = ToolContext(
        settings, user_id="workflow:wfx_1/peek", groups=("workflows",)
    )
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            limited, "storage_download", {"bucket": "private", "path": "s.txt"}
        )
    assert refused.value.kind == "forbidden"
    assert "storage_download is in the tool group storage" in refused.value.message
    assert "limited to the groups: workflows" in refused.value.message
    allowed = ToolContext(settings, groups=("storage",))
    got = await invoke_tool(
        allowed, "storage_download", {"bucket": "private", "path": "s.txt"}
    )
    assert got["content"] == "not for this key"
    events = await invoke_tool(
        ToolContext(settings), "audit_log", {"user_id": "workflow:wfx_1/peek"}
    )
    assert [e["outcome"] for e in events["events"]] == ["error"]
