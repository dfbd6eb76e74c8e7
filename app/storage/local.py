"""Buckets as folders under `<data_dir>/storage`, written atomically."""

from __future__ import annotations

import builtins
import errno
import hashlib
import logging
import mimetypes
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from stat import S_ISREG

from sqlalchemy import Connection, RootTransaction, inspect, text
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError

from app.contracts.object_paths import path_problem, prefix_problem, shown
from app.settings import Settings

logger = logging.getLogger(__name__)

# S3's rules, without dots, so a bucket name is always a plain folder name.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")

# The width of the storage_objects column, checked before anything is written.
MAX_CONTENT_TYPE_LENGTH = 200

# A media type as HTTP defines it: type/subtype, then `; name=value`
# parameters whose values are tokens or quoted strings, ASCII only, so a
# stored type is always a valid Content-Type header.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t !-~])*"'
_CONTENT_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?)*"
)

# Temporary and backup files live in this folder of the storage root. Bucket
# names cannot start with a dot, so it is never a bucket, and no object name
# is reserved for them.
TEMPORARY_FOLDER = ".tmp"

_UPSERT = text(
    "INSERT INTO storage_objects (bucket, path, size, sha256, content_type, "
    "created_at, updated_at) VALUES (:bucket, :path, :size, :sha256, "
    ":content_type, :now, :now) ON CONFLICT (bucket, path) DO UPDATE SET "
    "size = excluded.size, sha256 = excluded.sha256, "
    "content_type = excluded.content_type, updated_at = excluded.updated_at"
)

# Takes the row lock of one object whether or not its row exists, as the
# upsert of a put does. On PostgreSQL an upsert waits for every open
# transaction that inserted, updated or deleted that key, where a SELECT ...
# FOR UPDATE would not wait for an uncommitted insert. On SQLite any write
# waits for the database's write lock. The placeholder values are never
# committed: the caller deletes the row or rolls back.
_LOCK_ROW = text(
    "INSERT INTO storage_objects (bucket, path, size, sha256, content_type, "
    "created_at, updated_at) VALUES (:bucket, :path, 0, '', '', :now, :now) "
    "ON CONFLICT (bucket, path) DO UPDATE SET size = storage_objects.size"
)

_SELECT_ROW = text(
    "SELECT size, sha256, content_type, updated_at FROM storage_objects "
    "WHERE bucket = :bucket AND path = :path"
)

_DELETE_ROW = text(
    "DELETE FROM storage_objects WHERE bucket = :bucket AND path = :path"
)


class StorageError(ValueError):
    """Invalid bucket, path or content type, or an object that does not exist."""


class ObjectNotFound(StorageError):
    """A missing object: the bucket has no file at the path."""


class StorageFailure(RuntimeError):
    """A write that failed on the server side (disk, database); the previous
    object and its metadata are unchanged, and a retry may succeed."""


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    path: str
    size: int
    sha256: str
    content_type: str
    modified_at: datetime


def validate_bucket(bucket: str) -> str:
    """Return `bucket`, or raise StorageError if it is not a valid bucket name."""
    if not _BUCKET_NAME.fullmatch(bucket):
        raise StorageError(
            f"invalid bucket name {shown(bucket)}: use 3-63 lowercase letters, digits "
            "and hyphens, starting and ending with a letter or digit"
        )
    return bucket


def validate_path(path: str) -> str:
    """Return `path` if it names exactly one object inside a bucket.

    Raises:
        StorageError: the path could leave the bucket, has `.`, `..` or empty
            segments (which would give one object several names), contains a
            control character, or is longer than the metadata column or the
            filesystem allow.
    """
    problem = path_problem(path)
    if problem is not None:
        raise StorageError(problem)
    return path


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if some valid object path can start with it.

    Raises:
        StorageError: the message that `validate_path` gives for `prefix`.
    """
    problem = prefix_problem(prefix)
    if problem is not None:
        raise StorageError(problem)
    return prefix


def validate_content_type(content_type: str | None) -> str | None:
    """Return `content_type` if it is a valid media type (None stays None).

    Raises:
        StorageError: the value is longer than the metadata column, or is not
            `type/subtype` with optional `; name=value` parameters in ASCII.
    """
    if content_type is None:
        return None
    if len(content_type) > MAX_CONTENT_TYPE_LENGTH:
        raise StorageError(
            f"invalid content_type {content_type[:40]!r}... ({len(content_type)} "
            f"characters): a content type is at most {MAX_CONTENT_TYPE_LENGTH} "
            "characters"
        )
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise StorageError(
            f"invalid content_type {content_type!r}: use a MIME type such as "
            "'text/plain' or 'text/csv; charset=utf-8' (type/subtype with "
            "optional name=value parameters, ASCII, no spaces around the '/' "
            "and no line breaks), or leave it unset to guess it from the path"
        )
    return content_type


def _write_row(connection: Connection, values: dict[str, object]) -> None:
    """Insert or update one object's metadata row in the open transaction."""
    connection.execute(_UPSERT, values)


