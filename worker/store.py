"""The intent store in Redis: enqueue, claim, complete, reap, requeue, pauses, wakes, heartbeats.

Every state change is one Lua script call (``worker/lua/*.lua``, loaded once and run by SHA), so a
change, its counters and its place in the queues move together or not at all. Every key name,
TTL and flag is in ``worker/keys.py`` (its docstring has the key layout); the scripts get them
from there too, through a generated prelude, and the keys a script knows up front in ``KEYS``.
The calls' arguments and replies are ``worker.store_calls``; the reads ``worker.store_read``.

Per-key order: an intent waits for the latest pending intent that holds any of its keys (a chain
along ``P ko:*``), and only intents with nothing to wait for enter ``P q:...``. A claim therefore never
hands out two intents that share a key, and the earlier one is terminal before the later one is sent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster

from .errors import StoreError
from .history import PRUNE_BUDGET, PRUNE_SHARDS, HistoryQuery, history_call, history_reply
from .keys import DEFAULT_PREFIX, SWEEP_LOCK_MS, WAKE_FLAG_MS, WORKER_TTL_S, app_of_batch
from .model import Account, BatchItem, Intent, Status
from .round_trip import round_trip, sends
from .store_calls import (
    ENQUEUE_CHUNK,
    NOT_WRITTEN,
    SCRIPTS,
    UNKNOWN,
    UNREACHABLE,
    AppMovingError,
    Claim,
    Completion,
    Layout,
    Round,
    Wake,
    as_text,
    completion_of,
    evalsha,
    intent_arg,
    load_script,
    merge_wakes,
    refused_before_writing,
    requeued,
    round_of,
    unavailable,
    wakes_of,
)
from .store_read import StoreReads, iso_ms, record_to_status

# what other modules have always imported from here
__all__ = ["ENQUEUE_CHUNK", "NOT_WRITTEN", "SCRIPTS", "UNKNOWN", "UNREACHABLE", "AppMovingError", "Claim",
           "Completion", "Layout", "Round", "Store", "Wake", "evalsha", "intent_arg", "iso_ms",
           "merge_wakes", "record_to_status", "refused_before_writing", "requeued", "round_of",
           "unavailable"]


class Store(StoreReads):
    """The Redis side of tpns-batcher. Thread-safe as far as the given redis client is."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, *, max_items: int = 20,
                 linger_ms: int = 250, lease_s: float = 60.0, status_ttl_s: int = 604800,
                 verify: tuple[int, int] | None = None, events_maxlen: int = 1_000_000,
                 status_detail_s: int = 3600) -> None:
        super().__init__(prefix, max_items=max_items, linger_ms=linger_ms, lease_s=lease_s,
                         status_ttl_s=status_ttl_s, events_maxlen=events_maxlen,
                         status_detail_s=status_detail_s,
                         cluster=isinstance(client, RedisCluster))
        self.redis = client
        #: (delay ms, timeout ms) with TPNS_VERIFY=on: accepted items go verifying (SPEC §6.1)
        self.verify = verify
        self._scripts = {name: client.register_script(load_script(name)) for name in SCRIPTS}

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
                    if self.cluster:  # a cluster pipeline routes each call to its app's node
                        pipe = self.redis.pipeline(transaction=False)
                        sent = True
                        for keys, args in calls:
                            evalsha(pipe, sha, keys, args)
                        if min_replicas > 0:
                            pipe.execute_command("WAIT", min_replicas, wait_ms)  # type: ignore[no-untyped-call]
                        replies = pipe.execute(raise_on_error=False)
                    else:
                        # connect first: a failure here means nothing of this round left the
                        # process (a cluster pipeline connects per node as it sends)
                        conn = self.redis.connection_pool.get_connection()
                        sent = True
                        replies = round_trip(
                            self.redis.connection_pool, conn, sha, self.enqueue_keys, sends(
                                [args for _, args in calls],
                                functools.partial(self.enqueue_calls, block, max_pending,
                                                  resent=True)),
                            min_replicas, wait_ms)
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
        kind = as_text(raw[0])
        if kind == "paused":
            return Claim("paused", wait_ms=int(raw[1]), reason=as_text(raw[2]),
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
        return Claim("batch", batch_id=as_text(raw[1]), items=items, eligible_left=int(raw[3]),
                     wait_ms=int(raw[4]), backoff_ms=backoff_ms, eligible=eligible,
                     oldest_eligible_ms=int(raw[6]),
                     reason="full" if eligible >= self.max_items else "linger")

    def complete(self, batch_id: str, outcomes: Sequence[Mapping[str, Any]], *, calls: int,
                 items_sent: int, operator_type: int = 0,
                 call_metrics: Sequence[tuple[str, float]] = ()) -> Completion:
        """Record each item's outcome; ``outcomes`` are ItemOutcome-like mappings or objects.

        Each needs ``id`` and ``state`` (succeeded, failed, retry, requeue), optionally
        ``result_code``, ``ret_code``, ``err_msg``, ``error`` and ``delay_s``. ``call_metrics``
        has one ``(result class, latency ms or -1)`` per HTTP call made, for the metrics hash.
        """
        keys, args = self.complete_call(batch_id, outcomes, calls=calls, items_sent=items_sent,
                                        operator_type=operator_type, call_metrics=call_metrics)
        return completion_of(self._scripts["complete"](keys=keys, args=args))

    def complete_many(self, completions: Sequence[tuple[list[Any], list[Any]]]
                      ) -> list[Completion | BaseException]:
        """Several batches' ``complete`` calls (from ``complete_call``) in one round trip, each
        the same atomic script as ``complete``; one answer per call, in order: its
        ``Completion``, or the error that call alone met. An error of the round trip itself
        (Redis unreachable) is raised: none of them is known to have run."""
        replies = self._evalsha_pipeline([("complete", keys, args) for keys, args in completions],
                                         raise_errors=False)
        return [reply if isinstance(reply, Exception) else completion_of(reply)
                for reply in replies]

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
            wakes.extend(wakes_of(raw[1]))
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

    def claim_verify_wake(self, app: str, px_ms: int = WAKE_FLAG_MS) -> bool:
        """Whether this caller should send ``app``'s verify wake (due in ``px_ms`` at most): true
        for the first caller while none is on its way."""
        return bool(self.redis.set(self.scope(app).wake_verify(app), "1", nx=True,
                                   px=max(1, px_ms)))

    def clear_verify_wake(self, app: str) -> None:
        """A verify task started: the next verify wake may be sent."""
        self.redis.delete(self.scope(app).wake_verify(app))

    def claim_sweep(self) -> bool:
        """Count a sweep run; whether this one is the beat's (extra beats skip theirs)."""
        # every run counts (skipped ones too): runs per second show how many beats are scheduling
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.keys.counters, "sweeps", 1)
        pipe.set(self.keys.sweep_lock, "1", nx=True, px=SWEEP_LOCK_MS)
        return bool(pipe.execute()[1])

    def register_apps(self, names: Iterable[str]) -> None:
        """Workers publish the app names they serve, so producers need no configuration."""
        names = list(names)
        if names:
            self.redis.sadd(self.keys.apps, *names)

    def heartbeat(self, worker: str, ttl_s: int = WORKER_TTL_S) -> None:
        """Note that ``worker`` is alive (entries older than ``ttl_s`` are dropped)."""
        now_s = int(self.redis.time()[0])
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {worker: now_s})
        pipe.zremrangebyscore(self.keys.workers, "-inf", now_s - ttl_s)
        pipe.execute()

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
