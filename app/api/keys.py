"""API keys: creation, verification, revocation and rotation.

A key reads `nxk_<id>_<secret>`. The id finds the row; the secret is checked
against HMAC-SHA256 under the row's own salt with a constant-time comparison.
A fast keyed hash is enough because the secret is 32 random bytes, so there
is no dictionary to guess from. A slow hash would only add latency per call.

`VerifiedKeys` keeps the keys that an HTTP server process verified for a
short time, so a call costs no database lookup. A revocation or rotation in
the same process applies at once, and one made by another process (the
`nexus keys` command) applies within `NEXUS_API_KEY_CACHE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import secrets
import sys
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text, update
from sqlmodel import Session, col, select

from app.api.models import ApiKey
from app.db import session_scope
from app.db.models import AuditEvent, utc_now
from app.realtime.models import RealtimeSubscription
from app.settings import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "nxk"
DEFAULT_KEY_FILE = "api-key"
# The audit log records a key's calls under the user id `key:<name>`, so a
# name may be only as long as that column leaves room for.
USER_ID_PREFIX = "key:"
MAX_KEY_NAME_LENGTH = AuditEvent.model_fields["user_id"].metadata[0].max_length - len(
    USER_ID_PREFIX
)
# Unicode categories rejected in key names: control characters (Cc), format
# characters such as bidirectional overrides (Cf), surrogates (Cs), and the
# line and paragraph separators (Zl, Zp). Each would split or disguise the
# log lines and audit entries that show the name.
_REJECTED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# PostgreSQL advisory lock that serializes key creation, so that concurrent
# creates cannot give two active keys the same name.
_CREATE_LOCK_KEY = 7233004

# Bumped by every revocation and rotation in this process; a cached key
# verified under an older value is verified again.
_revocations = itertools.count(1)
_revocation = 0


def _bump_revocation() -> None:
    global _revocation
    _revocation = next(_revocations)


class KeyNotFoundError(Exception):
    """A key operation on an id that does not exist or is already revoked."""


class DuplicateKeyNameError(ValueError):
    """A new key named like an active key, whose audit entries would read the
    same `key:<name>`."""


@dataclass(frozen=True)
class Principal:
    """The caller behind a verified key."""

    key_id: str
    name: str
    groups: tuple[str, ...] | None

    @property
    def user_id(self) -> str:
        return f"{USER_ID_PREFIX}{self.name}"

    def may_call(self, group: str) -> bool:
        return self.groups is None or group in self.groups


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: everything but the secret, which is never stored."""

    id: str
    name: str
    groups: list[str] | None
    created_at: datetime
    revoked_at: datetime | None
    replaced_by: str | None


def _hash_secret(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def _utc(value: datetime | None) -> datetime | None:
    # SQLite drops the offset; every stored time is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _info(row: ApiKey) -> KeyInfo:
    created_at = _utc(row.created_at)
    assert created_at is not None
    return KeyInfo(
        id=row.id,
        name=row.name,
        groups=list(row.groups) if row.groups is not None else None,
        created_at=created_at,
        revoked_at=_utc(row.revoked_at),
        replaced_by=row.replaced_by,
    )


def validate_key_name(name: str) -> None:
    """Raise a ValueError naming the problem and the fix unless `name` is a
    valid key name: not blank, without white space at either end, at most
    `MAX_KEY_NAME_LENGTH` characters, and without control or format
    characters."""
    if not name.strip():
        raise ValueError(
            f"key name {name!r} is empty; name the key after who or what uses "
            "it, for example `nexus keys create ci-bot`"
        )
    if name != name.strip():
        # `alice ` beside `alice` would read as one caller in the audit log.
        raise ValueError(
            f"key name {name!r} starts or ends with white space; use {name.strip()!r}"
        )
    if len(name) > MAX_KEY_NAME_LENGTH:
        raise ValueError(
            f"key name {name[:40]!r}... is {len(name)} characters long, over the "
            f"maximum of {MAX_KEY_NAME_LENGTH}, because the audit log records the "
            f"caller as `{USER_ID_PREFIX}<name>`; choose a shorter name"
        )
    for position, character in enumerate(name):
        if unicodedata.category(character) in _REJECTED_CATEGORIES:
            raise ValueError(
                f"key name {name!r} contains the control or format character "
                f"U+{ord(character):04X} at position {position}; use printable "
                "characters only, for example `nexus keys create ci-bot`"
            )


def create_key(
    database_url: str, name: str, groups: list[str] | None = None
) -> tuple[str, KeyInfo]:
    """Create a key and return its secret token (shown once) and its info.

    Raises:
        ValueError: an invalid `name` (see `validate_key_name`).
        DuplicateKeyNameError: an active key already has this name.
    """
    validate_key_name(name)
    return _insert_key(database_url, name, groups, unique_name=True)


def _insert_key(
    database_url: str, name: str, groups: list[str] | None, *, unique_name: bool
) -> tuple[str, KeyInfo]:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    row = ApiKey(
        id=key_id,
        name=name,
        salt=salt,
        secret_hash=_hash_secret(salt, secret),
        groups=sorted(set(groups)) if groups else None,
    )
    with session_scope(database_url) as session:
        session.add(row)
        session.flush()
        if unique_name:
            _check_name_unique(session, row)
        info = _info(row)
    # repr: a name stored by an earlier version may contain a line break.
    logger.info("created API key %s (%r)", key_id, name)
    return f"{KEY_PREFIX}_{key_id}_{secret}", info


def _check_name_unique(session: Session, row: ApiKey) -> None:
    # Checked after the insert, in its transaction: on SQLite the insert takes
    # the database's one write lock, so a concurrent create waits for this
    # commit and then finds this row. Under PostgreSQL's READ COMMITTED two
    # creates would not see each other's uncommitted rows, so creates there
    # also hold an advisory lock until they commit.
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK_KEY}
        )
    active = session.exec(
        select(ApiKey.id).where(
            ApiKey.name == row.name,
            ApiKey.id != row.id,
            col(ApiKey.revoked_at).is_(None),
        )
    ).first()
    if active is not None:
        raise DuplicateKeyNameError(
            f"key name {row.name!r} is already used by the active key {active}, "
            f"and the audit log would record both as `{USER_ID_PREFIX}{row.name}`; "
            f"choose another name, or replace that key with `nexus keys rotate "
            f"{active}`"
        )