def _lock_row(connection: Connection, bucket: str, path: str) -> None:
    connection.execute(
        _LOCK_ROW, {"bucket": bucket, "path": path, "now": datetime.now(UTC)}
    )


def _commit(transaction: RootTransaction) -> None:
    transaction.commit()


def _reason(error: OSError) -> str:
    """Describe `error` without its file names, which are server paths."""
    if error.errno is not None:
        return os.strerror(error.errno)
    return type(error).__name__


class LocalStorage:
    """Byte-exact object storage in folders.

    A put is all-or-nothing. It checks every limit first and writes the bytes
    to a temporary file outside the buckets. It then writes the metadata row
    in a transaction that stays open while the file is renamed into place,
    and commits last. A failure at any step leaves the previous object and
    its row as they were, and no new file behind. Readers see the old object
    or the new one. With a `database_url`, every put and delete also writes
    the object's size, sha256 and content type to the `storage_objects` table.
    A delete holds the same row lock as a put until it commits. A read whose
    row does not record the bytes it read reads the file and the row again
    under that lock.
    """

    def __init__(self, root: Path, database_url: str | None = None) -> None:
        self.root = root
        self.database_url = database_url

    def _object_path(self, bucket: str, path: str) -> Path:
        target = (self.root / validate_bucket(bucket) / validate_path(path)).resolve()
        bucket_root = (self.root / bucket).resolve()
        if not target.is_relative_to(bucket_root) or target == bucket_root:
            # validate_path allows no `..`, so only a link put in the bucket's
            # folder by hand leads out of it.
            raise StorageError(
                f"invalid object path {path!r}: on disk it is a symbolic link "
                f"that leads out of the bucket; remove the link from "
                f"{bucket_root}"
            )
        return target

    def put(
        self, bucket: str, path: str, data: bytes, content_type: str | None = None
    ) -> ObjectInfo:
        """Store `data` as object `path` of `bucket`, with its metadata row.

        Raises:
            StorageError: an invalid bucket, path or content type, or a path
                that conflicts with an object or folder; nothing was written.
            StorageFailure: the disk or the database failed; the previous
                object and its metadata are unchanged.
        """
        chosen = validate_content_type(content_type or None)
        target = self._object_path(bucket, path)
        self._check_conflicts(bucket, path)
        guessed = mimetypes.guess_type(path)[0] or "application/octet-stream"
        temporary_root = self.root / TEMPORARY_FOLDER
        created: list[Path] = []
        backup: Path | None = None
        temporary: Path | None = None
        done = False
        try:
            temporary_root.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=temporary_root, prefix="upload-")
            temporary = Path(name)
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            info = ObjectInfo(
                bucket=bucket,
                path=path,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                content_type=chosen or guessed,
                # The file's own time, so upload and download report the same.
                modified_at=datetime.fromtimestamp(temporary.stat().st_mtime, UTC),
            )
            connection, transaction = self._begin_record(info)
            try:
                _make_folders(self.root, bucket, path, created)
                backup = self._keep_previous(target)
                self._rename(temporary, target, bucket, path)
                if transaction is not None:
                    try:
                        _commit(transaction)
                    except SQLAlchemyError as error:
                        restored = self._restore(target, backup)
                        raise self._metadata_failure(info, error, restored) from None
            finally:
                if connection is not None:
                    connection.close()
            done = True
            return info
        except OSError as error:
            logger.warning("object %s/%s not written: %s", bucket, path, error)
            raise StorageFailure(
                f"could not write object {path!r} in bucket {bucket!r}: "
                f"{_reason(error)}; the previous object is unchanged"
            ) from None
        finally:
            for leftover in (temporary, backup):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)
            if not done:
                for folder in reversed(created):
                    _remove_folder(folder)

    def get(self, bucket: str, path: str) -> bytes:
        """Return an object's bytes.

        Raises:
            ObjectNotFound: the bucket has no object at `path`.
            StorageError: an invalid bucket or path.
        """
        target = self._object_path(bucket, path)
        return _read_file(bucket, path, target)[0]

    def read(self, bucket: str, path: str) -> tuple[bytes, ObjectInfo]:
        """Return an object's bytes and the metadata of that same version.

        Size and sha256 are always those of the returned bytes. Content type
        and modified time are those of the put that wrote them. For a file
        written by hand, the content type is guessed from the path and the
        modified time is the file's.

        Raises:
            ObjectNotFound: the bucket has no object at `path`.
            StorageError: an invalid bucket or path.
        """
        target = self._object_path(bucket, path)
        data, status = _read_file(bucket, path, target)
        info = _describe(bucket, path, data, status)
        recorded = self._recorded(bucket, path)
        if recorded is not None and _records(recorded, info):
            return data, recorded
        if self.database_url is None:
            return data, info
        # The row is missing or records other bytes: a put or delete is
        # between its file change and its commit, or the file changed by hand.
        return self._read_locked(bucket, path, target)

    def stat(self, bucket: str, path: str) -> ObjectInfo:
        """Return an object's metadata, reading its bytes only when its row is
        missing or records another size.

        Raises:
            ObjectNotFound: the bucket has no object at `path`.
            StorageError: an invalid bucket or path.
        """
        target = self._object_path(bucket, path)
        try:
            status = target.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise _not_found(bucket, path) from None
        if not S_ISREG(status.st_mode):
            raise _not_found(bucket, path)
        recorded = self._recorded(bucket, path)
        if recorded is not None and recorded.size == status.st_size:
            return recorded
        return self.read(bucket, path)[1]

    def delete(self, bucket: str, path: str) -> bool:
        """Delete an object and its metadata row. Return False if it did not
        exist.

        The delete holds the object's row lock, as a put does, from before it
        checks the file until it commits. A put of the same path therefore
        runs wholly before or wholly after it, and the file and the row are
        both kept or both deleted.

        Raises:
            StorageError: an invalid bucket or path.
            StorageFailure: the disk or the database failed; the object and
                its metadata are unchanged.
        """
        target = self._object_path(bucket, path)
        try:
            connection, transaction = self._begin(
                bucket, path, lambda opened: _lock_row(opened, bucket, path)
            )
        except SQLAlchemyError as error:
            raise _delete_failure(bucket, path, error) from None
        try:
            if not target.is_file():
                return False
            if connection is None or transaction is None:
                target.unlink(missing_ok=True)
                self._remove_empty_folders(bucket, path)
                return True
            self._delete_locked(connection, transaction, bucket, path, target)
            return True
        finally:
            if connection is not None:
                connection.close()

    def list(self, bucket: str, prefix: str = "", limit: int = 1000) -> list[str]:
        """Return the paths of up to `limit` objects that start with `prefix`,
        sorted by their `/`-separated segments.

        Raises:
            StorageError: an invalid bucket, or a prefix that no valid path
                starts with (see `validate_prefix`).
        """
        return list(islice(self._paths(bucket, prefix), limit))

    def list_objects(
        self, bucket: str, prefix: str = "", limit: int = 1000
    ) -> builtins.list[ObjectInfo]:
        """Return the metadata of up to `limit` objects in the order of `list`,
        leaving out the objects deleted after the walk found them."""
        infos: builtins.list[ObjectInfo] = []
        for path in self._paths(bucket, prefix):
            if len(infos) >= limit:
                break
            try:
                infos.append(self.stat(bucket, path))
            except ObjectNotFound:
                continue
        return infos

    def _paths(self, bucket: str, prefix: str) -> Iterator[str]:
        root = self.root / validate_bucket(bucket)
        validate_prefix(prefix)
        names: builtins.list[str] = []
        # os.walk skips a folder that a delete removes while it walks, where
        # Path.rglob of Python 3.11 raises FileNotFoundError.
        for folder, _folders, files in os.walk(root):
            relative = Path(folder).relative_to(root)
            names.extend((relative / file).as_posix() for file in files)
        names.sort(key=lambda name: name.split("/"))
        for name in names:
            if not name.startswith(prefix) or not (root / name).is_file():
                continue
            if (root / name).is_symlink():
                # Put there by hand: no tool writes links, and one may lead
                # out of the bucket, which no tool may read.
                logger.warning(
                    "bucket %s: symbolic link %r left out of the list", bucket, name
                )
                continue
            try:
                validate_path(name)
            except StorageError as error:
                # No tool can read or delete a file put there by hand, or by
                # a version that allowed control characters.
                logger.warning(
                    "bucket %s: file left out of the list: %s", bucket, error
                )
                continue
            yield name

    def _check_conflicts(self, bucket: str, path: str) -> None:
        """Raise StorageError if a folder of `path` is an object, or if `path`
        is a folder that contains objects. An empty folder left on disk is
        removed, so its name can become an object."""
        segments = path.split("/")
        folder = self.root / bucket
        for depth, segment in enumerate(segments[:-1], start=1):
            folder = folder / segment
            if folder.exists() and not folder.is_dir():
                raise _object_is_folder(path, "/".join(segments[:depth]))
        target = self.root / bucket / path
        if target.is_dir():
            for walked, _folders, _files in os.walk(target, topdown=False):
                _remove_folder(Path(walked))
            if target.is_dir():
                raise _folder_is_object(path, self._first_object(bucket, path))

    def _first_object(self, bucket: str, folder: str) -> str | None:
        names = self.list(bucket, prefix=folder + "/", limit=1)
        return names[0] if names else None

    def _keep_previous(self, target: Path) -> Path | None:
        """Hard-link the object being replaced into the temporary folder, so a
        failed commit can put it back; None when there is no such object."""
        if not target.is_file():
            return None
        backup = self.root / TEMPORARY_FOLDER / f"previous-{secrets.token_hex(8)}"
        try:
            os.link(target, backup)
        except PermissionError:
            shutil.copy2(target, backup)  # a filesystem without hard links
        return backup

    def _rename(self, temporary: Path, target: Path, bucket: str, path: str) -> None:
        try:
            os.replace(temporary, target)
        except IsADirectoryError:
            # Another writer created objects under this name since the check.
            raise _folder_is_object(path, self._first_object(bucket, path)) from None
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:
                raise _name_too_long(path) from None
            raise

    def _restore(self, target: Path, backup: Path | None) -> bool:
        """Put the replaced object back after a failed commit, or remove the
        new one when there was none; return whether that worked."""
        try:
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)
        except OSError:
            logger.exception(
                "object file %s not restored after a failed commit", target
            )
            return False
        return True

    def _begin_record(
        self, info: ObjectInfo
    ) -> tuple[Connection | None, RootTransaction | None]:
        """Write the metadata row in a transaction the caller commits; the row
        lock also orders concurrent writers of one object. (None, None) when
        there is no database or it lacks the storage table."""
        values = {
            "bucket": info.bucket,
            "path": info.path,
            "size": info.size,
            "sha256": info.sha256,
            "content_type": info.content_type,
            "now": info.modified_at,
        }
        try:
            return self._begin(
                info.bucket,
                info.path,
                lambda connection: _write_row(connection, values),
            )
        except SQLAlchemyError as error:
            raise self._metadata_failure(info, error) from None

    def _begin(
        self, bucket: str, path: str, write: Callable[[Connection], None]
    ) -> tuple[Connection | None, RootTransaction | None]:
        """Open a transaction whose first statement, `write`, writes the
        object's row and so takes its row lock. (None, None) when there is no
        database or it lacks the storage table.

        Raises:
            SQLAlchemyError: the database failed.
        """
        if self.database_url is None:
            return None, None
        from app.db import get_engine

        engine = get_engine(self.database_url)
        connection = engine.connect()
        try:
            transaction = connection.begin()
            write(connection)
        except SQLAlchemyError:
            connection.close()
            try:
                missing = not inspect(engine).has_table("storage_objects")
            except SQLAlchemyError:
                missing = False
            if not missing:
                raise
            # A database without the storage migration still stores bytes.
            logger.warning(
                "object %s/%s has no metadata row: the storage_objects table is "
                "missing; run `nexus db upgrade`",
                bucket,
                path,
            )
            return None, None
        return connection, transaction

    def _delete_locked(
        self,
        connection: Connection,
        transaction: RootTransaction,
        bucket: str,
        path: str,
        target: Path,
    ) -> None:
        """Delete the file and the row of an object whose row lock the open
        `transaction` holds, and commit. A failed commit puts the file back."""
        backup = self.root / TEMPORARY_FOLDER / f"deleted-{secrets.token_hex(8)}"
        try:
            backup.parent.mkdir(exist_ok=True)
            os.replace(target, backup)
        except OSError as error:
            logger.warning("object %s/%s not deleted: %s", bucket, path, error)
            raise StorageFailure(
                f"could not delete object {path!r} in bucket {bucket!r}: "
                f"{_reason(error)}; the object is unchanged"
            ) from None
        try:
            connection.execute(_DELETE_ROW, {"bucket": bucket, "path": path})
            # Before the commit, while the lock still keeps out a put of this
            # path, which could otherwise find its folder gone.
            self._remove_empty_folders(bucket, path)
            _commit(transaction)
        except SQLAlchemyError as error:
            restored = self._put_back(bucket, path, backup, target)
            raise _delete_failure(bucket, path, error, restored) from None
        backup.unlink(missing_ok=True)

    def _remove_empty_folders(self, bucket: str, path: str) -> None:
        """Remove the folders that deleting `path` left empty, so their names
        can become objects again."""
        # NOTE: on PostgreSQL a put of another path in such a folder holds
        # another row lock. If it created its folders just before this removes
        # them, its rename fails and it reports a failed write; a retry works.
        bucket_root = self.root / bucket
        folder = (bucket_root / path).parent
        while folder != bucket_root and _remove_folder(folder):
            folder = folder.parent

    def _put_back(self, bucket: str, path: str, backup: Path, target: Path) -> bool:
        """Move a deleted object's file back after a failed commit; return
        whether that worked."""
        try:
            _make_folders(self.root, bucket, path, [])
            os.replace(backup, target)
        except (OSError, StorageError):
            logger.exception(
                "object file %s not put back after a failed delete", target
            )
            return False
        return True

    def _read_locked(
        self, bucket: str, path: str, target: Path
    ) -> tuple[bytes, ObjectInfo]:
        """Read an object's file and row while holding its row lock, so that
        no put or delete is between its file change and its commit."""
        assert self.database_url is not None
        from app.db import get_engine

        try:
            with get_engine(self.database_url).connect() as connection:
                transaction = connection.begin()
                try:
                    _lock_row(connection, bucket, path)
                    data, status = _read_file(bucket, path, target)
                    recorded = _select_recorded(connection, bucket, path)
                finally:
                    # Rolling back drops the placeholder row of the lock.
                    transaction.rollback()
        except (OperationalError, ProgrammingError) as error:
            logger.warning(
                "object %s/%s read without its metadata row: %s", bucket, path, error
            )
            data, status = _read_file(bucket, path, target)
            return data, _describe(bucket, path, data, status)
        info = _describe(bucket, path, data, status)
        if recorded is not None and _records(recorded, info):
            return data, recorded
        return data, info

    @staticmethod
    def _metadata_failure(
        info: ObjectInfo, error: SQLAlchemyError, restored: bool = True
    ) -> StorageFailure:
        logger.error("metadata of %s/%s not written: %s", info.bucket, info.path, error)
        cause = getattr(error, "orig", None) or error
        state = (
            "the previous object is unchanged"
            if restored
            else "the object file could not be put back; see the server log"
        )
        return StorageFailure(
            f"could not record the metadata of object {info.path!r} in bucket "
            f"{info.bucket!r} ({type(cause).__name__}); {state}; retry, and see "
            "the server log if it fails again"
        )

    def _recorded(self, bucket: str, path: str) -> ObjectInfo | None:
        if self.database_url is None:
            return None
        from app.db import get_engine

        try:
            with get_engine(self.database_url).connect() as connection:
                return _select_recorded(connection, bucket, path)
        except (OperationalError, ProgrammingError):
            return None


