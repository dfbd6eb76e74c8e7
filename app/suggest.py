"""Suggestions of a known name for a mistyped one."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Minimum difflib similarity for a known name to be suggested: it matched
# NEXUS_API_PORT to NEXUS_HTTP_PORT (0.83), NEXUS_DB_URL to NEXUS_DATABASE_URL
# (0.8) and swarm_lst to swarm_list (0.95), and suggested nothing for NEXUS_FOO.
SUGGESTION_CUTOFF = 0.75


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """Return the known name closest to `name`, or None when none is close.

    Names are compared ignoring case, so `maxagents` finds `maxAgents`.
    """
    by_folded = {candidate.casefold(): candidate for candidate in sorted(known)}
    close = difflib.get_close_matches(
        name.casefold(), list(by_folded), n=1, cutoff=SUGGESTION_CUTOFF
    )
    return by_folded[close[0]] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """Return "; did you mean NAME?" for the closest known name, else ""."""
    close = closest_name(name, known)
    return f"; did you mean {close}?" if close else ""
