"""The intent store in Redis: enqueue, claim, complete, reap, requeue, status and counters.

Every state change is one Lua script call (``worker/lua/*.lua``, loaded once and run by SHA), so a
change, its counters and its place in the queues move together or not at all. Every key name,
TTL and flag is in ``worker/keys.py`` (its docstring has the key layout); the scripts get them
from there too, through a generated prelude, and the keys a script knows up front in ``KEYS``.

Per-key order: an intent waits for the latest pending intent that holds any of its keys (a chain
along ``P ko:*``), and only intents with nothing to wait for enter ``P q:...``. A claim therefore never
hands out two intents that share a key, and the earlier one is terminal before the later one is sent.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import redis
from redis.cluster import RedisCluster

from .errors import StoreError
from .history import PRUNE_BUDGET, PRUNE_SHARDS, HistoryQuery, history_call, history_reply
from .keys import (
    DEFAULT_PREFIX,
    RECORD_STATES,
    SWEEP_LOCK_MS,
    WAKE_FLAG_MS,
    WORKER_TTL_S,
    Keys,
    app_of_batch,
    app_of_id,
    batch_nonce,
    lua_prelude,
)
from .model import OPERATOR_TYPES, STATES, Account, BatchItem, Intent, Status

_OUTCOME = {"succeeded": "ok", "failed": "f", "retry": "r", "requeue": "q"}
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


def _load_script(name: str) -> str:
    """The prelude of names and constants from ``worker.keys``, ``lib.lua``, then the script."""
    lib = resources.files("worker").joinpath("lua/lib.lua").read_text(encoding="utf-8")
    body = resources.files("worker").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")
    return lua_prelude() + lib + "\n" + body


def evalsha(pipe: Any, sha: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue ``EVALSHA`` on a pipeline: as a plain command, which a cluster pipeline routes by
    the first key (redis-py blocks its ``evalsha`` method there)."""
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)


def _wakes(raw: Iterable[Any]) -> tuple[Wake, ...]:
    out = []
    for item in raw:
        app, op, kind = _text(item).rsplit(":", 2)
        out.append(Wake(app, int(op), kind))  # type: ignore[arg-type]
    return tuple(out)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def iso_ms(epoch_ms: int | float) -> str:
    """``2026-11-25T10:00:00.000Z`` for an epoch time in milliseconds."""
    moment = dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch_ms) % 1000:03d}Z"


def intent_arg(intent_id: str, intent: Intent) -> str:
    """The compact JSON one intent is passed to ``enqueue.lua`` as."""
    payload: dict[str, Any] = {"i": intent_id, "a": intent.app, "o": intent.operator_type}
    if intent.token is not None:
        payload["t"] = intent.token
    if intent.accounts:
        payload["l"] = [[a.account, a.account_type] for a in intent.accounts]
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


#: the Lua scripts, each ``lua/lib.lua`` + ``lua/<name>.lua``
SCRIPTS = ("enqueue", "claim", "complete", "reap", "requeue_failed", "throttle", "verify_claim",
           "verify_done", "history", "prune_history")


