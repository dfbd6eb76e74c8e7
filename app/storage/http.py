"""HTTP route that serves signed storage URLs; the HTTP server mounts it."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, Query, Response

from app.settings import Settings
from app.storage.local import StorageError, storage_for, validate_bucket, validate_path
from app.storage.signing import URL_PREFIX, SignatureError, signing_key, verify


def build_storage_router(settings: Settings) -> APIRouter:
    """Return a router serving `GET /storage/v1/object/sign/{bucket}/{path}`
    with `expires` (Unix seconds) and `signature` query parameters."""
    router = APIRouter(tags=["storage"])
    storage = storage_for(settings)

    @router.get(URL_PREFIX + "/{bucket}/{path:path}")
    async def download_signed(
        bucket: str,
        path: str,
        expires: int = Query(..., description="Unix time the URL expires."),
        signature: str = Query(..., min_length=64, max_length=64),
    ) -> Response:
        try:
            validate_bucket(bucket)
            normalized = validate_path(path)
        except StorageError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        key = await asyncio.to_thread(signing_key, settings)
        try:
            verify(key, bucket, normalized, expires, signature)
        except SignatureError as error:
            raise HTTPException(status_code=403, detail=str(error)) from None
        try:
            data = await asyncio.to_thread(storage.get, bucket, normalized)
            info = await asyncio.to_thread(storage.stat, bucket, normalized)
        except StorageError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        return Response(
            content=data,
            media_type=info.content_type,
            headers={"ETag": f'"{info.sha256}"', "Cache-Control": "private"},
        )

    return router