def storage_for(settings: Settings) -> LocalStorage:
    """Return the storage of these settings, recording metadata in their
    database."""
    return LocalStorage(
        settings.resolved_data_dir / "storage", settings.effective_database_url
    )


def _read_file(bucket: str, path: str, target: Path) -> tuple[bytes, os.stat_result]:
    """Return the bytes of the file at `target` and its status, both from one
    open file, so they describe the same version even while a put replaces it.

    Raises:
        ObjectNotFound: `target` is missing or is not a regular file.
    """
    try:
        # O_NONBLOCK: opening a FIFO put there by hand must not wait for a writer.
        descriptor = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(bucket, path) from None
    try:
        # Checked on the descriptor, before `fdopen`, which raises for a
        # folder and would leave the descriptor open.
        status = os.fstat(descriptor)
        if not S_ISREG(status.st_mode):
            raise _not_found(bucket, path)
    except BaseException:
        os.close(descriptor)
        raise
    with os.fdopen(descriptor, "rb") as file:
        return file.read(), status


def _describe(
    bucket: str, path: str, data: bytes, status: os.stat_result
) -> ObjectInfo:
    """Describe bytes that no metadata row records, guessing the content type
    from the path."""
    return ObjectInfo(
        bucket=bucket,
        path=path,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=mimetypes.guess_type(path)[0] or "application/octet-stream",
        modified_at=datetime.fromtimestamp(status.st_mtime, UTC),
    )