class Layout:
    """The store's prefix and limits, and the arguments its script calls take: written once for
    the sync ``Store`` and the asyncio ``worker.astore.AsyncStore``, which send the same calls."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, max_items: int = 20, linger_ms: int = 250,
                 lease_s: float = 60.0, status_ttl_s: int = 604800,
                 events_maxlen: int = 1_000_000, cluster: bool = False) -> None:
        self.prefix = prefix
        self.keys = Keys(prefix)
        #: Redis Cluster: each app's keys under ``P{app}:`` (one slot), see ``worker.keys``
        self.cluster = cluster
        self.events_maxlen = events_maxlen
        self.max_items = max_items
        self.linger_ms = linger_ms
        self.lease_ms = int(lease_s * 1000)
        self.status_ttl_s = status_ttl_s

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

    def enqueue_calls(self, block: Sequence[tuple[str, Intent]],
                      max_pending: int) -> list[list[str | int]]:
        """The arguments of the ``enqueue.lua`` calls storing ``block``, ``ENQUEUE_CHUNK`` a call."""
        head: list[str | int] = [self.prefix, self.max_items, self.linger_ms, max_pending]
        return [head + [intent_arg(i, it) for i, it in block[k:k + ENQUEUE_CHUNK]]
                for k in range(0, len(block), ENQUEUE_CHUNK)]

    @property
    def enqueue_keys(self) -> list[str]:
        """The ``KEYS`` of every ``enqueue.lua`` call."""
        return [self.keys.counters, *self.keys.timeline]

    def requeue_failed_args(self, error: str | None, limit: int,
                            keys: Keys | None = None) -> list[Any]:
        return [(keys or self.keys).prefix, error or "", limit, self.max_items, self.linger_ms]

    @property
    def requeue_failed_keys(self) -> list[str]:
        """The ``KEYS`` of a ``requeue_failed.lua`` call."""
        return [self.keys.counters, self.keys.failed]


def requeued(raw: Any) -> tuple[list[str], tuple[Wake, ...]]:
    """The ids and wakes ``requeue_failed.lua`` answered."""
    return [_text(i) for i in raw[0]], _wakes(raw[1])


class Store(Layout):
    """The Redis side of tpns-batcher. Thread-safe as far as the given redis client is."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, *, max_items: int = 20,
                 linger_ms: int = 250, lease_s: float = 60.0, status_ttl_s: int = 604800,
                 verify: tuple[int, int] | None = None, events_maxlen: int = 1_000_000) -> None:
        super().__init__(prefix, max_items=max_items, linger_ms=linger_ms, lease_s=lease_s,
                         status_ttl_s=status_ttl_s, events_maxlen=events_maxlen,
                         cluster=isinstance(client, RedisCluster))
        self.redis = client
        #: (delay ms, timeout ms) with TPNS_VERIFY=on: accepted items go verifying (SPEC §6.1)
        self.verify = verify
        self._scripts = {name: client.register_script(_load_script(name)) for name in SCRIPTS}

    def apps_of(self, apps: Iterable[str] = ()) -> list[str]:
        """The apps whose keys to visit for something global (counters, leases, failures): in
        cluster mode each has its own, so ``apps`` and the known ones; standalone, one pass."""
        if not self.cluster:
            return [""]
        return sorted(set(apps) | self.known_apps())

    # -- producers ---------------------------------------------------------------------------

    def enqueue(self, intents: Sequence[tuple[str, Intent]], *,
                max_pending: int = 0) -> tuple[list[int], tuple[Wake, ...]]:
        """Store ``(id, intent)`` pairs in order; one round trip per few thousand intents.

        Returns one code per intent (1 stored, 0 already stored with the same payload, -1 the id
        exists with another payload, -2 refused: ``max_pending`` reached) and the wakes to send.
        Raises the Redis error of the first round that failed (``enqueue_rounds`` tells more).
        """
        codes: list[int] = []
        wakes: list[Wake] = []
        for done in self.enqueue_rounds(intents, max_pending=max_pending):
            if done.error is not None:
                raise done.error
            codes.extend(done.codes)
            wakes.extend(done.wakes)
        return codes, merge_wakes(wakes)

    def enqueue_rounds(self, intents: Sequence[tuple[str, Intent]], *, max_pending: int = 0,
                       min_replicas: int = 0, wait_ms: int = 1000) -> Iterator[Round]:
        """Store ``(id, intent)`` pairs in order, one round trip (``Round``) at a time.

        A round that fails is yielded with its ``error`` and ends the iteration, so what follows
        it was never sent. Whether the failed round itself may have reached Redis is told apart
        by connecting before sending: a round whose connection could not even be made was not
        sent. With ``min_replicas``, each round ends with ``WAIT min_replicas wait_ms`` in the
        same round trip, and ``Round.replicas`` says how many acknowledged it.
        """
        sha = self._scripts["enqueue"].sha
        per_round = ENQUEUE_CHUNK * 10
        for start in range(0, len(intents), per_round):
            block = intents[start:start + per_round]
            calls, order = self.enqueue_groups(block, max_pending)
            sent = False
            try:
                for _attempt in range(2):
                    pipe = self.redis.pipeline(transaction=False)
                    if not self.cluster:
                        # connect first: a failure here means nothing of this round left the
                        # process (a cluster pipeline connects per node as it sends)
                        pipe.connection = self.redis.connection_pool.get_connection()
                    sent = True
                    for keys, args in calls:
                        evalsha(pipe, sha, keys, args)
                    if min_replicas > 0:
                        pipe.execute_command("WAIT", min_replicas, wait_ms)  # type: ignore[no-untyped-call]
                    replies = pipe.execute(raise_on_error=False)
                    if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                        break
                    # a restarted server lost its scripts (then none of the calls ran): load, redo
                    self.redis.script_load(self._scripts["enqueue"].script)
            except (redis.RedisError, OSError) as exc:
                yield Round(start, len(block), error=exc, sent=sent)
                return
            done = round_of(start, block, [args for _, args in calls], replies, min_replicas)
            if self.cluster and done.codes:  # back to the input's order
                codes = [0] * len(block)
                for j, code in zip(order, done.codes, strict=True):
                    codes[j] = code
                done = Round(done.start, done.size, codes=codes, wakes=done.wakes,
                             replicas=done.replicas, error=done.error, sent=done.sent)
            yield done
            if done.error is not None:
                return

    # -- workers -----------------------------------------------------------------------------

    def claim(self, app: str, operator_type: int, *, clear_wake: bool = False,
              read_backoff: bool = False) -> Claim:
        """Atomically take up to ``max_items`` eligible intents of one app and op, under a lease.

        ``clear_wake`` first does what ``clear_wake`` does, and ``read_backoff`` then reads the
        app's shared backoff (``throttle`` without a rate limit) into ``Claim.backoff_ms``: all
        in the claim's own round trip, which is one of the few a batch costs.
        """
        if not clear_wake and not read_backoff:
            keys, args = self._claim_call(app, operator_type)
            return self._claim_reply(self._scripts["claim"](keys=keys, args=args))
        return self.claim_many(app, operator_type, 1, clear_wake=clear_wake,
                               read_backoff=read_backoff)[0]

    def claim_many(self, app: str, operator_type: int, count: int, *, clear_wake: bool = False,
                   read_backoff: bool = False) -> list[Claim]:
        """``count`` claims of one app and op in one round trip, each atomic on its own, as if
        made one after the other (``clear_wake`` and ``read_backoff`` as for ``claim``, the
        backoff read once after them all).

        Every ``batch`` among the replies is leased and must be sent, wherever it comes:
        another client's commands may run between two claims of the pipeline (an enqueue after
        an ``empty``), so a batch can follow a claim that found none.
        """
        calls: list[tuple[str, list[Any], list[Any]]] = [
            ("claim", *self._claim_call(app, operator_type)) for _ in range(count)]
        if read_backoff:
            calls.append(("throttle", self._throttle_keys(app), [self.scope(app).prefix, app, 0]))
        before = [self.scope(app).wake(app, operator_type)] if clear_wake else []
        replies = self._evalsha_pipeline(calls, delete=before)
        backoff_ms = int(replies[count]) if read_backoff else 0
        return [self._claim_reply(raw, backoff_ms) for raw in replies[:count]]

    def _claim_call(self, app: str, operator_type: int) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of one claim."""
        # the batch id ends in a random part: a claim lost with the last second of the AOF (or
        # with an unreplicated write at a failover) can hand out the same sequence number again,
        # and the lease checks must not take the other claim's lease for their own
        scope = self.scope(app)
        args: list[Any] = [scope.prefix, app, operator_type, self.max_items, self.linger_ms,
                           self.lease_ms, self.nonce(app)]
        keys: list[Any] = [scope.counters, scope.ready(app, operator_type),
                           scope.delayed(app, operator_type), scope.pause(app),
                           scope.seq, scope.batches, scope.leases]
        return keys, args

    def _claim_reply(self, raw: Any, backoff_ms: int = 0) -> Claim:
        kind = _text(raw[0])
        if kind == "paused":
            return Claim("paused", wait_ms=int(raw[1]), reason=_text(raw[2]),
                         backoff_ms=backoff_ms)
        if kind in ("empty", "wait"):
            return Claim(kind, wait_ms=int(raw[1]), backoff_ms=backoff_ms)  # type: ignore[arg-type]
        if kind != "batch":
            raise StoreError(f"claim returned {kind!r}")
        items = tuple(
            BatchItem(id=i, token=t or None,
                      accounts=tuple(Account(a, int(k)) for a, k in (accs or [])),
                      attempts=int(n), created_at_ms=int(c))
            for i, t, accs, n, c in json.loads(raw[2]))
        eligible = int(raw[5])
        return Claim("batch", batch_id=_text(raw[1]), items=items, eligible_left=int(raw[3]),
                     wait_ms=int(raw[4]), backoff_ms=backoff_ms, eligible=eligible,
                     oldest_eligible_ms=int(raw[6]),
                     reason="full" if eligible >= self.max_items else "linger")

    def _evalsha_pipeline(self, calls: Sequence[tuple[str, list[Any], list[Any]]],
                          delete: Sequence[str] = ()) -> list[Any]:
        """``DEL delete…`` then each ``(script name, keys, args)`` in one round trip; replies.

        By SHA in a plain pipeline: redis-py's script-aware pipeline would add a ``SCRIPT
        EXISTS`` round trip to every execute. On a server that lost its scripts (a restart),
        each call that did not run is run again through its ``Script``, which loads it.
        """
        pipe = self.redis.pipeline(transaction=False)
        if delete:
            pipe.delete(*delete)
        for name, keys, args in calls:
            evalsha(pipe, self._scripts[name].sha, keys, args)
        replies = list(pipe.execute(raise_on_error=False))[1 if delete else 0:]
        for n, reply in enumerate(replies):
            if isinstance(reply, redis.exceptions.NoScriptError):
                # only the calls that did not run go again (Script loads itself on NOSCRIPT)
                name, keys, args = calls[n]
                replies[n] = self._scripts[name](keys=keys, args=args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    def complete(self, batch_id: str, outcomes: Sequence[Mapping[str, Any]], *, calls: int,
                 items_sent: int, operator_type: int = 0,
                 call_metrics: Sequence[tuple[str, float]] = ()) -> Completion:
        """Record each item's outcome; ``outcomes`` are ItemOutcome-like mappings or objects.

        Each needs ``id`` and ``state`` (succeeded, failed, retry, requeue), optionally
        ``result_code``, ``ret_code``, ``err_msg``, ``error`` and ``delay_s``. ``call_metrics``
        has one ``(result class, latency ms or -1)`` per HTTP call made, for the metrics hash.
        """
        packed = []
        for out in outcomes:
            entry: dict[str, Any] = {"i": out["id"], "s": _OUTCOME[out["state"]]}
            for name, short in (("result_code", "rc"), ("ret_code", "ret"), ("err_msg", "m"),
                                ("error", "er")):
                if out.get(name) is not None:
                    entry[short] = out[name]
            if out["state"] == "retry":
                entry["dl"] = int(float(out.get("delay_s") or 0) * 1000)
            packed.append(entry)
        scope = self.of_batch(batch_id)
        raw = self._scripts["complete"](keys=[
            scope.counters, scope.metrics, scope.batches, scope.leases,
            scope.failed, scope.events, *scope.timeline], args=[
            scope.prefix, batch_id, self.status_ttl_s, self.max_items, self.linger_ms,
            json.dumps(packed, separators=(",", ":"), ensure_ascii=False), calls, items_sent,
            json.dumps({"op": operator_type, "bs": len(packed),
                        "c": [[cls, round(ms, 3)] for cls, ms in call_metrics]}),
            self.events_maxlen, *(self.verify or ())])
        return Completion(int(raw[0]), int(raw[1]), _wakes(raw[2]))

    def reap(self, limit: int = 200) -> tuple[int, tuple[Wake, ...]]:
        """Return the items of expired leases to their queues; (items reclaimed, wakes).
        In cluster mode, every known app's leases (``limit`` each)."""
        reclaimed, wakes = 0, list[Wake]()
        for app in self.apps_of():
            scope = self.scope(app)
            raw = self._scripts["reap"](
                keys=[scope.counters, scope.leases, scope.batches, *scope.timeline],
                args=[scope.prefix, self.max_items, self.linger_ms, limit])
            reclaimed += int(raw[0])
            wakes.extend(_wakes(raw[1]))
        return reclaimed, tuple(wakes)

    def requeue_failed(self, error: str | None = None,
                       limit: int = 100_000) -> tuple[list[str], tuple[Wake, ...]]:
        """Put failed intents (optionally only those with this ``error``) back into the queue."""
        ids: list[str] = []
        wakes: list[Wake] = []
        for app in self.apps_of():
            scope = self.scope(app)
            more, woken = requeued(self._scripts["requeue_failed"](
                keys=[scope.counters, scope.failed],
                args=self.requeue_failed_args(error, limit - len(ids), scope)))
            ids.extend(more)
            wakes.extend(woken)
            if len(ids) >= limit:
                break
        return ids, tuple(wakes)

    def throttle(self, app: str, max_calls_per_s: float) -> float:
        """Reserve a call slot of the global rate limit; seconds to wait before sending."""
        wait_s = self.before_attempt(app, max_calls_per_s, None)
        assert wait_s is not None  # without a batch there is no lease to lose
        return wait_s

    def before_attempt(self, app: str, max_calls_per_s: float,
                       batch_id: str | None) -> float | None:
        """Before an HTTP attempt for ``batch_id``: None if its lease is no longer held (lost
        in an outage, or expired), else ``throttle``'s wait. One round trip for both."""
        interval_ms = 0 if max_calls_per_s <= 0 else max(1, round(1000 / max_calls_per_s))
        if self.cluster and not app and batch_id:
            app = app_of_batch(batch_id)
        args: list[Any] = [self.scope(app).prefix, app, interval_ms]
        if batch_id:
            args.append(batch_id)
        wait_ms = int(self._scripts["throttle"](keys=self._throttle_keys(app), args=args))
        return None if wait_ms < 0 else wait_ms / 1000

    def _throttle_keys(self, app: str) -> list[str]:
        scope = self.scope(app)
        return [scope.leases, scope.backoff(app), scope.rate(app)]

    def lease_held(self, batch_id: str) -> bool:
        """Whether ``batch_id``'s lease is still in Redis and not expired."""
        return self.before_attempt("", 0, batch_id) is not None

    def set_backoff(self, app: str, seconds: float) -> None:
        """Make every worker hold calls for ``app`` for ``seconds`` (after a 429 / 1008028)."""
        ms = max(1, int(seconds * 1000))
        now_s, now_us = self.redis.time()
        until = now_s * 1000 + now_us // 1000 + ms
        self.redis.set(self.scope(app).backoff(app), until, px=ms)

    def pause(self, app: str, seconds: float, reason: str) -> None:
        """Pause sending for ``app`` on every worker (credentials, billing, app gone)."""
        if seconds > 0:
            self.redis.set(self.scope(app).pause(app), reason, px=max(1, int(seconds * 1000)))

    def resume(self, app: str) -> None:
        self.redis.delete(self.scope(app).pause(app))

    def pauses(self, apps: Iterable[str]) -> dict[str, tuple[float, str]]:
        """Apps paused now: app -> (seconds left, reason)."""
        apps = list(apps)
        pipe = self.redis.pipeline(transaction=False)
        for app in apps:
            pipe.pttl(self.scope(app).pause(app))
            pipe.get(self.scope(app).pause(app))
        res = pipe.execute()
        out = {}
        for k, app in enumerate(apps):
            ms, reason = res[2 * k], res[2 * k + 1]
            if ms and ms > 0 and reason is not None:
                out[app] = (ms / 1000, _text(reason))
        return out

    def clear_wake(self, app: str, operator_type: int) -> None:
        """A flush started: the next full batch may send a new immediate wake."""
        self.redis.delete(self.scope(app).wake(app, operator_type))

    def claim_wake(self, app: str, operator_type: int) -> bool:
        """Whether this caller should send the immediate wake for ``(app, operator_type)``:
        true for the first caller while none is on its way (the same flag lib.lua sets)."""
        return bool(self.redis.set(self.scope(app).wake(app, operator_type), "1", nx=True,
                                   px=WAKE_FLAG_MS))

    def claim_linger_wake(self, app: str, operator_type: int, wait_ms: int) -> bool:
        """Whether this caller should send the wake due in ``wait_ms`` for a partial batch:
        true for the first caller while none is on its way."""
        return bool(self.redis.set(self.scope(app).wake_linger(app, operator_type), "1", nx=True,
                                   px=max(1, wait_ms)))

    def claim_sweep(self) -> bool:
        """Count a sweep run; whether this one is the beat's (extra beats skip theirs)."""
        # every run counts (skipped ones too): runs per second show how many beats are scheduling
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.keys.counters, "sweeps", 1)
        pipe.set(self.keys.sweep_lock, "1", nx=True, px=SWEEP_LOCK_MS)
        return bool(pipe.execute()[1])

    def ready_counts(self, apps: Iterable[str]) -> dict[tuple[str, int], tuple[int, int]]:
        """(app, op) -> (eligible now, retrying) for every pair with work."""
        pairs = [(a, op) for a in apps for op in OPERATOR_TYPES]
        pipe = self.redis.pipeline(transaction=False)
        for app, op in pairs:
            pipe.llen(self.scope(app).ready(app, op))
            pipe.zcard(self.scope(app).delayed(app, op))
        res = pipe.execute()
        return {pair: (res[2 * k], res[2 * k + 1]) for k, pair in enumerate(pairs)
                if res[2 * k] or res[2 * k + 1]}

    # -- apps and workers --------------------------------------------------------------------

    def register_apps(self, names: Iterable[str]) -> None:
        """Workers publish the app names they serve, so producers need no configuration."""
        names = list(names)
        if names:
            self.redis.sadd(self.keys.apps, *names)

    def known_apps(self) -> set[str]:
        return {_text(a) for a in self.redis.smembers(self.keys.apps)}

    def heartbeat(self, worker: str, ttl_s: int = WORKER_TTL_S) -> None:
        """Note that ``worker`` is alive (entries older than ``ttl_s`` are dropped)."""
        now_s = int(self.redis.time()[0])
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {worker: now_s})
        pipe.zremrangebyscore(self.keys.workers, "-inf", now_s - ttl_s)
        pipe.execute()

    def workers(self, ttl_s: int = WORKER_TTL_S) -> dict[str, float]:
        """Workers seen in the last ``ttl_s`` seconds -> seconds since last seen."""
        now_s = int(self.redis.time()[0])
        seen: Any = self.redis.zrangebyscore(self.keys.workers, now_s - ttl_s, "+inf",
                                             withscores=True)
        return {_text(w): now_s - float(score) for w, score in seen}

    # -- status and stats --------------------------------------------------------------------

    def status(self, intent_id: str) -> Status | None:
        """The status of one intent, or None for an unknown id."""
        return self.statuses([intent_id])[0]

    def statuses(self, ids: Sequence[str]) -> list[Status | None]:
        """Statuses of many intents in one round trip (None for unknown ids)."""
        if not ids:
            return []
        raws = self.records(ids)
        return [None if raw is None else record_to_status(i, json.loads(raw))
                for i, raw in zip(ids, raws, strict=True)]

    def records(self, ids: Sequence[str]) -> list[Any]:
        """The raw records of ``ids`` (None where gone): one MGET, or in cluster mode one
        pipelined GET each (their keys are in as many slots as they have apps)."""
        if not self.cluster:
            return list(self.redis.mget([self.keys.record(i) for i in ids]))
        pipe = self.redis.pipeline(transaction=False)
        for intent_id in ids:
            pipe.get(self.of_id(intent_id).record(intent_id))
        return list(pipe.execute())

    def _summed(self, key_of: Any, convert: Any) -> dict[str, Any]:
        """A hash of counters (``key_of(keys)``) summed over the apps' keys in cluster mode."""
        total: dict[str, Any] = {}
        names = [key_of(self.keys)] + [key_of(self.keys.tagged(a)) for a in self.apps_of()
                                       if self.cluster]
        for name in names:
            for k, v in self.redis.hgetall(name).items():
                total[_text(k)] = total.get(_text(k), 0) + convert(v)
        return total

    def counters(self) -> dict[str, int]:
        """The counters; in cluster mode each app's summed (plus the global ``sweeps``)."""
        return self._summed(lambda keys: keys.counters, int)

    def call_metrics(self) -> dict[str, float]:
        """The raw metrics hash: ``call:<op>:<class>``, ``lat:<le ms>``, ``lat_sum_ms``,
        ``bs:<size>`` and ``retries:<op>`` (see complete.lua); summed over apps in cluster mode."""
        return self._summed(lambda keys: keys.metrics, float)

    def stats(self, apps: Iterable[str]) -> dict[str, Any]:
        """Counts per state and op, queue depth, oldest pending age, calls, items per call, pauses."""
        apps = sorted(set(apps) | self.known_apps())
        counters = self.counters()
        by_op: dict[str, dict[str, int]] = {}
        totals = dict.fromkeys(STATES, 0)
        for op in OPERATOR_TYPES:
            row = {state: counters.get(f"{state}:{op}", 0) for state in totals}
            row["enqueued"] = counters.get(f"enqueued:{op}", 0)
            # ever-growing terminal counts (``failed`` drops when failed intents are requeued)
            row["done_succeeded"] = counters.get(f"done_succeeded:{op}", 0)
            row["done_failed"] = counters.get(f"done_failed:{op}", 0)
            by_op[str(op)] = row
            for state in totals:
                totals[state] += row[state]
        pairs = [(a, op) for a in apps for op in OPERATOR_TYPES]
        pipe = self.redis.pipeline(transaction=False)
        # as a plain command: a cluster pipeline blocks .time() (it goes to one node)
        pipe.execute_command("TIME")  # type: ignore[no-untyped-call]
        for app, op in pairs:
            pipe.llen(self.scope(app).ready(app, op))
            pipe.lindex(self.scope(app).ready(app, op), 0)
        for app in apps:  # the verifying item checked next: roughly the longest verifying
            pipe.zrange(self.scope(app).verifying(app), 0, 0)
        res = pipe.execute()
        now_ms = res[0][0] * 1000 + res[0][1] // 1000
        heads = [res[1 + 2 * k + 1] for k in range(len(pairs))]
        heads += [r[0] for r in res[1 + 2 * len(pairs):] if r]
        depth = {f"{a}:{op}": res[1 + 2 * k] for k, (a, op) in enumerate(pairs) if res[1 + 2 * k]}
        head_ids = [_text(h) for h in heads if h is not None]
        oldest_ms = 0
        if head_ids:
            for raw in self.records(head_ids):
                if raw is not None:
                    rec = json.loads(raw)
                    oldest_ms = max(oldest_ms, now_ms - int(rec.get("u", rec["c"])))
        calls = counters.get("calls", 0)
        items_sent = counters.get("items_sent", 0)
        return {
            "states": totals,
            "by_operator_type": by_op,
            "eligible": depth,
            # verifying items are pending: they hold their keys until seen applied (SPEC §6.1)
            "queue_depth": totals["queued"] + totals["retrying"] + totals["verifying"],
            "in_flight": totals["sending"],
            "oldest_pending_age_s": round(oldest_ms / 1000, 3),
            "calls": calls,
            "items_sent": items_sent,
            "items_per_call": round(items_sent / calls, 2) if calls else 0.0,
            "leases_reclaimed": counters.get("leases_reclaimed", 0),
            "verify": {"ok": counters.get("verify_ok", 0),
                       "retry": counters.get("verify_retry", 0),
                       "not_applied": counters.get("verify_not_applied", 0),
                       "query_calls": counters.get("query_calls", 0)},
            "paused": {app: {"seconds_left": round(left, 1), "reason": reason}
                       for app, (left, reason) in self.pauses(apps).items()},
            "apps": apps,
        }

    def history(self, query: HistoryQuery) -> list[Status]:
        """The intents that named ``query``'s key, newest first, while their records live."""
        keys, args = history_call(self.scope(query.app), query)
        raw = self._scripts["history"](keys=keys, args=args)
        return [record_to_status(i, rec) for i, rec in history_reply(raw, query.limit)]

    def prune_history(self, budget: int = PRUNE_BUDGET,
                      shards: int = PRUNE_SHARDS) -> tuple[int, int]:
        """Drop history heads whose record expired, about ``budget`` heads or ``shards`` shards
        at a time (the sweep's part of keeping the index bounded); (shards seen, heads dropped)."""
        seen = dropped = 0
        for app in self.apps_of():  # in cluster mode each app's index, in its slot
            scope = self.scope(app)
            raw = self._scripts["prune_history"](keys=[scope.history_cursor],
                                                 args=[scope.prefix, budget, shards])
            seen, dropped = seen + int(raw[0]), dropped + int(raw[1])
        return seen, dropped

    def recent_failures(self, limit: int = 20) -> list[Status]:
        """The most recently failed intents, newest first."""
        scored: list[tuple[float, str]] = []
        for app in self.apps_of():
            found: Any = self.redis.zrevrange(self.scope(app).failed, 0, limit - 1,
                                              withscores=True)
            scored += [(float(t), _text(i)) for i, t in found]
        ids = [i for _, i in sorted(scored, reverse=True)[:limit]]
        return [s for s in self.statuses(ids) if s is not None]


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
        wakes.extend(_wakes(reply[1]))
    replicas = None
    if min_replicas > 0:
        last = replies[-1]
        replicas = 0 if isinstance(last, Exception) else int(last)
    return Round(start, len(block), codes=codes, wakes=merge_wakes(wakes),
                 replicas=replicas, error=error, sent=True)


def record_to_status(intent_id: str, rec: Mapping[str, Any]) -> Status:
    """Turn a stored record into the status of SPEC §5."""
    op = int(rec["o"])
    accounts = [{"account": a, "account_type": int(k)} for a, k in (rec.get("l") or [])]
    return Status(
        id=intent_id,
        operator_type=op,
        app=rec.get("a", "default"),
        token=rec.get("t"),
        account_list=accounts,
        state=RECORD_STATES[rec["s"]],
        attempts=int(rec.get("n", 0)),
        result_code=rec.get("rc"),
        ret_code=rec.get("ret"),
        err_msg=rec.get("m"),
        error=rec.get("er"),
        batch_id=rec.get("b"),
        verified=rec.get("vf"),
        created_at=iso_ms(rec["c"]),
        updated_at=iso_ms(rec.get("u", rec["c"])),
    )
