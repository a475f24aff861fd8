"""The store's script calls: their arguments and KEYS, their replies, what an outage is.

Written once for the sync ``worker.store.Store`` and the asyncio ``worker.astore.AsyncStore``,
which send the same calls (``Layout``); nothing here talks to Redis. Cut from store.py because
this is the protocol between Python and the Lua scripts, which changes with the scripts, while
``Store`` is the round trips.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import redis

from .keys import DEFAULT_PREFIX, Keys, app_of_batch, app_of_id, batch_nonce, lua_prelude
from .model import BatchItem, Intent

#: an outcome's state as complete.lua takes it
OUTCOME_CODES = {"succeeded": "ok", "failed": "f", "retry": "r", "requeue": "q"}


#: intents per script call when enqueueing; a few hundred keeps Redis responsive between calls
ENQUEUE_CHUNK = 500


#: enqueue codes beyond the script's own (1, 0, -1, -2): Redis refused the script call before it
#: wrote anything (the intent is not stored), or failed it in a way that leaves that unknown
NOT_WRITTEN = -3


UNKNOWN = -4


#: errors Redis answers to a script's first write (so nothing was written): out of memory, a
#: replica's read-only mode (after a failover), writes stopped by a disk error
_REFUSALS = ("OOM ", "READONLY ", "MISCONF ")


class AppMovingError(redis.ConnectionError):
    """An app's slot is moving to another master (``worker.clustermove``): its enqueues write
    nothing meanwhile. An outage for that app (a ``ConnectionError``): not stored, retry later."""


def refused_before_writing(exc: BaseException) -> bool:
    """Whether Redis refused a script call at its first write (Redis 7 keeps the error's code;
    6.2 wraps it in the script's ``ERR Error running script``)."""
    if isinstance(exc, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and any(
        text.startswith(code.strip()) or f"-{code}" in text or f": {code}" in text
        for code in _REFUSALS)


#: what an unreachable Redis raises through redis-py: a refused, reset or timed-out connection,
#: a server still loading its AOF (BusyLoadingError), Sentinel finding no master
#: (MasterNotFoundError), an old master turned replica after a failover (ReadOnlyError)
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError, OSError)


#: error replies of a Redis that answers but cannot serve writes for now: a failed AOF write or
#: snapshot (a full disk), a replica cut from its master, a server still loading
_UNAVAILABLE_REPLIES = ("MISCONF", "MASTERDOWN", "LOADING", "READONLY")


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis is out of service for now (an outage), not a bug or bad data."""
    if isinstance(exc, UNREACHABLE) or refused_before_writing(exc):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


@dataclass(frozen=True)
class Wake:
    """A flush should be woken for ``(app, operator_type)``: at once, or after the linger."""

    app: str
    operator_type: int
    #: ``verify``: check the app's due verifying items (operator_type 0, SPEC §6.1)
    kind: Literal["now", "linger", "verify"]
    #: for a linger wake: how long to wait, when known better than the whole linger
    delay_s: float | None = None


@dataclass(frozen=True)
class Round:
    """One round trip of an enqueue: intents ``start`` to ``start + size`` of the input."""

    start: int
    size: int
    #: one code per intent (see ``Store.enqueue``, plus ``NOT_WRITTEN`` and ``UNKNOWN`` for the
    #: calls Redis failed); empty when no reply was read
    codes: list[int] = field(default_factory=list)
    wakes: tuple[Wake, ...] = ()
    #: replicas that acknowledged the round (``WAIT``), None when not asked
    replicas: int | None = None
    #: why the round failed (the first error); nothing after a failed round was sent
    error: Exception | None = None
    #: whether the round may have reached Redis (False: its connection could not be made)
    sent: bool = False


def merge_wakes(wakes: Iterable[Wake]) -> tuple[Wake, ...]:
    """One wake per (app, operator_type), ``now`` winning over ``linger``."""
    merged: dict[tuple[str, int], Wake] = {}
    for wake in wakes:
        key = (wake.app, wake.operator_type)
        if key not in merged or wake.kind == "now":
            merged[key] = wake
    return tuple(merged.values())


@dataclass(frozen=True)
class Claim:
    """What a claim found: a ``batch`` to send, or why not (``wait``, ``empty``, ``paused``)."""

    kind: Literal["batch", "wait", "empty", "paused"]
    batch_id: str | None = None
    items: tuple[BatchItem, ...] = ()
    #: eligible items left in the queue after this claim
    eligible_left: int = 0
    #: wait: ms until the partial batch may go; empty: ms until a retry is due (-1 none);
    #: paused: ms left; batch: ms until what is left may go
    wait_ms: int = 0
    #: paused: why; batch: ``full`` (``max_items`` were eligible) or ``linger`` (fewer were,
    #: and the oldest of them had been eligible for the linger)
    reason: str = ""
    #: ms until the app's shared backoff ends (read with the claim when asked to, else 0)
    backoff_ms: int = 0
    #: batch: items eligible for (app, op) at the claim, before it took any (SPEC §3.2)
    eligible: int = 0
    #: batch: how long the oldest item taken had been eligible, in ms (for a partial batch,
    #: which takes every eligible item, the oldest eligible one)
    oldest_eligible_ms: int = 0


@dataclass(frozen=True)
class Completion:
    """How many outcomes were applied, how many were stale (lease lost), and wakes to send."""

    applied: int
    stale: int
    wakes: tuple[Wake, ...]


def load_script(name: str) -> str:
    """The prelude of names and constants from ``worker.keys``, ``lib.lua``, ``summary.lua``,
    then the script."""
    files = resources.files("worker")
    lib, summary, body = (files.joinpath(f"lua/{part}.lua").read_text(encoding="utf-8")
                          for part in ("lib", "summary", name))
    return lua_prelude() + lib + "\n" + summary + "\n" + body


def evalsha(pipe: Any, sha: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue ``EVALSHA`` on a pipeline: as a plain command, which a cluster pipeline routes by
    the first key (redis-py blocks its ``evalsha`` method there)."""
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)


