"""The store's side of verification (SPEC §6.1): claim the verifying items that are due, record
what their check found. Two Lua scripts (``verify_claim.lua``, ``verify_done.lua``), each one
atomic step, on the ``Store``'s connection; kept apart from ``store.py`` for its size.

A verifying item (record state ``v``) holds its keys. It sits in ``P v:{app}`` scored by the time
of its next check; a claim moves it under a lease (``P leases``, like a batch), and the reaper puts
it back, due at once, if the lease runs out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .model import Account
from .store import Completion, Store
from .store_calls import as_text, wakes_of

#: a check's outcome -> its code in verify_done.lua
_OUTCOME = {"verified": "ok", "check": "v", "keep": "k", "retry": "r", "failed": "f"}


@dataclass(frozen=True)
class VerifyItem:
    """One verifying item as a check needs it."""

    id: str
    operator_type: int
    token: str | None
    accounts: tuple[Account, ...]
    #: calls this intent has been in
    attempts: int
    created_at_ms: int
    #: epoch ms after which an item not seen applied is sent again
    deadline_ms: int
    #: checks made since its call was accepted
    checks: int


@dataclass(frozen=True)
class VerifyClaim:
    """What a check's claim found: a ``batch`` of items, or why not (``empty``, ``paused``)."""

    kind: Literal["batch", "empty", "paused"]
    batch_id: str = ""
    items: tuple[VerifyItem, ...] = ()
    #: batch: items still due after this claim; empty: ms until the next check (-1 none);
    #: paused: ms left
    left: int = 0
    reason: str = ""
    #: batch: ms until the next check not due yet (-1 none)
    next_ms: int = -1


def claim_verify(store: Store, app: str, limit: int) -> VerifyClaim:
    """Take up to ``limit`` of ``app``'s verifying items whose check is due, under a lease."""
    keys = store.scope(app)
    raw = store._scripts["verify_claim"](
        keys=[keys.counters, keys.verifying(app), keys.pause(app), keys.seq, keys.batches,
              keys.leases],
        args=[keys.prefix, app, limit, store.lease_ms, store.nonce(app)])
    kind = as_text(raw[0])
    if kind == "paused":
        return VerifyClaim("paused", left=int(raw[1]), reason=as_text(raw[2]))
    if kind == "empty":
        return VerifyClaim("empty", left=int(raw[1]))
    items = tuple(
        VerifyItem(id=i, operator_type=int(op), token=t or None,
                   accounts=tuple(Account(a, int(k)) for a, k in (accs or [])),
                   attempts=int(n), created_at_ms=int(c), deadline_ms=int(dl), checks=int(vk))
        for i, op, t, accs, n, c, dl, vk in json.loads(raw[2]))
    return VerifyClaim("batch", batch_id=as_text(raw[1]), items=items, left=int(raw[3]),
                       next_ms=int(raw[4]))


def verify_done(store: Store, batch_id: str, outcomes: Sequence[Mapping[str, Any]], *,
                query_calls: int) -> Completion:
    """Record each checked item's outcome: ``{"id", "state": verified | check | keep | retry |
    failed, "delay_ms"?, "error"?}`` (see ``verify_done.lua``)."""
    packed = []
    for out in outcomes:
        entry: dict[str, Any] = {"i": out["id"], "s": _OUTCOME[out["state"]]}
        if out.get("delay_ms") is not None:
            entry["dl"] = int(out["delay_ms"])
        if out.get("error") is not None:
            entry["er"] = out["error"]
        packed.append(entry)
    keys = store.of_batch(batch_id)
    raw = store._scripts["verify_done"](
        keys=[keys.counters, keys.metrics, keys.batches, keys.leases, keys.failed, keys.events,
              *keys.timeline],
        args=[keys.prefix, batch_id, store.status_ttl_s, store.max_items, store.linger_ms,
              json.dumps(packed, separators=(",", ":"), ensure_ascii=False), query_calls,
              store.events_maxlen, store.status_detail_s])
    return Completion(int(raw[0]), int(raw[1]), wakes_of(raw[2]))


def due_apps(store: Store, apps: Sequence[str]) -> list[str]:
    """The apps with a verifying item whose check is due now (for the sweep)."""
    if not apps:
        return []
    pipe = store.redis.pipeline(transaction=False)
    # as a plain command: a cluster pipeline blocks .time() (it goes to one node)
    pipe.execute_command("TIME")  # type: ignore[no-untyped-call]
    for app in apps:
        pipe.zrange(store.scope(app).verifying(app), 0, 0, withscores=True)
    res = pipe.execute()
    now_ms = res[0][0] * 1000 + res[0][1] // 1000
    return [app for app, head in zip(apps, res[1:], strict=True)
            if head and head[0][1] <= now_ms]
