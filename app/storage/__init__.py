"""Object storage: buckets of byte-exact objects on the local filesystem."""

from app.storage.local import (
    LocalStorage,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    storage_for,
)

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "StorageError",
    "storage_for",
]
