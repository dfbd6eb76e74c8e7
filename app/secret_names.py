"""The rule that decides whether a name marks a secret value.

The audit log and tool errors mask arguments by this rule, sandbox output
masks the values of env vars by it, and sandbox metadata keys that match it
are rejected. See "Secret names" in docs/sandboxes.md for why it matches name
segments, with a list of ordinary words.
"""

from __future__ import annotations

import re

# Words that mark a secret anywhere in a name segment, so run-together
# names (`apikey`, `PRIVATEKEYPEM`, `GITHUBTOKENFILE`) match too.
SECRET_WORDS = (
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "authorization",
)
# Short words that mark a secret only as a whole segment (`DB_PASS`,
# `MYSQL_PWD`, `GITHUB_PAT`), since inside longer words (`compass`) they
# are ordinary.
SECRET_SEGMENTS = frozenset({"pass", "pwd", "pw", "pat"})
# Ordinary words that contain a secret word but name no secret, as whole
# segments (singular).
ORDINARY_WORDS = frozenset(
    {
        "donkey",
        "flunkey",
        "hockey",
        "hokey",
        "hotkey",
        "jockey",
        "keyboard",
        "keyed",
        "keyframe",
        "keynote",
        "keypad",
        "keystroke",
        "keyword",
        "lackey",
        "malarkey",
        "monkey",
        "pokey",
        "secretariat",
        "secretary",
        "smokey",
        "tokenization",
        "tokenize",
        "tokenized",
        "tokenizer",
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
    if segment in SECRET_SEGMENTS:
        return True
    if segment.removesuffix("s") in ORDINARY_WORDS:
        return False
    return any(word in segment for word in SECRET_WORDS)


def is_secret_name(name: str) -> bool:
    """Return whether a segment of `name` contains one of `SECRET_WORDS`
    and is not one of `ORDINARY_WORDS`, or is one of `SECRET_SEGMENTS`.

    `OPENAI_API_KEY`, `apikey`, `PRIVATEKEYPEM`, `X-Api-Key`, `authToken`,
    `db_passwords`, `DB_PASS` and `MYSQL_PWD` match. `keyboard`, `tokenizer`
    and `turkey_count` do not, because those segments are ordinary words.
    """
    return any(_is_secret_segment(segment) for segment in name_segments(name))
