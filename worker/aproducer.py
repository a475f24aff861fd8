"""``AsyncProducer``: the producer API as coroutines, for asyncio applications (SPEC §8).

For services on an event loop (FastAPI, aiohttp, Starlette) that enqueue intents as they serve
requests, such as a bind at login: ``await producer.submit(intent)`` never blocks the loop.
It runs on ``redis.asyncio`` with the same scripts, the same rules and the same errors as
``Producer`` (``worker.bulk`` holds what both do to each intent; ``worker.astore`` sends the
same script calls as ``worker.store``). Concurrent ``submit`` calls from many tasks share one
enqueue call (group commit, ``worker.groupcommit``), each task still getting its own id or error.

Wake-ups go through Celery, whose client is blocking: they are sent from a worker thread, at
most one per batch per linger window, and a broker that cannot take them is not an error.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry

from . import bulk
from .astore import AsyncStore
from .bulk import AppNames, BulkResult, Failure, Prepared
from .connections import async_redis_client
from .embedded import resolve_redis_url
from .errors import IdConflictError, StoreError, StoreUnavailableError
from .events import AsyncEventReader, Event, Gap
from .events_merged import AsyncMergedEventReader
from .groupcommit import AsyncGroupCommit
from .history import history_query
from .intents import validate
from .model import Intent, Status
from .producer import WakeHook, WakeSender, client_options, store_options
from .settings import Settings, redact_url
from .store import Wake

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _guarded(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn the Redis errors of a coroutine method into ``StoreUnavailableError``."""

    @functools.wraps(method)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            producer = args[0]
            assert isinstance(producer, AsyncProducer)
            raise producer.unavailable(exc) from exc

    return guarded


