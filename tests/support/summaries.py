"""Helpers of the compact terminal records' tests (``worker/lua/summary.lua``): settle intents
through the store's own claim and complete, and read the families of summaries as Redis holds
them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import redis

from worker.model import Status
from worker.store import Store

#: the payload fields a compacted status no longer has
PAYLOAD_FIELDS = ("token", "account_list", "account", "account_type")

#: the outcome ``settle`` gives each item unless told otherwise
SUCCEEDED = {"state": "succeeded", "result_code": "0", "ret_code": 0, "err_msg": "NO_ERROR"}


def settle(store: Store, app: str = "default",
           outcome: Callable[[str], Mapping[str, Any]] = lambda _id: SUCCEEDED) -> list[str]:
    """Claim and complete every eligible intent of ``app`` (all ops, until none is left), each
    with ``outcome(id)``; the batch ids, in order."""
    batches = []
    while True:
        claims = [store.claim(app, op) for op in (1, 2, 3, 4, 5)]
        done = [c for c in claims if c.kind == "batch"]
        if not done:
            return batches
        for claim in done:
            assert claim.batch_id is not None
            store.complete(claim.batch_id, [{"id": i.id, **outcome(i.id)} for i in claim.items],
                           calls=1, items_sent=len(claim.items))
            batches.append(claim.batch_id)


def families(client: redis.Redis, store: Store, app: str = "default") -> dict[str, dict[str, int]]:
    """The meta hash ``P cm``: family start -> {"m": buckets, "n": summaries, "x": expiry}."""
    out: dict[str, dict[str, int]] = {}
    meta: Any = client.hgetall(store.scope(app).summary_meta)
    for raw_field, value in meta.items():
        name = raw_field.decode()
        start, _, suffix = name.partition(":")
        out.setdefault(start, {})[suffix or "m"] = int(value)
    return out


def buckets(client: redis.Redis, store: Store, app: str = "default") -> list[str]:
    """The bucket keys of every family (``P c:<start>:<k>``; not the overflow hashes)."""
    pattern = store.scope(app).prefix + "c:*"
    return sorted(k.decode() for k in client.scan_iter(match=pattern, count=1000)
                  if not k.endswith(b":o"))


def overflows(client: redis.Redis, store: Store, app: str = "default") -> list[str]:
    """The overflow hash of every family that has one (``P c:<start>:o``)."""
    pattern = store.scope(app).prefix + "c:*:o"
    return sorted(k.decode() for k in client.scan_iter(match=pattern, count=1000))


def without_payload(full: Status) -> dict[str, Any]:
    """What the compacted status of ``full`` (a whole record's) must read: every field but the
    payload's, and ``detail``."""
    out = {k: v for k, v in full.to_dict().items() if k not in PAYLOAD_FIELDS}
    return out | {"detail": "compacted"}
