from pathlib import Path

import pytest

from app.storage import LocalStorage, StorageError


def test_round_trip_is_byte_exact(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    text = "héllo\r\nwörld\n".encode()
    binary = bytes(range(256))
    info = storage.put("models", "a/b.txt", text)
    storage.put("models", "c.bin", binary)
    assert storage.get("models", "a/b.txt") == text
    assert storage.get("models", "c.bin") == binary
    assert info.size == len(text)
    assert info.content_type == "text/plain"
    assert storage.list("models") == ["a/b.txt", "c.bin"]
    assert storage.list("models", prefix="a/") == ["a/b.txt"]
    assert storage.delete("models", "c.bin")
    assert not storage.delete("models", "c.bin")


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a\\b", ""])
def test_traversal_rejected(tmp_path: Path, path: str) -> None:
    with pytest.raises(StorageError, match="invalid object path"):
        LocalStorage(tmp_path).put("models", path, b"x")


@pytest.mark.parametrize("bucket", ["UP", "a", "has.dot", "-lead", "../x"])
def test_bucket_name_rejected(tmp_path: Path, bucket: str) -> None:
    with pytest.raises(StorageError, match="invalid bucket name"):
        LocalStorage(tmp_path).put(bucket, "x", b"x")


def test_missing_object(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not found"):
        LocalStorage(tmp_path).get("models", "nope")
