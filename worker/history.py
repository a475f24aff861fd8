"""History by key (SPEC §8): the latest intents that named a token, or an (account, account_type),
per app, newest first, for as long as their records live.

The index costs a few bytes per intent and expires with the records (``lib.lua``'s ``remember``):
``P h:<shard>`` maps a short digest of each key to the latest intent that named it, and each
record links to the intent before it for each of its keys. ``history.lua`` walks that chain; a
head whose record has expired is dropped when read, and the sweep drops the others
(``prune_history``), so the heads are bounded by the keys of live records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import IntentError
from .keys import Keys

#: intents a history lookup returns unless asked for fewer or more, and at most
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: account types are small non-negative numbers (SPEC §4); the bound keeps a lookup key short
MAX_ACCOUNT_TYPE = 2**31 - 1
_MAX_KEY_LEN = 256
#: history heads, and shards, the sweep looks at per beat (whole shards, so a few more heads):
#: a pass over the 4096 shards takes at least 64 beats (an idle index costs 64 empty lookups a
#: second), and one call checks about a thousand records at most, a millisecond or two of Redis
PRUNE_BUDGET = 1000
PRUNE_SHARDS = 64
#: the index's shards (``lib.lua`` files a digest under its first 3 hex digits)
SHARDS = 4096


@dataclass(frozen=True)
class HistoryQuery:
    """One lookup: a token, or an account with its type, in an app."""

    app: str
    token: str | None = None
    account: str | None = None
    account_type: int = 0
    limit: int = DEFAULT_LIMIT

    @property
    def material(self) -> str:
        """What ``lib.lua``'s ``digests`` hashes for this key (after the app)."""
        if self.token is not None:
            return f"t\0{self.token}"
        return f"a\0{self.account_type}\0{self.account}"

    def digest(self) -> str:
        """The 10 hex digits the index files this key under (as ``lib.lua`` computes them)."""
        raw = f"{self.app}\0{self.material}".encode()
        return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:10]


def _int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise IntentError(name, f"must be a whole number, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise IntentError(name, f"must be a whole number, got {str(value)[:40]!r}") from None
    if not isinstance(value, int):
        raise IntentError(name, f"must be a whole number, got {type(value).__name__}")
    if not low <= value <= high:
        raise IntentError(name, f"must be from {low} to {high}, got {value}")
    return value


def _key(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise IntentError(name, "must be a non-empty string")
    if len(value) > _MAX_KEY_LEN:
        raise IntentError(name, f"must be at most {_MAX_KEY_LEN} characters")
    return value


def history_query(*, token: object = None, account: object = None, account_type: object = None,
                  app: object = None, limit: object = None, default_app: str = "default") -> HistoryQuery:
    """Check a lookup's parameters (from Python, the CLI or a query string); raises
    ``IntentError`` naming the parameter and the rule."""
    if (token is None) == (account is None):
        raise IntentError("token", "give either a token or an account (with its account_type), "
                                   "not both and not neither")
    if token is not None and account_type is not None:
        raise IntentError("account_type", "goes with an account, not with a token")
    if app is not None and (not isinstance(app, str) or not app.strip()):
        raise IntentError("app", "must be a non-empty string")
    return HistoryQuery(
        app=app if isinstance(app, str) else default_app,
        token=None if token is None else _key("token", token),
        account=None if account is None else _key("account", account),
        account_type=0 if account_type is None else _int("account_type", account_type, 0,
                                                           MAX_ACCOUNT_TYPE),
        limit=DEFAULT_LIMIT if limit is None else _int("limit", limit, 1, MAX_LIMIT))


def history_call(keys: Keys, query: HistoryQuery) -> tuple[list[str], list[str | int]]:
    """The KEYS and ARGV of the ``history.lua`` call for ``query`` (the sync and asyncio stores);
    the script packs the field from the digest itself."""
    d = query.digest()
    value = query.token if query.token is not None else query.account or ""
    return [keys.history(d)], [keys.prefix, "", d, query.app,
                               "t" if query.token is not None else "a", value,
                               str(query.account_type), query.limit]


def history_reply(raw: Sequence[Any], limit: int) -> list[tuple[str, dict[str, Any]]]:
    """(id, record) pairs from ``history.lua``'s flat answer, newest first."""
    out = []
    for k in range(0, len(raw), 2):
        intent_id = raw[k].decode() if isinstance(raw[k], bytes) else str(raw[k])
        out.append((intent_id, json.loads(raw[k + 1])))
    return out[:limit]