class AsyncProducer:
    """Enqueue intents and read their statuses from asyncio code; ``Producer``'s methods as
    coroutines. Use it from one event loop (``async with AsyncProducer.from_env() as p:``)."""

    def __init__(self, redis_url: str | None = None, prefix: str | None = None, *,
                 settings: Settings | None = None, client: redis.asyncio.Redis | None = None,
                 wake: WakeHook | None = None) -> None:
        self.settings = s = settings or Settings.from_env()
        url = redis_url or resolve_redis_url(s.redis_url, s.data_dir)
        self.redis_url = url
        #: the URL as errors name it: without its password (worked out once, not per call)
        self.shown_url = redact_url(url) or ""
        self.redis = client or async_redis_client(url, **client_options(s, Retry))
        self.store = AsyncStore(self.redis, prefix or s.prefix, **store_options(s))
        self.wake_sender = WakeSender(s, url, self.store.prefix, wake)
        self.app_names = AppNames(s.apps)
        #: concurrent ``submit`` calls share one enqueue call
        self.group: AsyncGroupCommit[tuple[str, Intent], str] = AsyncGroupCommit(self._commit_group)

    @classmethod
    def from_env(cls, **kw: Any) -> AsyncProducer:
        """A producer configured like every command: environment, then ``config/``, then defaults."""
        return cls(settings=Settings.from_env(), **kw)

    def unavailable(self, exc: BaseException, **groups: Any) -> StoreUnavailableError | StoreError:
        """The typed error for a Redis error ``exc``, as ``Producer.unavailable``."""
        return bulk.error_for(self.shown_url, exc, **groups)

    @_guarded
    async def apps(self) -> frozenset[str]:
        """Known app names: configured here, or registered in Redis by running workers."""
        return await self._app_names()

    async def _app_names(self) -> frozenset[str]:
        return self.app_names.fresh() or self.app_names.update(await self.store.known_apps())

    async def validate(self, obj: Any) -> Intent:
        """Check one intent (SPEC §4) without storing it."""
        return validate(obj, await self.apps(), self.settings.default_app)

    async def _send_wakes(self, wakes: Sequence[Wake]) -> None:
        if self.wake_sender.due(wakes):
            await asyncio.to_thread(self.wake_sender, wakes)  # Celery's client blocks

    # -- enqueue -----------------------------------------------------------------------------

    async def submit(self, intent: Any) -> str:
        """Enqueue one intent; returns its id. Raises ``IntentError`` and stores nothing if
        invalid. Concurrent calls share one enqueue call, each with its own answer."""
        result = await self.enqueue_one(intent)
        if result.errors:
            raise result.errors[0]
        return result.ids[0]  # type: ignore[return-value]

    async def enqueue_one(self, intent: Any, *, line: int | None = None) -> BulkResult:
        """``enqueue([intent])`` through the group commit: refusals are reported, not raised
        (``line``: where the intent was read, for the refusal)."""
        prepared = await self._prepare([intent], None if line is None else [line])
        if not prepared.valid:
            return prepared.result
        try:
            await self.group.run(prepared.valid[0])
        except IdConflictError as exc:
            prepared.result.ids[0] = None
            prepared.result.errors[0] = IdConflictError(exc.intent_id, line)
        return prepared.result

    async def _commit_group(self, valid: list[tuple[str, Intent]]) -> list[str | BaseException]:
        prepared = bulk.grouped(valid)
        failure = await self._store(prepared, None)
        return bulk.per_caller(prepared, failure, self.shown_url)

    async def submit_many(self, intents: Iterable[Any], *, strict: bool = False) -> list[str | None]:
        """Enqueue many intents, pipelined. Returns ids in input order, None for refused ones.

        With ``strict=True`` the first invalid intent raises ``IntentError`` and nothing is stored.
        """
        items = bulk.listed(intents)
        if strict:
            apps = await self.apps()
            for obj in items:
                validate(obj, apps, self.settings.default_app)
        return (await self.enqueue(items)).ids

    async def enqueue(self, intents: Iterable[Any], *,
                      line_numbers: Sequence[int] | None = None) -> BulkResult:
        """Validate and store each intent on its own; refused ones are reported, not stored.

        Raises ``StoreUnavailableError`` (``QueueFullError`` for back-pressure) when Redis did
        not take all of them; its ``result`` is this call's ``BulkResult`` so far.
        """
        items = bulk.listed(intents)
        prepared = await self._prepare(items, line_numbers)
        if prepared.valid:
            failure = await self._store(prepared, line_numbers)
            bulk.raise_failure(self.shown_url, failure, prepared.result)
        return prepared.result

    async def _prepare(self, items: Sequence[Any], line_numbers: Sequence[int] | None) -> Prepared:
        apps = self.app_names.fresh()  # most calls: read a moment ago, no coroutine to await
        if apps is None:
            try:
                apps = await self.apps()
            except StoreUnavailableError as exc:  # nothing was sent
                raise bulk.unread(items, exc) from exc.__cause__
        return bulk.prepare(items, apps, self.settings.default_app, line_numbers,
                            app_ids=self.store.cluster)

    async def _store(self, prepared: Prepared, line_numbers: Sequence[int] | None) -> Failure | None:
        """``Producer._store`` on asyncio: each intent's fate in ``prepared``; what went wrong."""
        s = self.settings
        rounds = bulk.Rounds(prepared, line_numbers, s)
        async for rnd in self.store.enqueue_rounds(prepared.valid, max_pending=s.max_pending,
                                                   min_replicas=s.enqueue_min_replicas,
                                                   wait_ms=s.enqueue_wait_ms):
            if rounds.take(rnd):
                break
        await self._send_wakes(rounds.finish())
        return rounds.failure

    @_guarded
    async def requeue_failed(self, error: str | None = None) -> list[str]:
        """Put failed intents (optionally only those that failed with ``error``) back into the
        queue with a fresh retry budget; returns their ids."""
        ids, wakes = await self.store.requeue_failed(error)
        await self._send_wakes(wakes)
        return ids

    # -- status ------------------------------------------------------------------------------

    @_guarded
    async def status(self, intent_id: str) -> Status | None:
        """The status of one intent, or None when the id is unknown."""
        return (await self.store.statuses([intent_id]))[0]

    @_guarded
    async def statuses(self, ids: Sequence[str]) -> list[Status | None]:
        return await self.store.statuses(ids)

    # -- history and events ------------------------------------------------------------------

    @_guarded
    async def history(self, token: str | None = None, *, account: str | None = None,
                      account_type: int | None = None, app: str | None = None,
                      limit: int | None = None) -> list[Status]:
        """``Producer.history`` as a coroutine."""
        query = history_query(token=token, account=account, account_type=account_type, app=app,
                              limit=limit, default_app=self.settings.default_app)
        return await self.store.history(query)

    def events(self, from_id: str = "0", *, follow: bool = False, state: str | None = None,
               app: str | None = None) -> AsyncIterator[Event | Gap]:
        """``Producer.events`` as an async iterator (``async for event in p.events(...)``); on a
        Redis Cluster store, ``app`` names one app's stream, and without it every app's are read
        merged (``worker.events_merged``)."""
        key = self.store.events_key(app)
        reader: AsyncEventReader | AsyncMergedEventReader
        if key is None:
            reader = AsyncMergedEventReader(self.redis, self.store.app_events_key, self._app_names,
                                            from_id, state=state)
        else:
            reader = AsyncEventReader(self.redis, key, from_id, state=state,
                                      app=app if self.store.cluster else None)
        return self._guard_iter(reader.follow(follow=follow))

    async def _guard_iter(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        try:
            async for item in items:
                yield item
        except (redis.RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc

    async def wait(self, ids: Sequence[str], timeout_s: float = 30.0,
                   poll_s: float = 0.05) -> list[Status | None]:
        """Poll until every known id is terminal; raises ``TimeoutError`` past ``timeout_s``.

        Unknown ids come back as None at once (they will never become terminal).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = await self.statuses(ids)
            if bulk.all_terminal(statuses, timeout_s, deadline):
                return statuses
            await asyncio.sleep(poll_s)

    async def aclose(self) -> None:
        """Close the Redis connections (and the broker's, if wakes were sent)."""
        await asyncio.to_thread(self.wake_sender.close)
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
