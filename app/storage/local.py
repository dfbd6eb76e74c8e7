"""Buckets as folders under `<data_dir>/storage`, written atomically."""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError

from app.settings import Settings

logger = logging.getLogger(__name__)

# S3's rules, without dots, so a bucket name is always a plain folder name.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


class StorageError(ValueError):
    """Invalid bucket or path, or an object that does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    path: str
    size: int
    sha256: str
    content_type: str
    modified_at: datetime


def validate_bucket(bucket: str) -> str:
    if not _BUCKET_NAME.match(bucket):
        raise StorageError(
            f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits "
            "and hyphens, starting and ending with a letter or digit"
        )
    return bucket


def validate_path(path: str) -> str:
    """Return the normalized object path, or raise if it could leave the bucket."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise StorageError(
            f"invalid object path {path!r}: use a relative path such as "
            "'reports/run-1.md', without a leading slash or backslashes"
        )
    parts = PurePosixPath(path).parts
    if any(part in ("..", ".") for part in parts):
        raise StorageError(
            f"invalid object path {path!r}: '.' and '..' segments are not allowed, "
            "because they could reach outside the bucket"
        )
    return "/".join(parts)


class LocalStorage:
    """Byte-exact object storage in folders; each write is a temporary file
    renamed into place, so a reader sees the old object or the new one.

    With a `database_url`, every put and delete also writes the object's size,
    sha256 and content type to the `storage_objects` table.
    """

    def __init__(self, root: Path, database_url: str | None = None) -> None:
        self.root = root
        self.database_url = database_url

    def _object_path(self, bucket: str, path: str) -> Path:
        target = (self.root / validate_bucket(bucket) / validate_path(path)).resolve()
        bucket_root = (self.root / bucket).resolve()
        if not target.is_relative_to(bucket_root) or target == bucket_root:
            raise StorageError(f"invalid object path {path!r}: it leaves the bucket")
        return target

    def put(
        self, bucket: str, path: str, data: bytes, content_type: str | None = None
    ) -> ObjectInfo:
        target = self._object_path(bucket, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        info = self._info(bucket, path, target, data, content_type)
        self._record(info)
        return info

    def get(self, bucket: str, path: str) -> bytes:
        target = self._object_path(bucket, path)
        if not target.is_file():
            raise StorageError(f"object {path!r} not found in bucket {bucket!r}")
        return target.read_bytes()

    def stat(self, bucket: str, path: str) -> ObjectInfo:
        target = self._object_path(bucket, path)
        if not target.is_file():
            raise StorageError(f"object {path!r} not found in bucket {bucket!r}")
        recorded = self._recorded(bucket, validate_path(path))
        if recorded is not None and recorded.size == target.stat().st_size:
            return recorded
        return self._info(bucket, path, target, target.read_bytes(), None)

    def delete(self, bucket: str, path: str) -> bool:
        """Delete an object; return False if it did not exist."""
        target = self._object_path(bucket, path)
        if not target.is_file():
            return False
        target.unlink()
        self._forget(bucket, validate_path(path))
        return True

    def list(self, bucket: str, prefix: str = "", limit: int = 1000) -> list[str]:
        root = self.root / validate_bucket(bucket)
        if not root.is_dir():
            return []
        names: list[str] = []
        for file in sorted(root.rglob("*")):
            if not file.is_file() or file.name.startswith(".upload-"):
                continue
            name = file.relative_to(root).as_posix()
            if name.startswith(prefix):
                names.append(name)
                if len(names) >= limit:
                    break
        return names

    def _info(
        self,
        bucket: str,
        path: str,
        target: Path,
        data: bytes,
        content_type: str | None,
    ) -> ObjectInfo:
        guessed = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return ObjectInfo(
            bucket=bucket,
            path=validate_path(path),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            content_type=content_type or guessed,
            modified_at=datetime.fromtimestamp(target.stat().st_mtime, UTC),
        )

    def _record(self, info: ObjectInfo) -> None:
        if self.database_url is None:
            return
        from app.db import get_engine

        values = {
            "bucket": info.bucket,
            "path": info.path,
            "size": info.size,
            "sha256": info.sha256,
            "content_type": info.content_type,
            # The file's own time, so upload and download report the same.
            "now": info.modified_at,
        }
        try:
            with get_engine(self.database_url).begin() as connection:
                connection.execute(
                    text(
                        "DELETE FROM storage_objects WHERE bucket = :bucket "
                        "AND path = :path"
                    ),
                    values,
                )
                connection.execute(
                    text(
                        "INSERT INTO storage_objects (bucket, path, size, sha256, "
                        "content_type, created_at, updated_at) VALUES (:bucket, "
                        ":path, :size, :sha256, :content_type, :now, :now)"
                    ),
                    values,
                )
        except (OperationalError, ProgrammingError) as error:
            # A database without the storage migration still stores bytes.
            logger.warning(
                "object %s/%s stored without metadata: %s; run `nexus db upgrade`",
                info.bucket,
                info.path,
                error.orig,
            )

    def _recorded(self, bucket: str, path: str) -> ObjectInfo | None:
        if self.database_url is None:
            return None
        from app.db import get_engine

        try:
            with get_engine(self.database_url).connect() as connection:
                row = connection.execute(
                    text(
                        "SELECT size, sha256, content_type, updated_at FROM "
                        "storage_objects WHERE bucket = :bucket AND path = :path"
                    ),
                    {"bucket": bucket, "path": path},
                ).first()
        except (OperationalError, ProgrammingError):
            return None
        if row is None:
            return None
        modified = row[3]
        if not isinstance(modified, datetime):
            modified = datetime.fromisoformat(str(modified))
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        return ObjectInfo(bucket, path, int(row[0]), row[1], row[2], modified)

    def _forget(self, bucket: str, path: str) -> None:
        if self.database_url is None:
            return
        from app.db import get_engine

        try:
            with get_engine(self.database_url).begin() as connection:
                connection.execute(
                    text(
                        "DELETE FROM storage_objects WHERE bucket = :bucket "
                        "AND path = :path"
                    ),
                    {"bucket": bucket, "path": path},
                )
        except (OperationalError, ProgrammingError) as error:
            logger.warning("metadata of %s/%s not removed: %s", bucket, path, error)


def storage_for(settings: Settings) -> LocalStorage:
    """Return the storage of these settings, recording metadata in their
    database."""
    return LocalStorage(
        settings.resolved_data_dir / "storage", settings.effective_database_url
    )