def list_keys(database_url: str, *, include_revoked: bool = True) -> list[KeyInfo]:
    query = select(ApiKey).order_by(col(ApiKey.created_at))
    if not include_revoked:
        query = query.where(col(ApiKey.revoked_at).is_(None))
    with session_scope(database_url) as session:
        return [_info(row) for row in session.exec(query).all()]


def revoke_key(database_url: str, key_id: str) -> KeyInfo:
    """Revoke a key so that it is rejected from the next request on.

    Raises:
        KeyNotFoundError: no active key has this id.
    """
    with session_scope(database_url) as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            raise KeyNotFoundError(
                f"no active API key with id {key_id!r}; list the keys with "
                "`nexus keys list`"
            )
        row.revoked_at = utc_now()
        session.add(row)
        session.flush()
        info = _info(row)
    _bump_revocation()
    logger.info("revoked API key %s", key_id)
    return info


def rotate_key(database_url: str, key_id: str) -> tuple[str, KeyInfo]:
    """Replace a key by a new one with the same name and groups, and revoke it.
    The new key owns the old key's realtime subscriptions.

    Raises:
        KeyNotFoundError: no active key has this id.
    """
    with session_scope(database_url) as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            raise KeyNotFoundError(
                f"no active API key with id {key_id!r}; list the keys with "
                "`nexus keys list`"
            )
        name, groups = row.name, row.groups
    # Not `create_key`: a name that an earlier version accepted stays valid
    # for its key, and the audit log shortens an over-long caller id.
    token, info = _insert_key(database_url, name, groups, unique_name=False)
    with session_scope(database_url) as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
        row.revoked_at = utc_now()
        row.replaced_by = info.id
        session.add(row)
        # The new key takes over what the old one owns.
        session.execute(
            update(RealtimeSubscription)
            .where(col(RealtimeSubscription.key_id) == key_id)
            .values(key_id=info.id)
        )
    _bump_revocation()
    logger.info("rotated API key %s to %s", key_id, info.id)
    return token, info


def parse_token(token: str) -> tuple[str, str] | None:
    """Split `nxk_<id>_<secret>` into id and secret, or None when malformed."""
    prefix, sep, rest = token.partition("_")
    if prefix != KEY_PREFIX or not sep:
        return None
    key_id, sep, secret = rest.partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


