"""HTTP route that serves signed storage URLs; the HTTP server mounts it."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Response

from app.api.calls import ErrorBody
from app.settings import Settings
from app.storage.local import (
    ObjectNotFound,
    StorageError,
    storage_for,
    validate_bucket,
    validate_content_type,
    validate_path,
)
from app.storage.signing import URL_PREFIX, SignatureError, signing_key, verify

# Types a browser displays without running code from them. Every other type
# (HTML, SVG, XML, scripts, ...) is sent as an attachment, so that an uploaded
# page never runs with the API server's origin.
_INLINE_TYPES = frozenset(
    {
        "text/plain",
        "text/csv",
        "application/json",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
    }
)
_INLINE_FAMILIES = ("audio/", "video/")


def download_headers(path: str, content_type: str) -> tuple[str, dict[str, str]]:
    """Choose the media type and headers that serve an object safely.

    A stored type that is not a valid media type (written before types were
    checked) is served as application/octet-stream.
    """
    try:
        media_type = validate_content_type(content_type) or "application/octet-stream"
    except StorageError:
        media_type = "application/octet-stream"
    headers = {"X-Content-Type-Options": "nosniff"}
    essence = media_type.split(";", 1)[0].strip().lower()
    if essence not in _INLINE_TYPES and not essence.startswith(_INLINE_FAMILIES):
        name = path.rsplit("/", 1)[-1]
        fallback = "".join(
            c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
            for c in name
        )
        headers["Content-Disposition"] = (
            f'attachment; filename="{fallback}"; '
            f"filename*=UTF-8''{quote(name, safe='')}"
        )
    return media_type, headers


def _error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Responses of the signed-URL route, as the OpenAPI schema lists them. Every
# error has the API's error body, which the HTTP server's handlers write.
_SIGNED_URL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The object's bytes, with its content type and ETag.",
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    },
    400: _error_response("The bucket or path is invalid."),
    403: _error_response("The signature is wrong or the URL has expired."),
    404: _error_response("No object is stored at the path."),
    422: _error_response(
        "The expires or signature query parameter is missing or invalid."
    ),
}


def build_storage_router(settings: Settings) -> APIRouter:
    """Return a router serving `GET /storage/v1/object/sign/{bucket}/{path}`
    with `expires` (Unix seconds) and `signature` query parameters."""
    router = APIRouter(tags=["storage"])
    storage = storage_for(settings)

    @router.get(
        URL_PREFIX + "/{bucket}/{path:path}",
        response_class=Response,
        # The signature is the credential, so the route needs no API key.
        openapi_extra={"security": []},
        responses=_SIGNED_URL_RESPONSES,
    )
    async def download_signed(
        bucket: str,
        path: str,
        # Text, because an int parameter also accepts `0123` and `+123`, which
        # would make several URLs of one signature. The largest signed 64-bit
        # number has 19 digits.
        expires: str = Query(
            ...,
            pattern=r"^(0|[1-9][0-9]*)$",
            max_length=19,
            description="Unix time the URL expires, in decimal without leading "
            "zeros or a sign, as storage_get_url writes it.",
        ),
        # Any other length is a wrong signature (403), not an invalid
        # argument; the cap only bounds the work of reading it.
        signature: str = Query(..., max_length=1024),
    ) -> Response:
        try:
            validate_bucket(bucket)
            normalized = validate_path(path)
        except StorageError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        key = await asyncio.to_thread(signing_key, settings)
        try:
            verify(key, bucket, normalized, int(expires), signature)
        except SignatureError as error:
            raise HTTPException(status_code=403, detail=str(error)) from None
        try:
            data, info = await asyncio.to_thread(storage.read, bucket, normalized)
        except ObjectNotFound as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        except StorageError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        media_type, headers = download_headers(normalized, info.content_type)
        headers.update({"ETag": f'"{info.sha256}"', "Cache-Control": "private"})
        return Response(content=data, media_type=media_type, headers=headers)

    return router
