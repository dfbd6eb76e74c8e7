"""The rule that decides whether a name marks a secret value.

The audit log and tool errors mask arguments by this rule, sandbox output
masks the values of env vars by it, and sandbox metadata keys that match it
are rejected. See "Secret names" in docs/sandboxes.md for why it matches name
segments rather than substrings.
"""

from __future__ import annotations

import re

# Words whose name segment marks a secret, also at the end of a segment
# written without separators (`apikey`, `dbpassword`, `authtoken`).
SECRET_WORDS = (
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "authorization",
)
# Ordinary words that end in "key" but name no secret.
_ORDINARY_KEY_WORDS = frozenset(
    {
        "donkey",
        "flunkey",
        "hockey",
        "hokey",
        "hotkey",
        "jockey",
        "lackey",
        "malarkey",
        "monkey",
        "pokey",
        "smokey",
        "turkey",
        "turnkey",
        "whiskey",
    }
)
# One segment of a name: an upper-case run that is not followed by lower
# case (`API` of `APIKey`), a word with an optional capital, or a number.
# Every other character separates segments.
_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def name_segments(name: str) -> list[str]:
    """Split `name` into lower-case segments at separators, case changes and
    digits: `X-Api-Key` and `xApiKey` both give `["x", "api", "key"]`."""
    return [segment.lower() for segment in _SEGMENT.findall(name)]


def _is_secret_segment(segment: str) -> bool:
    singular = segment.removesuffix("s")
    if singular in _ORDINARY_KEY_WORDS:
        return False
    return any(singular.endswith(word) for word in SECRET_WORDS)


def is_secret_name(name: str) -> bool:
    """Return whether a segment of `name` is, or ends with, one of
    `SECRET_WORDS`, optionally plural.

    `OPENAI_API_KEY`, `apikey`, `X-Api-Key`, `authToken` and `db_passwords`
    match. `keyboard`, `tokenizer` and `turkey_count` do not, because their
    segments only start with such a word or are an ordinary word ending in
    "key".
    """
    return any(_is_secret_segment(segment) for segment in name_segments(name))
