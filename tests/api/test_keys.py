"""API keys on SQLite and PostgreSQL, and the server's first start."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import select

from app.api import keys
from app.api.keys import (
    MAX_KEY_NAME_LENGTH,
    DuplicateKeyNameError,
    KeyNotFoundError,
    create_key,
    ensure_default_key,
    list_keys,
    revoke_key,
    rotate_key,
    verify_token,
)
from app.api.models import ApiKey
from app.api.server import uvicorn_options
from app.db import session_scope
from app.services.audit import list_calls, record_call
from app.settings import Settings
from tests.api.conftest import REPO_ROOT, free_port, server_env


def test_secret_stored_only_as_hash(database_url: str) -> None:
    token, info = create_key(database_url, "ci", ["system"])
    # The secret itself may contain "_", so split the way the server does.
    parsed = keys.parse_token(token)
    assert parsed is not None
    secret = parsed[1]
    with session_scope(database_url) as session:
        row = session.exec(select(ApiKey).where(ApiKey.id == info.id)).one()
        stored = [row.salt, row.secret_hash, row.name]
    assert all(secret not in value for value in stored)
    principal = verify_token(database_url, token)
    assert principal is not None
    assert principal.key_id == info.id
    assert principal.groups == ("system",)
    assert info.created_at.tzinfo is not None


def test_wrong_revoked_rotated_keys(database_url: str) -> None:
    token, info = create_key(database_url, "ops")
    assert (
        verify_token(database_url, token[:-1] + ("A" if token[-1] != "A" else "B"))
        is None
    )
    new_token, new_info = rotate_key(database_url, info.id)
    assert verify_token(database_url, token) is None
    assert verify_token(database_url, new_token) is not None
    listed = {key.id: key for key in list_keys(database_url)}
    assert listed[info.id].replaced_by == new_info.id
    assert listed[info.id].revoked_at is not None
    revoke_key(database_url, new_info.id)
    assert verify_token(database_url, new_token) is None
    assert list_keys(database_url, include_revoked=False) == []
    with pytest.raises(KeyNotFoundError, match="no active API key"):
        revoke_key(database_url, new_info.id)
    with pytest.raises(KeyNotFoundError):
        rotate_key(database_url, "missing")


def test_active_key_name_unique(database_url: str) -> None:
    _, first = create_key(database_url, "ci-bot")
    with pytest.raises(DuplicateKeyNameError) as raised:
        create_key(database_url, "ci-bot", ["system"])
    message = str(raised.value)
    assert f"key name 'ci-bot' is already used by the active key {first.id}" in message
    assert f"`nexus keys rotate {first.id}`" in message
    assert [key.id for key in list_keys(database_url)] == [first.id]
    # Rotation keeps the name while the old key is still active.
    _, rotated = rotate_key(database_url, first.id)
    assert rotated.name == "ci-bot"
    revoke_key(database_url, rotated.id)
    _, again = create_key(database_url, "ci-bot")
    assert again.name == "ci-bot"


def test_concurrent_creates_one_name(database_url: str) -> None:
    attempts = 6
    barrier = threading.Barrier(attempts)

    def create() -> str:
        barrier.wait()
        try:
            return create_key(database_url, "racer")[1].id
        except DuplicateKeyNameError:
            return "duplicate"

    with ThreadPoolExecutor(attempts) as pool:
        results = list(pool.map(lambda _: create(), range(attempts)))
    assert results.count("duplicate") == attempts - 1
    assert len(list_keys(database_url, include_revoked=False)) == 1


def test_key_name_fits_audit_column(database_url: str) -> None:
    """A key's calls are audited as `key:<name>` in a 200-character column,
    so a longer name is rejected before anything is stored."""
    assert MAX_KEY_NAME_LENGTH == 196
    for length in (197, 300, 5000):
        with pytest.raises(ValueError) as raised:
            create_key(database_url, "n" * length)
        message = str(raised.value)
        assert message.startswith("key name 'nnn")
        assert f"is {length} characters long" in message
        assert "over the maximum of 196" in message
        assert "choose a shorter name" in message
    assert list_keys(database_url) == []
    token, info = create_key(database_url, "n" * MAX_KEY_NAME_LENGTH)
    principal = verify_token(database_url, token)
    assert principal is not None
    record_call(
        database_url,
        user_id=principal.user_id,
        tool="system_health",
        arguments={},
        outcome="success",
        duration_ms=1.0,
        key_id=info.id,
    )
    rows = list_calls(database_url, user_id=principal.user_id)
    assert len(rows) == 1


@pytest.mark.parametrize(
    ("name", "code", "position"),
    [
        ("evil\nname", "U+000A", 4),
        ("tab\there", "U+0009", 3),
        ("\x00", "U+0000", 0),
        ("bell\x07", "U+0007", 4),
        ("ok\u202eevil", "U+202E", 2),
        ("line\u2028break", "U+2028", 4),
    ],
)
def test_key_name_control_characters_rejected(
    database_url: str, name: str, code: str, position: int
) -> None:
    with pytest.raises(ValueError) as raised:
        create_key(database_url, name)
    message = str(raised.value)
    assert f"key name {name!r}" in message
    assert f"control or format character {code} at position {position}" in message
    assert "use printable characters only" in message
    assert list_keys(database_url) == []


@pytest.mark.parametrize("name", ["alice ", " alice", "alice\u00a0"])
def test_key_name_with_white_space_at_ends_rejected(
    database_url: str, name: str
) -> None:
    """`alice ` beside an active `alice` would show as the same caller."""
    create_key(database_url, "alice")
    with pytest.raises(ValueError) as raised:
        create_key(database_url, name)
    message = str(raised.value)
    assert f"key name {name!r} starts or ends with white space" in message
    assert "use 'alice'" in message
    assert [key.name for key in list_keys(database_url)] == ["alice"]


def test_default_key_created_once(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    token = ensure_default_key(settings)
    assert token is not None
    path = settings.resolved_data_dir / "api-key"
    # Output names the file, never the secret.
    printed = capsys.readouterr()
    assert str(path) in printed.err
    assert token not in printed.err + printed.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token
    assert verify_token(settings.effective_database_url, token) is not None
    assert ensure_default_key(settings) is None


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    with pytest.raises(ValueError, match="both NEXUS_TLS_CERT and NEXUS_TLS_KEY"):
        uvicorn_options(Settings(data_dir=tmp_path, tls_cert=cert))
    with pytest.raises(ValueError, match="is not a file"):
        uvicorn_options(Settings(data_dir=tmp_path, tls_cert=cert, tls_key=cert))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_invalid_tls_file_one_line_error(tmp_path: Path) -> None:
    text = tmp_path / "hostname"
    text.write_text("somehost\n")
    env = server_env(Settings(data_dir=tmp_path / "data"))
    env.update(NEXUS_TLS_CERT=str(text), NEXUS_TLS_KEY=str(text))
    done = subprocess.run(
        [sys.executable, "-m", "app.api"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"error: NEXUS_TLS_CERT={text} is not a PEM certificate (no "
        "'-----BEGIN CERTIFICATE-----' line); point it at a PEM certificate file"
    )


def test_tls_key_of_another_certificate(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cert, _ = _self_signed(tmp_path / "one")
    _, other_key = _self_signed(tmp_path / "two")
    settings = Settings(data_dir=tmp_path, tls_cert=cert, tls_key=other_key)
    with pytest.raises(ValueError, match="cannot be loaded together"):
        uvicorn_options(settings)
    with pytest.raises(ValueError, match=r"NEXUS_TLS_KEY=.* is not a PEM private key"):
        uvicorn_options(Settings(data_dir=tmp_path, tls_cert=cert, tls_key=cert))


def test_first_start_with_tls(tmp_path: Path, temporal_address: str) -> None:
    """`python -m app.api` migrates, prints a default key once to stderr,
    and serves HTTPS with the configured certificate."""
    cert, key = _self_signed(tmp_path)
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data", temporal_address=temporal_address)
    env = server_env(settings)
    env.pop("NEXUS_DATABASE_URL")
    env.update(
        NEXUS_HTTP_PORT=str(port), NEXUS_TLS_CERT=str(cert), NEXUS_TLS_KEY=str(key)
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.api"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health", verify=str(cert))
                break
            except httpx.ConnectError:
                assert process.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, stderr_path.read_text()
                time.sleep(0.2)
        assert health.status_code == 200
        key_file = tmp_path / "data" / "api-key"
        token = key_file.read_text().strip()
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        response = httpx.post(
            f"{url}/api/tools/audit_log",
            json={"limit": 1},
            headers={"Authorization": f"Bearer {token}"},
            verify=str(cert),
        )
        assert response.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")  # the certificate is not trusted by default
    finally:
        process.terminate()
        stdout, _ = process.communicate(timeout=30)
    log = stderr_path.read_text()
    # The first start names the key's file once and never shows the token.
    assert token not in log
    assert log.count(str(key_file)) == 2
    assert stdout == b""


async def test_verified_key_reused_until_revoked(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, info = create_key(database_url, "cached")
    lookups = 0

    def counting_verify(url: str, presented: str) -> keys.Principal | None:
        nonlocal lookups
        lookups += 1
        return verify_token(url, presented)

    monkeypatch.setattr(keys, "verify_token", counting_verify)
    cache = keys.VerifiedKeys(database_url, ttl=3600)
    first = await cache.verify(token)
    second = await cache.verify(token)
    assert first is not None
    assert second == first
    assert lookups == 1
    # A wrong token is looked up each time and never cached.
    assert await cache.verify(token + "x") is None
    assert await cache.verify(token + "x") is None
    assert lookups == 3
    # A revocation in this process applies to the next call.
    revoke_key(database_url, info.id)
    assert await cache.verify(token) is None
    assert lookups == 4


async def test_key_cache_disabled_reads_every_call(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, _ = create_key(database_url, "uncached")
    lookups = 0

    def counting_verify(url: str, presented: str) -> keys.Principal | None:
        nonlocal lookups
        lookups += 1
        return verify_token(url, presented)

    monkeypatch.setattr(keys, "verify_token", counting_verify)
    cache = keys.VerifiedKeys(database_url, ttl=0)
    for _ in range(3):
        assert await cache.verify(token) is not None
    assert lookups == 3


async def test_concurrent_verifications_share_lookup(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, _ = create_key(database_url, "shared")
    lookups = 0

    def counting_verify(url: str, presented: str) -> keys.Principal | None:
        nonlocal lookups
        lookups += 1
        return verify_token(url, presented)

    monkeypatch.setattr(keys, "verify_token", counting_verify)
    cache = keys.VerifiedKeys(database_url, ttl=3600)
    results = await asyncio.gather(*(cache.verify(token) for _ in range(20)))
    assert all(result is not None for result in results)
    assert lookups == 1


async def test_key_read_again_before_expiry(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, info = create_key(database_url, "renewed")
    lookups = 0

    def counting_verify(url: str, presented: str) -> keys.Principal | None:
        nonlocal lookups
        lookups += 1
        return verify_token(url, presented)

    monkeypatch.setattr(keys, "verify_token", counting_verify)
    cache = keys.VerifiedKeys(database_url, ttl=3600)
    first = await cache.verify(token)
    assert first is not None
    # Revoked by another process: this process's counter does not move.
    with session_scope(database_url) as session:
        row = session.get(ApiKey, info.id)
        assert row is not None
        row.revoked_at = datetime.now(UTC)
        session.add(row)
    # Past half its life the entry is still returned, and read again in
    # the background; that read finds the revocation.
    for entry in cache._entries.values():
        object.__setattr__(entry, "verified_at", entry.verified_at - 2000)
    assert await cache.verify(token) == first
    assert len(cache._lookups) == 1
    await asyncio.gather(*cache._lookups.values())
    assert lookups == 2
    assert cache._entries == {}
    assert await cache.verify(token) is None
