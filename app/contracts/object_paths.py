"""The rules for object paths, without the storage's heavy imports, so that
workflow definitions can check a storage step's path when they are stored."""

from __future__ import annotations

import re

# C0 controls and DEL. A signed URL's route does not match a newline, and
# these characters garble shells and logs.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

# The width of the storage_objects column that records the path.
MAX_PATH_LENGTH = 1024
# NAME_MAX of the common Linux filesystems, in bytes of the encoded name.
MAX_SEGMENT_BYTES = 255


def shown(value: str, limit: int = 100) -> str:
    """Return `value` quoted for a message, cut after `limit` characters, so
    that a long invalid name is not repeated whole."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def path_problem(path: str) -> str | None:
    """Say why `path` does not name exactly one object inside a bucket, or
    return None when it does: it could leave the bucket, has `.`, `..` or
    empty segments (which would give one object several names), contains a
    control character, or is longer than the metadata column or the
    filesystem allow."""
    control = _CONTROL_CHARACTER.search(path)
    if control is not None:
        return (
            f"invalid object path {shown(path)}: it contains the control character "
            f"U+{ord(control.group()):04X} at position {control.start()}; control "
            "characters (U+0000 to U+001F and U+007F) break URLs, shells and logs, "
            "so remove it"
        )
    if not path or path.startswith("/") or "\\" in path:
        return (
            f"invalid object path {shown(path)}: use a relative path such as "
            "'reports/run-1.md', without a leading slash or backslashes"
        )
    segments = path.split("/")
    if ".." in segments:
        return (
            f"invalid object path {shown(path)}: '..' segments are not allowed, "
            "because they could reach outside the bucket"
        )
    if any(segment in ("", ".") for segment in segments):
        cleaned = "/".join(s for s in segments if s not in ("", "."))
        fix = (
            f"write it as {cleaned!r}"
            if cleaned
            else "name the object, for example 'notes.txt'"
        )
        return (
            f"invalid object path {shown(path)}: empty and '.' segments (such as '//', "
            f"'/./' or a trailing '/') are not allowed, because they would give "
            f"one object several names; {fix}"
        )
    if len(path) > MAX_PATH_LENGTH:
        return (
            f"invalid object path {path[:40]!r}... ({len(path)} characters): "
            f"an object path is at most {MAX_PATH_LENGTH} characters"
        )
    for segment in segments:
        try:
            size = len(segment.encode("utf-8"))
        except UnicodeEncodeError:
            return (
                f"invalid object path {shown(path)}: it is not valid Unicode text "
                "(it holds a lone surrogate); send the path as UTF-8"
            )
        if size > MAX_SEGMENT_BYTES:
            return (
                f"invalid object path: segment {segment[:40]!r}... is {size} bytes "
                f"in UTF-8; each '/'-separated segment is at most "
                f"{MAX_SEGMENT_BYTES} bytes, as the filesystem allows"
            )
    return None


def prefix_problem(prefix: str) -> str | None:
    """Say why no valid object path can start with `prefix`, in the words of
    `path_problem`, or return None when one can. The empty prefix matches
    every path.

    The last segment of a prefix may be cut short, so `reports/`, `.` and
    `..` are valid prefixes (of `reports/a.md`, `.env` and `..data`), where
    `/`, `../` and `a//` are not.
    """
    if not prefix:
        return None
    # A valid path that is the prefix itself, or the prefix with one more
    # character, shows that some valid path starts with it.
    if path_problem(prefix + "x") is None:
        return None
    return path_problem(prefix)
