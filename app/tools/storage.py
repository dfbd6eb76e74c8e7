"""Storage tools: byte-exact objects in buckets, and signed download URLs."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.contracts.types import UtcDateTime
from app.storage.local import (
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    StorageFailure,
    storage_for,
)
from app.storage.signing import MAX_EXPIRES_IN, sign_path, signing_key
from app.tools.registry import ToolContext, ToolError, tool


class ObjectResult(BaseModel):
    bucket: str
    path: str
    size: int
    sha256: str
    content_type: str
    modified_at: UtcDateTime

    @classmethod
    def of(cls, info: ObjectInfo) -> ObjectResult:
        return cls(
            bucket=info.bucket,
            path=info.path,
            size=info.size,
            sha256=info.sha256,
            content_type=info.content_type,
            modified_at=info.modified_at,
        )


def _storage_error(error: StorageError) -> ToolError:
    if isinstance(error, ObjectNotFound):
        return ToolError(str(error), kind="not_found")
    return ToolError(str(error), kind="invalid_argument")


# The whitespace `base64` and most encoders put between and after lines.
_ASCII_WHITESPACE = str.maketrans("", "", " \t\n\r")
_BASE64_FIX = (
    "send standard base64 (A-Z, a-z, 0-9, '+', '/', '=' padding; ASCII spaces, "
    "tabs and line breaks are ignored), or encoding utf-8 for text"
)


def _decode_base64(content: str) -> bytes:
    """Decode standard base64, ignoring ASCII spaces, tabs and line breaks.

    Only the one encoding of the bytes is accepted: binascii ignores
    padding after the first `=` pair and unused low bits of the last
    character, so two different texts could store the same object.
    """
    cleaned = content.translate(_ASCII_WHITESPACE)
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ToolError(
            f"content is not valid base64 ({error}); {_BASE64_FIX}",
            kind="invalid_argument",
        ) from None
    if base64.b64encode(data).decode("ascii") != cleaned:
        raise ToolError(
            "content is not valid base64: its padding or its last character is "
            f"not the encoding of the bytes it holds; {_BASE64_FIX}",
            kind="invalid_argument",
        )
    return data


class StorageUploadInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bucket: str = Field(description="3-63 lowercase letters, digits and hyphens.")
    path: str = Field(description="Relative object path, such as reports/run-1.md.")
    content: str = Field(description="Text, or base64 with encoding=base64.")
    content_type: str | None = Field(
        None,
        description="MIME type such as text/csv or 'text/plain; charset=utf-8', "
        "at most 200 characters; guessed from the path when unset.",
    )
    encoding: Literal["utf-8", "base64"] = "utf-8"


@tool("storage_upload", group="storage")
async def storage_upload(ctx: ToolContext, args: StorageUploadInput) -> ObjectResult:
    """Store an object exactly as given: text as UTF-8, or bytes decoded from
    base64 when encoding is base64 (line breaks and spaces in it are ignored).
    The upload is all-or-nothing: on any error the previous object at the
    path, if any, is unchanged. Returns size, sha256 and content type."""
    if args.encoding == "base64":
        data = _decode_base64(args.content)
    else:
        data = args.content.encode("utf-8")
    storage = storage_for(ctx.settings)
    try:
        info = await asyncio.to_thread(
            storage.put, args.bucket, args.path, data, args.content_type
        )
    except StorageError as error:
        raise _storage_error(error) from None
    except StorageFailure as error:
        raise ToolError(str(error), kind="failed") from None
    return ObjectResult.of(info)


class StorageDownloadInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bucket: str
    path: str
    encoding: Literal["utf-8", "base64"] | None = Field(
        None,
        description="How to return the bytes; unset returns UTF-8 text when the "
        "bytes are valid UTF-8, else base64.",
    )


class StorageDownloadResult(ObjectResult):
    content: str
    encoding: Literal["utf-8", "base64"]


@tool("storage_download", group="storage")
async def storage_download(
    ctx: ToolContext, args: StorageDownloadInput
) -> StorageDownloadResult:
    """Read an object's bytes, returned as UTF-8 text or base64 (see encoding)."""
    storage = storage_for(ctx.settings)
    try:
        data, info = await asyncio.to_thread(storage.read, args.bucket, args.path)
    except StorageError as error:
        raise _storage_error(error) from None
    encoding = args.encoding
    text: str | None = None
    if encoding != "base64":
        try:
            text = data.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            if encoding == "utf-8":
                raise ToolError(
                    f"object {args.path!r} is not valid UTF-8; download it with "
                    "encoding base64",
                    kind="invalid_argument",
                ) from None
            encoding = "base64"
    content = text if text is not None else base64.b64encode(data).decode("ascii")
    return StorageDownloadResult(
        **ObjectResult.of(info).model_dump(),
        content=content,
        encoding=encoding or "base64",
    )


class StorageListInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bucket: str
    path: str = Field("", description="Only objects whose path starts with this.")
    limit: int = Field(100, ge=1, le=10_000)


class StorageListResult(BaseModel):
    bucket: str
    objects: list[ObjectResult]
    count: int


@tool("storage_list", group="storage")
async def storage_list(ctx: ToolContext, args: StorageListInput) -> StorageListResult:
    """List objects of a bucket, sorted by path segment by segment, optionally
    under a path prefix, with size, sha256 and content type."""
    storage = storage_for(ctx.settings)
    try:
        infos = await asyncio.to_thread(
            storage.list_objects, args.bucket, args.path, args.limit
        )
    except StorageError as error:
        raise _storage_error(error) from None
    objects = [ObjectResult.of(info) for info in infos]
    return StorageListResult(bucket=args.bucket, objects=objects, count=len(objects))


class StorageObjectInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bucket: str
    path: str


class StorageDeleteResult(BaseModel):
    bucket: str
    path: str
    deleted: bool


@tool("storage_delete", group="storage")
async def storage_delete(
    ctx: ToolContext, args: StorageObjectInput
) -> StorageDeleteResult:
    """Delete an object and its metadata."""
    storage = storage_for(ctx.settings)
    try:
        deleted = await asyncio.to_thread(storage.delete, args.bucket, args.path)
    except StorageError as error:
        raise _storage_error(error) from None
    except StorageFailure as error:
        raise ToolError(str(error), kind="failed") from None
    if not deleted:
        raise ToolError(
            f"object {args.path!r} not found in bucket {args.bucket!r}; "
            "storage_list shows what the bucket contains",
            kind="not_found",
        )
    return StorageDeleteResult(bucket=args.bucket, path=args.path, deleted=True)


class StorageGetUrlInput(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bucket: str
    path: str
    expires_in: int = Field(
        3600, ge=1, le=MAX_EXPIRES_IN, description="Seconds the URL stays valid."
    )


class StorageGetUrlResult(BaseModel):
    bucket: str
    path: str
    url: str
    expires_at: int = Field(description="Unix time in seconds.")
    expires_in: int


@tool("storage_get_url", group="storage")
async def storage_get_url(
    ctx: ToolContext, args: StorageGetUrlInput
) -> StorageGetUrlResult:
    """Create a signed download URL for an object, valid for expires_in seconds;
    the HTTP server checks the signature and the expiry on every GET."""
    storage = storage_for(ctx.settings)
    try:
        info = await asyncio.to_thread(storage.stat, args.bucket, args.path)
    except StorageError as error:
        raise _storage_error(error) from None
    key = await asyncio.to_thread(signing_key, ctx.settings)
    location, expires = sign_path(key, info.bucket, info.path, args.expires_in)
    scheme = "https" if ctx.settings.tls_cert else "http"
    base = f"{scheme}://{ctx.settings.http_host}:{ctx.settings.http_port}"
    return StorageGetUrlResult(
        bucket=info.bucket,
        path=info.path,
        url=base + location,
        expires_at=expires,
        expires_in=args.expires_in,
    )