def verify_token(database_url: str, token: str) -> Principal | None:
    """Return the caller of an active key, or None for any unknown,
    malformed, wrong or revoked token."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    key_id, secret = parsed
    with session_scope(database_url) as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            return None
        expected, salt = row.secret_hash, row.salt
        revoked = row.revoked_at is not None
        name, groups = row.name, row.groups
    if not hmac.compare_digest(_hash_secret(salt, secret), expected):
        return None
    if revoked:
        return None
    return Principal(key_id, name, tuple(groups) if groups is not None else None)


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    verified_at: float
    revocation: int


class VerifiedKeys:
    """Keys verified by this process, reused for `ttl` seconds.

    Entries are found by HMAC-SHA256 of the token under a random key of this
    process, so neither the token nor a hash that could be checked offline
    is kept in memory, and the time of a dictionary lookup reveals nothing
    about a secret. A token is compared in constant time by `verify_token`
    before it is cached. Only valid keys are cached, so every wrong or
    revoked token is looked up in the database.

    Use it from one event loop.

    Args:
        database_url: the database that contains the keys.
        ttl: seconds a verified key is reused; 0 reads it on every call.
        max_entries: maximum number of cached keys; expired entries are dropped
            when the cache is full.
    """

    def __init__(
        self, database_url: str, ttl: float, *, max_entries: int = 10_000
    ) -> None:
        self.database_url = database_url
        self.ttl = ttl
        self.max_entries = max_entries
        self._pepper = secrets.token_bytes(32)
        self._entries: dict[bytes, _Verified] = {}
        self._lookups: dict[bytes, asyncio.Task[Principal | None]] = {}

    async def verify(self, token: str) -> Principal | None:
        """Return the caller of an active key, or None; see `verify_token`."""
        if self.ttl <= 0:
            return await asyncio.to_thread(verify_token, self.database_url, token)
        digest = hmac.new(self._pepper, token.encode(), hashlib.sha256).digest()
        entry = self._entries.get(digest)
        if entry is not None and entry.revocation == _revocation:
            age = time.monotonic() - entry.verified_at
            if age < self.ttl:
                # Read again in the background past half the entry's life, so
                # that under steady traffic no call waits for the database.
                # The entry is still returned only until `ttl`.
                if age > self.ttl / 2 and digest not in self._lookups:
                    self._start_lookup(digest, token).add_done_callback(
                        _log_lookup_failure
                    )
                return entry.principal
        # Concurrent calls with the same token share one database lookup.
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = self._start_lookup(digest, token)
        return await asyncio.shield(lookup)

    def _start_lookup(
        self, digest: bytes, token: str
    ) -> asyncio.Task[Principal | None]:
        lookup = asyncio.get_running_loop().create_task(self._look_up(digest, token))
        self._lookups[digest] = lookup
        return lookup

    async def _look_up(self, digest: bytes, token: str) -> Principal | None:
        revocation = _revocation
        started = time.monotonic()
        try:
            principal = await asyncio.to_thread(verify_token, self.database_url, token)
        finally:
            del self._lookups[digest]
        if principal is None:
            self._entries.pop(digest, None)
            return None
        if len(self._entries) >= self.max_entries:
            self._drop_expired()
        if len(self._entries) < self.max_entries:
            self._entries[digest] = _Verified(principal, started, revocation)
        return principal

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for digest, entry in list(self._entries.items()):
            if now - entry.verified_at >= self.ttl or entry.revocation != _revocation:
                del self._entries[digest]


def _log_lookup_failure(task: asyncio.Task[Principal | None]) -> None:
    # Retrieves the error of a background lookup that no call awaited; the
    # cached entry then expires at its deadline and the next call reads again.
    if not task.cancelled() and task.exception() is not None:
        logger.warning("background lookup of an API key failed: %s", task.exception())


def ensure_default_key(settings: Settings) -> str | None:
    """Create a key named `default` when no active key exists.

    The token is written to `<data dir>/api-key` with mode 0600, and stderr
    names that file. The token itself is not printed, because terminal
    scrollback and CI logs would keep it. Later starts find the key and
    print nothing. Returns the new token, or None when an active key already
    existed.
    """
    url = settings.effective_database_url
    path = default_key_path(settings)
    if list_keys(url, include_revoked=False):
        file_key_id = default_key_file_id(settings)
        if file_key_id is not None and verify_token(url, _read_token(path)) is None:
            print(
                f"warning: {path} holds the token of key {file_key_id}, which is "
                "revoked or unknown, so requests sent with it get 401. Write the "
                "token of an active key into it (`nexus keys create NAME` prints "
                "a new one), or delete the file",
                file=sys.stderr,
            )
        return None
    token, info = create_key(url, "default")
    write_default_key_file(path, token)
    print(
        f"Created API key {info.id} (default); its token is in {path} "
        "(readable by this user only). Send it as `Authorization: Bearer "
        f"$(cat {path})`.",
        file=sys.stderr,
    )
    return token


def default_key_path(settings: Settings) -> Path:
    return settings.resolved_data_dir / DEFAULT_KEY_FILE


def write_default_key_file(path: Path, token: str) -> None:
    """Write `token` to `path`, readable by this user only, replacing the
    file in one rename so that a reader never sees half a token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    # O_CREAT with 0600 so the secret is never readable by others, not even
    # between creating the file and a later chmod.
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    os.chmod(scratch, 0o600)
    os.replace(scratch, path)


def _read_token(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def default_key_file_id(settings: Settings) -> str | None:
    """Return the id of the key whose token `<data dir>/api-key` contains,
    or None when there is no such file or it contains no token."""
    parsed = parse_token(_read_token(default_key_path(settings)))
    return None if parsed is None else parsed[0]