def _records(recorded: ObjectInfo, info: ObjectInfo) -> bool:
    """Return whether a metadata row records the bytes that `info` describes."""
    return recorded.size == info.size and recorded.sha256 == info.sha256


def _select_recorded(
    connection: Connection, bucket: str, path: str
) -> ObjectInfo | None:
    row = connection.execute(_SELECT_ROW, {"bucket": bucket, "path": path}).first()
    if row is None:
        return None
    modified = row[3]
    if not isinstance(modified, datetime):
        modified = datetime.fromisoformat(str(modified))
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=UTC)
    return ObjectInfo(bucket, path, int(row[0]), row[1], row[2], modified)


def _not_found(bucket: str, path: str) -> ObjectNotFound:
    return ObjectNotFound(f"object {path!r} not found in bucket {bucket!r}")


def _delete_failure(
    bucket: str, path: str, error: SQLAlchemyError, restored: bool = True
) -> StorageFailure:
    logger.error("metadata of %s/%s not deleted: %s", bucket, path, error)
    cause = getattr(error, "orig", None) or error
    state = (
        "the object is unchanged"
        if restored
        else "its row is kept but its file could not be put back; see the server log"
    )
    return StorageFailure(
        f"could not delete the metadata of object {path!r} in bucket {bucket!r} "
        f"({type(cause).__name__}); {state}; retry, and see the server log if it "
        "fails again"
    )


