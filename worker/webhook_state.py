"""What the webhook deliverer keeps in Redis: its lease, its cursor, its figures (SPEC §8).

One deliverer at a time holds the lease ``P webhook:lease`` (``SET NX PX``, renewed every
``WEBHOOK_RENEW_S``, lost ``WEBHOOK_LEASE_MS`` after the last renewal), so a worker that dies hands
delivery over within seconds. The cursor lives in the hash ``P webhook``: the last delivered stream
id and its *ordinal* (how many entries the stream had ever received up to it), moved only by
``webhook.lua`` and only for the lease's holder (the fence: a stale leader cannot move it).

Lag is counted in events: Redis 7 reports ``entries-added`` (every entry ever appended), and the
entries after the cursor are ``entries-added - ordinal``, in O(1). Older servers (the embedded 6.2)
do not, so there the entries after the cursor are counted, up to ``LAG_COUNT_CAP`` (``lag_exact``
says whether the figure is a floor).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import redis

from .events import queue_stream_info, stream_info
from .keys import WEBHOOK_LEASE_MS, Keys
from .store import Store, iso_ms

#: on servers without ``entries-added``, the lag is counted up to this many entries
LAG_COUNT_CAP = 10_000
#: a held lease is trusted for this share of its life after the call that set it (the rest is
#: margin for the clocks and the round trip: stop delivering before another may start)
LEASE_TRUST = 0.8


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _script() -> str:
    return resources.files("worker").joinpath("lua/webhook.lua").read_text(encoding="utf-8")


def stream_position(info: Any) -> tuple[str, int | None]:
    """(last id ever added, entries ever added or None) from ``XINFO STREAM``'s answer, or
    ("0-0", 0) when there is no stream yet (its answer is then an error)."""
    if isinstance(info, Exception):
        return "0-0", 0
    added = info.get("entries-added")
    last = info.get("last-generated-id")
    return (_text(last) if last else "0-0"), (int(added) if added is not None else None)


class WebhookState:
    """One worker's handle on the lease and the cursor. ``token`` names this holder."""

    def __init__(self, client: redis.Redis, keys: Keys, *, name: str | None = None,
                 lease_ms: int = WEBHOOK_LEASE_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.keys = keys
        self.lease_ms = lease_ms
        self.clock = clock
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.token = f"{self.name}:{uuid.uuid4().hex[:8]}"
        self._valid_until = 0.0
        self._script = client.register_script(_script())

    def _call(self, mode: str, *args: Any) -> int:
        return int(self._script(keys=[self.keys.webhook_lease, self.keys.webhook],
                                args=[mode, self.token, *args]))

    # -- the lease -----------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this holder may still act as the leader (by its own clock, with margin)."""
        return self.clock() < self._valid_until

    def acquire(self) -> bool:
        """Take the lease if it is free (or still ours); True when held."""
        before = self.clock()
        if self.client.set(self.keys.webhook_lease, self.token, nx=True, px=self.lease_ms):
            self._valid_until = before + self.lease_ms / 1000 * LEASE_TRUST
            return True
        return self.renew()

    def renew(self) -> bool:
        """Push the lease's expiry back; False (and no longer held) when it is not ours."""
        before = self.clock()
        if self._call("renew", self.lease_ms) == 1:
            self._valid_until = before + self.lease_ms / 1000 * LEASE_TRUST
            return True
        self._valid_until = 0.0
        return False

    def release(self) -> None:
        """Give the lease up at once (a clean stop: the next leader need not wait for it)."""
        self._valid_until = 0.0
        self._call("release")

    # -- the cursor ----------------------------------------------------------------------------

    def cursor(self) -> tuple[str, int | None] | None:
        """(last delivered stream id, its ordinal or None), or None before the first leader."""
        cursor, ordinal = self.client.hmget(self.keys.webhook, ["cursor", "ordinal"])
        if cursor is None:
            return None
        return _text(cursor), (int(ordinal) if ordinal is not None else None)

    def start(self) -> tuple[str, int | None]:
        """The cursor to deliver after: the stored one, or (for the very first leader) the
        stream's end, so a webhook set up today gets the events from now on, not the backlog."""
        found = self.cursor()
        if found is not None:
            return found
        pipe = self.client.pipeline(transaction=True)
        queue_stream_info(pipe, self.keys.events)
        info = stream_info(*pipe.execute(raise_on_error=False))
        cursor, ordinal = stream_position(info)
        self._call("init", cursor, "" if ordinal is None else ordinal, 0, 0, 0)
        return self.cursor() or (cursor, ordinal)

    def advance(self, cursor: str, ordinal: int | None, events: int, gaps: int) -> int:
        """Move the cursor after a 2xx: 1 moved, 0 the lease is not ours, -1 not ahead."""
        now_ms = int(time.time() * 1000)
        moved = self._call("advance", cursor, "" if ordinal is None else ordinal, events, gaps,
                           now_ms)
        if moved == 0:
            self._valid_until = 0.0
        return moved

    def note_failure(self, error: str) -> None:
        """Count a failed attempt and keep its reason (status and figures, not the cursor)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.keys.webhook, "failures", 1)
        pipe.hset(self.keys.webhook, mapping={"error": error[:200],
                                              "error_at": int(time.time() * 1000)})
        pipe.execute()


def lag_limits(webhook_url: str | None, events_maxlen: int) -> tuple[int, int] | None:
    """(degraded, unhealthy) webhook lags for ``health``: a tenth and half of the stream's cap
    (the alerts' thresholds at the default cap); None without a webhook."""
    if not webhook_url:
        return None
    return max(1, events_maxlen // 10), max(1, events_maxlen // 2)


def read_figures(client: redis.Redis, keys: Keys) -> dict[str, Any] | None:
    """The webhook's figures for ``stats``, ``/metrics`` and ``health``; None when no deliverer
    ever ran under this prefix (on a Redis Cluster, ``keys`` are one app's: ``store_figures``)."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.webhook)
    queue_stream_info(pipe, keys.events)
    pipe.get(keys.webhook_lease)
    raw, info, added, lease = pipe.execute(raise_on_error=False)
    info = stream_info(info, added)
    if isinstance(raw, list):  # raw from a cluster MULTI, as in as_replies
        raw = dict(zip(raw[::2], raw[1::2], strict=False))
    if isinstance(raw, Exception):
        raise raw
    if isinstance(lease, Exception):
        raise lease
    fields: Mapping[str, str] = {_text(k): _text(v) for k, v in raw.items()}
    if "cursor" not in fields:
        return None
    cursor = fields["cursor"]
    _, added = stream_position(info)
    lag, exact = _lag(client, keys, info, cursor, fields.get("ordinal"), added)

    def when(name: str) -> str | None:
        return iso_ms(int(fields[name])) if fields.get(name) else None

    return {
        "lag_events": lag,
        "lag_exact": exact,
        "cursor": cursor,
        "delivered": int(fields.get("delivered", 0)),
        "failures": int(fields.get("failures", 0)),
        "gaps": int(fields.get("gaps", 0)),
        "last_delivered_at": when("delivered_at"),
        "last_error": fields.get("error") or None,
        "last_error_at": when("error_at"),
        # the holder's name without its random part
        "leader": _text(lease).rsplit(":", 1)[0] if lease else None,
    }


def store_figures(store: Store, apps: Iterable[str] = ()) -> dict[str, Any] | None:
    """``read_figures`` for a whole store: standalone, the one cursor's; in cluster mode each
    app has its own stream, lease and cursor (in its slot), and the figures are summed, with the
    latest delivery and error, and each app's own under ``apps``."""
    if not store.cluster:
        return read_figures(store.redis, store.keys)
    per_app = {app: f for app in store.apps_of(apps)
               if (f := read_figures(store.redis, store.scope(app))) is not None}
    if not per_app:
        return None
    rows = list(per_app.values())
    latest_error = max(rows, key=lambda f: f["last_error_at"] or "")
    return {
        "lag_events": sum(f["lag_events"] for f in rows),
        "lag_exact": all(f["lag_exact"] for f in rows),
        "delivered": sum(f["delivered"] for f in rows),
        "failures": sum(f["failures"] for f in rows),
        "gaps": sum(f["gaps"] for f in rows),
        "last_delivered_at": max((f["last_delivered_at"] for f in rows
                                  if f["last_delivered_at"]), default=None),
        "last_error": latest_error["last_error"],
        "last_error_at": latest_error["last_error_at"],
        "leader": None,
        "apps": per_app,
    }


def _lag(client: redis.Redis, keys: Keys, info: Any, cursor: str, ordinal: str | None,
         added: int | None) -> tuple[int, bool]:
    if isinstance(info, Exception):  # no stream: nothing to deliver
        return 0, True
    if added is not None and ordinal is not None:
        return max(0, added - int(ordinal)), True
    after = client.xrange(keys.events, f"({cursor}", "+", count=LAG_COUNT_CAP) or []
    return len(after), len(after) < LAG_COUNT_CAP
