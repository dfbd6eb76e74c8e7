"""Field-level sealing of sandbox secrets with AES-GCM.

Tools and the service seal env var values before they enter a workflow input
or update; only the sandbox activity unseals them, right before it starts a
process. The associated data binds each ciphertext to its sandbox and env var
name, so a sealed value cannot be replayed under another name.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.settings import Settings

logger = logging.getLogger(__name__)

PREFIX = "sealed:v1:"
_NONCE_BYTES = 12
_lock = threading.Lock()


class SealError(ValueError):
    """A sealed value that this key cannot open, or a bad key."""


def key_path(settings: Settings) -> Path:
    return settings.resolved_data_dir / "keys" / "sandbox-secrets.key"


def load_key(settings: Settings) -> bytes:
    """Return the AES-256 key: `NEXUS_ENCRYPTION_KEY`, else one generated once.

    The generated key is written to `<data dir>/keys/sandbox-secrets.key`
    with mode 0600; every process sharing the data folder reads the same key.

    Raises:
        SealError: `NEXUS_ENCRYPTION_KEY` is not base64 of 32 bytes.
    """
    if settings.encryption_key is not None:
        raw = settings.encryption_key.get_secret_value()
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise SealError(
                "NEXUS_ENCRYPTION_KEY is not base64 of 32 bytes; generate one with "
                "`python -c 'import os,base64;print(base64.b64encode(os.urandom(32))"
                ".decode())'`"
            )
        return key
    path = key_path(settings)
    with _lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(base64.b64encode(AESGCM.generate_key(bit_length=256)))
                logger.info("generated the sandbox secrets key at %s", path)
        key = base64.b64decode(path.read_bytes().strip())
    if len(key) != 32:
        raise SealError(f"{path} does not contain base64 of 32 bytes; remove it")
    return key


def _aad(sandbox_id: str, name: str) -> bytes:
    return f"{sandbox_id}\0{name}".encode()


def seal(key: bytes, sandbox_id: str, name: str, value: str) -> str:
    """Encrypt `value` of env var `name` for `sandbox_id`."""
    nonce = os.urandom(_NONCE_BYTES)
    cipher = AESGCM(key).encrypt(nonce, value.encode(), _aad(sandbox_id, name))
    return PREFIX + base64.urlsafe_b64encode(nonce + cipher).decode()


def unseal(key: bytes, sandbox_id: str, name: str, sealed: str) -> str:
    """Decrypt a value made by `seal` for the same sandbox and name.

    Raises:
        SealError: the value is not sealed, or was sealed with another key,
            sandbox or name.
    """
    if not sealed.startswith(PREFIX):
        raise SealError(f"env var {name} is not a sealed value")
    try:
        blob = base64.urlsafe_b64decode(sealed[len(PREFIX) :])
        nonce, cipher = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        return AESGCM(key).decrypt(nonce, cipher, _aad(sandbox_id, name)).decode()
    except (InvalidTag, binascii.Error, ValueError):
        raise SealError(
            f"cannot unseal env var {name} of sandbox {sandbox_id}: it was sealed "
            "with another key; set the same NEXUS_ENCRYPTION_KEY on every process"
        ) from None


def seal_env(key: bytes, sandbox_id: str, env: dict[str, str]) -> dict[str, str]:
    return {name: seal(key, sandbox_id, name, value) for name, value in env.items()}


def unseal_env(key: bytes, sandbox_id: str, sealed: dict[str, str]) -> dict[str, str]:
    return {
        name: unseal(key, sandbox_id, name, value) for name, value in sealed.items()
    }
