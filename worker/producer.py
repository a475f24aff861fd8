"""The producer API: ``from worker import Producer`` (SPEC §8).

A producer validates each intent, writes it to Redis in one atomic step per chunk, and only *signals*
that flushing is due: at most one immediate wake per full batch and one delayed wake per linger
window, however many intents it enqueues. It needs no TPNS secrets.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from .connections import redis_client
from .embedded import resolve_redis_url
from .errors import IdConflictError, IntentError
from .intents import validate
from .model import Intent, Status
from .settings import Settings
from .store import Store, Wake

WakeHook = Callable[[Sequence[Wake]], None]


def new_id() -> str:
    """A fresh intent id: 20 lowercase hex digits (80 random bits); URL-safe, and never starting
    with ``-``, so that a shell or a CLI never reads it as an option."""
    return secrets.token_hex(10)


@dataclass
class BulkResult:
    """What a bulk enqueue did: ids in input order (None where refused) and the refusals."""

    ids: list[str | None] = field(default_factory=list)
    #: input index -> why it was refused
    errors: dict[int, IntentError] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        return [i for i in self.ids if i is not None]


class Producer:
    """Enqueue intents and read their statuses."""

    def __init__(self, redis_url: str | None = None, prefix: str | None = None, *,
                 settings: Settings | None = None, client: redis.Redis | None = None,
                 wake: WakeHook | None = None) -> None:
        self.settings = settings or Settings.from_env()
        url = redis_url or resolve_redis_url(self.settings.redis_url, self.settings.data_dir)
        self.redis_url = url
        self.redis = client or redis_client(url)
        s = self.settings
        self.store = Store(self.redis, prefix or s.prefix,
                           max_items=s.max_items_per_call, linger_ms=s.linger_ms,
                           lease_s=s.lease_s, status_ttl_s=s.status_ttl_s)
        self._wake = wake
        self._apps: frozenset[str] | None = None
        self._apps_read = 0.0

    @classmethod
    def from_env(cls, **kw: Any) -> Producer:
        """A producer configured like every command: environment, then ``config/``, then defaults."""
        return cls(settings=Settings.from_env(), **kw)

    # -- apps and wakes ----------------------------------------------------------------------

    def apps(self) -> frozenset[str]:
        """Known app names: configured here, or registered in Redis by running workers."""
        if self._apps is None or time.monotonic() - self._apps_read > 10:
            self._apps = frozenset(self.settings.apps) | frozenset(self.store.known_apps())
            self._apps_read = time.monotonic()
        return self._apps

    def _send_wakes(self, wakes: Sequence[Wake]) -> None:
        if not wakes:
            return
        if self._wake is None:
            from .wakeup import CeleryWaker

            self._wake = CeleryWaker(self.settings, self.redis_url, self.store.prefix)
        self._wake(wakes)

    # -- enqueue -----------------------------------------------------------------------------

    def validate(self, obj: Any) -> Intent:
        """Check one intent (SPEC §4) without storing it."""
        return validate(obj, self.apps(), self.settings.default_app)

    def submit(self, intent: Any) -> str:
        """Enqueue one intent; returns its id. Raises ``IntentError`` and stores nothing if invalid."""
        result = self.enqueue([intent])
        if result.errors:
            raise result.errors[0]
        return result.ids[0]  # type: ignore[return-value]

    def submit_many(self, intents: Iterable[Any], *, strict: bool = False) -> list[str | None]:
        """Enqueue many intents, pipelined. Returns ids in input order, None for refused ones.

        With ``strict=True`` the first invalid intent raises ``IntentError`` and nothing is stored.
        """
        items = list(intents)
        if strict:
            for obj in items:
                self.validate(obj)
        return self.enqueue(items).ids

    def enqueue(self, intents: Iterable[Any], *, first_line: int | None = None,
                line_numbers: Sequence[int] | None = None) -> BulkResult:
        """Validate and store each intent on its own; refused ones are reported, not stored."""
        result = BulkResult()
        valid: list[tuple[str, Intent]] = []
        positions: list[int] = []
        apps = self.apps()
        for k, obj in enumerate(intents):
            line = line_numbers[k] if line_numbers is not None else None
            try:
                intent = validate(obj, apps, self.settings.default_app)
            except IntentError as exc:
                result.errors[k] = IntentError(exc.field, exc.rule, line)
                result.ids.append(None)
                continue
            intent_id = intent.id or new_id()
            valid.append((intent_id, intent))
            positions.append(k)
            result.ids.append(intent_id)
        if valid:
            codes, wakes = self.store.enqueue(valid)
            for (intent_id, _), k, code in zip(valid, positions, codes, strict=True):
                if code < 0:
                    line = line_numbers[k] if line_numbers is not None else None
                    result.errors[k] = IdConflictError(intent_id, line)
                    result.ids[k] = None
            self._send_wakes(wakes)
        return result

    def requeue_failed(self, error: str | None = None) -> list[str]:
        """Put failed intents (optionally only those that failed with ``error``) back into the
        queue with a fresh retry budget; returns their ids."""
        ids, wakes = self.store.requeue_failed(error)
        self._send_wakes(wakes)
        return ids

    # -- status ------------------------------------------------------------------------------

    def status(self, intent_id: str) -> Status | None:
        """The status of one intent, or None when the id is unknown."""
        return self.store.status(intent_id)

    def statuses(self, ids: Sequence[str]) -> list[Status | None]:
        return self.store.statuses(ids)

    def wait(self, ids: Sequence[str], timeout_s: float = 30.0,
             poll_s: float = 0.05) -> list[Status | None]:
        """Poll until every known id is terminal; raises ``TimeoutError`` past ``timeout_s``.

        Unknown ids come back as None at once (they will never become terminal).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.store.statuses(ids)
            if all(s is None or s.terminal for s in statuses):
                return statuses
            if time.monotonic() >= deadline:
                pending = sum(1 for s in statuses if s is not None and not s.terminal)
                raise TimeoutError(f"{pending} of {len(ids)} intents not terminal after "
                                   f"{timeout_s:g} s")
            time.sleep(poll_s)

    def stats(self) -> dict[str, Any]:
        return self.store.stats(self.apps())

    def close(self) -> None:
        """Close the Redis connections (and the broker's, if wakes were sent)."""
        closer = getattr(self._wake, "close", None)
        if callable(closer):
            closer()
        self.redis.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