def wakes_of(raw: Iterable[Any]) -> tuple[Wake, ...]:
    """The wakes a script answered (``app:op:now|linger``)."""
    out = []
    for item in raw:
        app, op, kind = as_text(item).rsplit(":", 2)
        out.append(Wake(app, int(op), kind))  # type: ignore[arg-type]
    return tuple(out)


def completion_of(raw: Any) -> Completion:
    """A ``complete.lua`` reply."""
    return Completion(int(raw[0]), int(raw[1]), wakes_of(raw[2]))


def as_text(value: Any) -> str:
    """A Redis reply as text (clients may or may not decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def intent_arg(intent_id: str, intent: Intent, resent: bool = False) -> str:
    """The compact JSON one intent is passed to ``enqueue.lua`` as; ``resent``: in a call sent
    again after its connection dropped (``x``, below)."""
    payload: dict[str, Any] = {"i": intent_id, "a": intent.app, "o": intent.operator_type}
    if intent.token is not None:
        payload["t"] = intent.token
    if intent.accounts:
        payload["l"] = [[a.account, a.account_type] for a in intent.accounts]
    if intent.id is not None or resent:
        # checked against the summaries too: an id given by the caller, or any id of a call
        # sent again (the first send may have stored it, and it may have succeeded and been
        # compacted since; a generated id is otherwise new by construction)
        payload["x"] = 1
    return _compact_json(payload)


#: compact JSON (one encoder for every call: ``json.dumps`` with options builds one per call)
_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: the Lua scripts, each ``lua/lib.lua`` + ``lua/<name>.lua``
SCRIPTS = ("enqueue", "claim", "complete", "reap", "requeue_failed", "throttle", "verify_claim",
           "verify_done", "history", "prune_history", "lookup")


class Layout:
    """The store's prefix and limits, and the arguments its script calls take: written once for
    the sync ``Store`` and the asyncio ``worker.astore.AsyncStore``, which send the same calls."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, max_items: int = 20, linger_ms: int = 250,
                 lease_s: float = 60.0, status_ttl_s: int = 604800,
                 events_maxlen: int = 1_000_000, cluster: bool = False,
                 status_detail_s: int = 3600) -> None:
        self.prefix = prefix
        self.keys = Keys(prefix)
        #: Redis Cluster: each app's keys under ``P{app}:`` (one slot), see ``worker.keys``
        self.cluster = cluster
        self.events_maxlen = events_maxlen
        self.max_items = max_items
        self.linger_ms = linger_ms
        self.lease_ms = int(lease_s * 1000)
        self.status_ttl_s = status_ttl_s
        #: how long a succeeded intent keeps its whole record before only its summary is left
        self.status_detail_s = status_detail_s
        #: (first check delay ms, timeout ms) with TPNS_VERIFY=on (``Store`` sets it)
        self.verify: tuple[int, int] | None = None

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def scope(self, app: str) -> Keys:
        """The keys of ``app``'s intents, queues and counters: its own slot's in cluster mode."""
        return self.keys.tagged(app) if self.cluster else self.keys

    def of_id(self, intent_id: str) -> Keys:
        """The keys of the app an intent id belongs to (all the same keys when standalone)."""
        return self.keys.tagged(app_of_id(intent_id)) if self.cluster else self.keys

    def of_batch(self, batch_id: str) -> Keys:
        """The keys of the app a batch id belongs to (all the same keys when standalone)."""
        return self.keys.tagged(app_of_batch(batch_id)) if self.cluster else self.keys

    def events_key(self, app: str | None) -> str | None:
        """The one events stream to read: standalone the store's, in cluster mode ``app``'s;
        None in cluster mode without ``app`` (each app has its own stream: a reader merges them,
        ``worker.events_merged``)."""
        if not self.cluster:
            return self.keys.events
        return self.scope(app).events if app is not None else None

    def app_events_key(self, app: str) -> str:
        """``app``'s events stream (in cluster mode its own, else the one stream)."""
        return self.scope(app).events

    def nonce(self, app: str) -> str:
        """The random end of a claim's batch id (in cluster mode followed by the app)."""
        raw = secrets.token_hex(4)
        return batch_nonce(raw, app) if self.cluster else raw

    def enqueue_groups(self, block: Sequence[tuple[str, Intent]], max_pending: int
                       ) -> tuple[list[tuple[list[str], list[str | int]]], list[int]]:
        """The ``(KEYS, ARGV)`` of the ``enqueue.lua`` calls storing ``block``, and the order of
        ``block`` they store it in (the codes come back in that order).

        Standalone: ``enqueue_calls`` in input order. Cluster: one call per app (per
        ``ENQUEUE_CHUNK`` of it), each run with its app's prefix, so it touches one slot; the
        order between apps is free (no key is shared by two apps), within an app it is kept.
        """
        if not self.cluster:
            return ([(self.enqueue_keys, args) for args in self.enqueue_calls(block, max_pending)],
                    list(range(len(block))))
        by_app: dict[str, list[int]] = {}
        for j, (_, intent) in enumerate(block):
            by_app.setdefault(intent.app, []).append(j)
        calls: list[tuple[list[str], list[str | int]]] = []
        order: list[int] = []
        for app, positions in by_app.items():
            keys = self.scope(app)
            head: list[str | int] = [keys.prefix, self.max_items, self.linger_ms, max_pending]
            for k in range(0, len(positions), ENQUEUE_CHUNK):
                part = positions[k:k + ENQUEUE_CHUNK]
                calls.append(([keys.counters, *keys.timeline, keys.move(app)],
                              head + [intent_arg(*block[j]) for j in part]))
                order.extend(part)
        return calls, order

    def enqueue_calls(self, block: Sequence[tuple[str, Intent]], max_pending: int,
                      resent: bool = False) -> list[list[str | int]]:
        """The arguments of the ``enqueue.lua`` calls storing ``block``, ``ENQUEUE_CHUNK`` a call
        (``resent``: sent again after the connection of the first send dropped)."""
        head: list[str | int] = [self.prefix, self.max_items, self.linger_ms, max_pending]
        return [head + [intent_arg(i, it, resent) for i, it in block[k:k + ENQUEUE_CHUNK]]
                for k in range(0, len(block), ENQUEUE_CHUNK)]

    @property
    def enqueue_keys(self) -> list[str]:
        """The ``KEYS`` of every ``enqueue.lua`` call."""
        return [self.keys.counters, *self.keys.timeline]

    def requeue_failed_args(self, error: str | None, limit: int,
                            keys: Keys | None = None) -> list[Any]:
        return [(keys or self.keys).prefix, error or "", limit, self.max_items, self.linger_ms]

    def complete_call(self, batch_id: str, outcomes: Sequence[Mapping[str, Any]], *,
                      calls: int, items_sent: int, operator_type: int = 0,
                      call_metrics: Sequence[tuple[str, float]] = ()
                      ) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of the ``complete`` call that ``complete`` makes (for
        ``complete_many``)."""
        packed = []
        for out in outcomes:
            entry: dict[str, Any] = {"i": out["id"], "s": OUTCOME_CODES[out["state"]]}
            for name, short in (("result_code", "rc"), ("ret_code", "ret"), ("err_msg", "m"),
                                ("error", "er")):
                if out.get(name) is not None:
                    entry[short] = out[name]
            if out["state"] == "retry":
                entry["dl"] = int(float(out.get("delay_s") or 0) * 1000)
            packed.append(entry)
        scope = self.of_batch(batch_id)
        keys: list[Any] = [scope.counters, scope.metrics, scope.batches, scope.leases,
                           scope.failed, scope.events, *scope.timeline]
        args: list[Any] = [
            scope.prefix, batch_id, self.status_ttl_s, self.max_items, self.linger_ms,
            json.dumps(packed, separators=(",", ":"), ensure_ascii=False), calls, items_sent,
            json.dumps({"op": operator_type, "bs": len(packed),
                        "c": [[cls, round(ms, 3)] for cls, ms in call_metrics]}),
            self.events_maxlen, self.status_detail_s, *(self.verify or ())]
        return keys, args

    @property
    def requeue_failed_keys(self) -> list[str]:
        """The ``KEYS`` of a ``requeue_failed.lua`` call."""
        return [self.keys.counters, self.keys.failed]


def requeued(raw: Any) -> tuple[list[str], tuple[Wake, ...]]:
    """The ids and wakes ``requeue_failed.lua`` answered."""
    return [as_text(i) for i in raw[0]], wakes_of(raw[1])


def round_of(start: int, block: Sequence[Any], calls: Sequence[Sequence[Any]],
           replies: Sequence[Any], min_replicas: int) -> Round:
    """The codes of one answered round: a script call that Redis refused before it wrote
    anything (OOM, READONLY, MISCONF) gives ``NOT_WRITTEN``, any other error ``UNKNOWN``."""
    codes: list[int] = []
    wakes: list[Wake] = []
    error: Exception | None = None
    for args, reply in zip(calls, replies, strict=False):
        if isinstance(reply, redis.RedisError):
            error = error or reply
            codes.extend([NOT_WRITTEN if refused_before_writing(reply) else UNKNOWN]
                         * (len(args) - 4))
            continue
        answered = [int(c) for c in reply[0]]
        if NOT_WRITTEN in answered and error is None:  # only the move flag answers it (enqueue.lua)
            error = AppMovingError("an app's slot is moving to another Redis Cluster master: "
                                   "nothing of it was stored, send it again after the move")
        codes.extend(answered)
        wakes.extend(wakes_of(reply[1]))
    replicas = None
    if min_replicas > 0:
        last = replies[-1]
        replicas = 0 if isinstance(last, Exception) else int(last)
    return Round(start, len(block), codes=codes, wakes=merge_wakes(wakes),
                 replicas=replicas, error=error, sent=True)