def _remove_folder(folder: Path) -> bool:
    """Remove `folder` if it is empty; return whether it was removed."""
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _object_is_folder(path: str, prefix: str) -> StorageError:
    return StorageError(
        f"invalid object path {path!r}: {prefix!r} is an object, so it cannot "
        f"also be a folder; choose another path, or delete {prefix!r} first"
    )


def _folder_is_object(path: str, example: str | None) -> StorageError:
    contents = f"objects such as {example!r}" if example else "objects"
    return StorageError(
        f"invalid object path {path!r}: {path!r} is a folder that contains "
        f"{contents}, "
        f"so it cannot also be an object; choose another path, or delete the "
        f"objects under {path + '/'!r} first"
    )


def _name_too_long(path: str) -> StorageError:
    return StorageError(
        f"invalid object path {path[:40]!r}...: the filesystem rejects a name "
        "this long; use shorter segments or fewer folders"
    )


def _make_folders(root: Path, bucket: str, path: str, created: list[Path]) -> None:
    """Create the missing folders of `path`, appending each one created to
    `created` (outermost first) so a failed put can remove them."""
    segments = path.split("/")
    folder = root / bucket
    for depth in range(len(segments)):
        if depth:
            folder = folder / segments[depth - 1]
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise _object_is_folder(path, "/".join(segments[:depth])) from None
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:
                raise _name_too_long(path) from None
            raise
