"""Signed URLs for stored objects: an HMAC-SHA256 over bucket, path and expiry."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from app.settings import Settings

MAX_EXPIRES_IN = 7 * 24 * 3600
URL_PREFIX = "/storage/v1/object/sign"


class SignatureError(ValueError):
    """A signed URL whose signature is wrong or whose expiry has passed."""


def signing_key(settings: Settings) -> bytes:
    """Return the URL signing key: the setting, else a key generated once and
    kept in `<data_dir>/keys/storage-signing.key` (mode 0600)."""
    if settings.storage_signing_key is not None:
        return settings.storage_signing_key.get_secret_value().encode()
    path = settings.resolved_data_dir / "keys" / "storage-signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_new_key(path)
    return path.read_bytes().strip()


def _write_new_key(path: Path) -> None:
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it first
    with os.fdopen(handle, "w") as file:
        file.write(secrets.token_hex(32))


def signature(key: bytes, bucket: str, path: str, expires: int) -> str:
    message = f"{bucket}\n{path}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_path(key: bytes, bucket: str, path: str, expires_in: int) -> tuple[str, int]:
    """Return the URL path and query of a signed download, and its expiry
    (Unix seconds)."""
    expires = int(time.time()) + expires_in
    token = signature(key, bucket, path, expires)
    quoted = quote(path, safe="/")
    return (
        f"{URL_PREFIX}/{bucket}/{quoted}?expires={expires}&signature={token}",
        expires,
    )


def verify(key: bytes, bucket: str, path: str, expires: int, token: str) -> None:
    """Raises: SignatureError when the signature is wrong or expired."""
    expected = signature(key, bucket, path, expires)
    # compare_digest takes ASCII text only.
    if not token.isascii() or not hmac.compare_digest(expected, token):
        raise SignatureError(
            "invalid signature for this object; request a new URL with storage_get_url"
        )
    if expires < time.time():
        raise SignatureError(
            f"the signed URL expired at {expires} (Unix time); request a new one "
            "with storage_get_url"
        )
