"""The producer's side of the store on ``redis.asyncio``, for ``AsyncProducer``.

The same Lua scripts, the same calls: the arguments come from ``store.Layout`` and the replies
are read by ``store.round_of`` and ``store.requeued``, so the sync and the asyncio doors cannot
drift apart. Only what a producer needs is here (enqueue, requeue, statuses, history, known apps).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from .history import HistoryQuery, history_call, history_reply
from .keys import DEFAULT_PREFIX
from .model import Intent, Status
from .round_trip import sends
from .store_calls import (
    ENQUEUE_CHUNK,
    SCRIPTS,
    Layout,
    Round,
    Wake,
    as_text,
    load_script,
    requeued,
    round_of,
)
from .store_read import lookup_calls, record_to_status

#: intents per round trip: as the sync store (``ENQUEUE_CHUNK`` per script call, ten calls)
PER_ROUND = ENQUEUE_CHUNK * 10


class AsyncStore(Layout):
    """Enqueue, requeue and read statuses through a ``redis.asyncio`` client."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str = DEFAULT_PREFIX, **limits: Any) -> None:
        super().__init__(prefix, cluster=isinstance(client, AsyncRedisCluster), **limits)
        self.redis = client
        self._sources = {name: load_script(name) for name in SCRIPTS}
        self._shas = {name: hashlib.sha1(src.encode("utf-8")).hexdigest()
                      for name, src in self._sources.items()}

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One script call by SHA, loading the script when the server does not have it."""
        try:
            return await self.redis.evalsha(self._shas[name], len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.redis.script_load(self._sources[name])
            return await self.redis.evalsha(self._shas[name], len(keys), *keys, *args)

    async def enqueue_rounds(self, intents: Sequence[tuple[str, Intent]], *, max_pending: int = 0,
                             min_replicas: int = 0, wait_ms: int = 1000) -> AsyncIterator[Round]:
        """``Store.enqueue_rounds`` on asyncio: the same rounds, the same ``Round`` answers."""
        if self.cluster:
            async for rnd in self._cluster_rounds(intents, max_pending):
                yield rnd
            return
        keys = self.enqueue_keys
        for start in range(0, len(intents), PER_ROUND):
            block = intents[start:start + PER_ROUND]
            calls = self.enqueue_calls(block, max_pending)
            sent = False
            try:
                for _attempt in range(2):
                    # connect first: a failure here means nothing of this round left the process
                    conn = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
                    sent = True
                    # a re-send after a dropped connection looks each id up among the
                    # summaries too (``intent_arg``)
                    trip = functools.partial(self._round_trip, conn, keys, sends(
                        calls, functools.partial(self.enqueue_calls, block, max_pending,
                                                 resent=True)), min_replicas, wait_ms)
                    try:
                        replies = await conn.retry.call_with_retry(
                            trip, functools.partial(_dropped, conn))
                    except BaseException:  # replies may be left unread: never reuse it
                        await conn.disconnect()
                        raise
                    finally:
                        await self.redis.connection_pool.release(conn)
                    if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                        break
                    # a restarted server lost its scripts (then none of the calls ran): load, redo
                    await self.redis.script_load(self._sources["enqueue"])
            except (redis.RedisError, OSError) as exc:
                yield Round(start, len(block), error=exc, sent=sent)
                return
            done = round_of(start, block, calls, replies, min_replicas)
            yield done
            if done.error is not None:
                return

    async def _cluster_rounds(self, intents: Sequence[tuple[str, Intent]],
                              max_pending: int) -> AsyncIterator[Round]:
        """The rounds on a Redis Cluster: one call per app (``Layout.enqueue_groups``), sent
        together (the client routes each to its app's master); codes back in input order."""
        for start in range(0, len(intents), PER_ROUND):
            block = intents[start:start + PER_ROUND]
            calls, order = self.enqueue_groups(block, max_pending)
            replies = await asyncio.gather(*(self._run("enqueue", keys, args)
                                             for keys, args in calls), return_exceptions=True)
            if all(isinstance(r, (redis.ConnectionError, OSError)) for r in replies):
                yield Round(start, len(block), error=replies[0], sent=True)  # type: ignore[arg-type]
                return
            done = round_of(start, block, [args for _, args in calls], replies, 0)
            codes = [0] * len(block)
            for j, code in zip(order, done.codes, strict=True):
                codes[j] = code
            yield Round(start, len(block), codes=codes, wakes=done.wakes, error=done.error,
                        sent=True)
            if done.error is not None:
                return

    async def _round_trip(self, conn: Any, keys: Sequence[str],
                          calls: Callable[[], Sequence[Sequence[Any]]],
                          min_replicas: int, wait_ms: int) -> list[Any]:
        """The calls (and a ``WAIT``) written at once on ``conn``; one reply per command, an error
        reply as its exception. By hand rather than through ``pipeline()``: a group commit is one
        call, and redis.asyncio's pipeline machinery costs more than the call itself (~0.2 ms)."""
        sha = self._shas["enqueue"]
        commands: list[tuple[Any, ...]] = [("EVALSHA", sha, len(keys), *keys, *args)
                                           for args in calls()]
        if min_replicas > 0:
            commands.append(("WAIT", min_replicas, wait_ms))
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _command in commands:
            try:
                replies.append(await conn.read_response())
            except redis.ResponseError as exc:  # the connection stays in step: read the next
                replies.append(exc)
        return replies

    async def requeue_failed(self, error: str | None = None,
                             limit: int = 100_000) -> tuple[list[str], tuple[Wake, ...]]:
        if not self.cluster:
            return requeued(await self._run("requeue_failed", self.requeue_failed_keys,
                                            self.requeue_failed_args(error, limit)))
        ids: list[str] = []
        wakes: list[Wake] = []
        for app in sorted(await self.known_apps()):
            scope = self.scope(app)
            more, woken = requeued(await self._run(
                "requeue_failed", [scope.counters, scope.failed],
                self.requeue_failed_args(error, limit - len(ids), scope)))
            ids.extend(more)
            wakes.extend(woken)
            if len(ids) >= limit:
                break
        return ids, tuple(wakes)

    async def statuses(self, ids: Sequence[str]) -> list[Status | None]:
        if not ids:
            return []
        if self.cluster:  # as many slots as apps: one GET each, sent together
            raws = await asyncio.gather(*(self.redis.get(self.of_id(i).record(i)) for i in ids))
        else:
            raws = await self.redis.mget([self.keys.record(i) for i in ids])
        raws = list(raws)
        missing = [k for k, raw in enumerate(raws) if raw is None]
        if missing:  # whole records gone: their summaries (compacted), if any
            replies = await asyncio.gather(*(self._run("lookup", keys, args) for keys, args
                                             in lookup_calls(self, [ids[k] for k in missing])))
            for k, raw in zip(missing, [r for reply in replies for r in reply], strict=True):
                raws[k] = raw or None
        return [None if raw is None else record_to_status(i, json.loads(raw))
                for i, raw in zip(ids, raws, strict=True)]

    async def history(self, query: HistoryQuery) -> list[Status]:
        """``Store.history`` on asyncio."""
        keys, args = history_call(self.scope(query.app), query)
        raw = await self._run("history", keys, args)
        return [record_to_status(i, rec) for i, rec in history_reply(raw, query.limit)]

    async def known_apps(self) -> set[str]:
        return {as_text(a) for a in await self.redis.smembers(self.keys.apps)}


async def _dropped(conn: Any, error: BaseException) -> None:
    """Before a retry of a round trip: the connection it failed on is closed (and reopened)."""
    await conn.disconnect()
