"""The producer API: ``from worker import Producer`` (SPEC §8).

A producer validates each intent, writes it to Redis in one atomic step per chunk, and only *signals*
that flushing is due: at most one immediate wake per full batch and one delayed wake per linger
window, however many intents it enqueues. It needs no TPNS secrets.

When Redis cannot answer, every method raises one ``StoreUnavailableError`` (``QueueFullError``
for back-pressure), never a redis-py exception: ids are assigned here before sending, so an
enqueue reports which intents Redis stored, which it did not, and which are in doubt (SPEC §3.7).
A broker that cannot take a wake-up is not an error: the intents are stored, and the workers'
sweep wakes their queues once the broker is back.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from . import bulk
from .bulk import AppNames, BulkResult, Failure, Prepared, new_id
from .connections import redis_client
from .embedded import resolve_redis_url
from .errors import StoreError, StoreUnavailableError
from .events import Event, EventReader, Gap, parse_from
from .events_merged import MergedEventReader
from .groupcommit import GroupCommit
from .history import history_query
from .intents import validate
from .model import Intent, Status
from .settings import Settings, redact_url
from .store import Store, Wake
from .webhook_state import store_figures

logger = logging.getLogger(__name__)

__all__ = ["BulkResult", "Producer", "new_id"]

WakeHook = Callable[[Sequence[Wake]], None]
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: seconds to open a connection to Redis; a producer must answer, not hang, when Redis is away
CONNECT_TIMEOUT_S = 2.0
#: seconds to wait for a reply (plus ``TPNS_ENQUEUE_WAIT_MS`` when enqueues wait for replicas)
REPLY_TIMEOUT_S = 10.0
#: redis-py retries of a command whose connection failed: a few, within about a second. Re-sending
#: an enqueue whose reply was lost is safe: ids are assigned here and enqueue.lua is idempotent by id
RETRIES = 3
#: after a wake-up could not be sent, wakes are skipped for this long (the sweep sends them)
WAKE_PAUSE_S = 5.0
#: ``submit``'s group commits in flight at once: while one waits for Redis, the callers it does
#: not carry prepare the next one, so the Python work and Redis's overlap
DEPTH = 2


class WakeSender:
    """Sends wake-ups through ``hook`` (Celery's, made when first needed). A broker that cannot
    take them is logged once, not raised: the intents are stored, and the workers' sweep wakes
    their queues once the broker is back. Wakes are then skipped for ``WAKE_PAUSE_S``."""

    def __init__(self, settings: Settings, redis_url: str, prefix: str,
                 hook: WakeHook | None = None) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.prefix = prefix
        self.hook = hook
        #: monotonic time before which no wake is attempted (the broker failed just now)
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def due(self, wakes: Sequence[Wake]) -> bool:
        """Whether there is anything to send now."""
        return bool(wakes) and time.monotonic() >= self._paused_until

    def __call__(self, wakes: Sequence[Wake]) -> None:
        if not self.due(wakes):
            return
        if self.hook is None:
            from .wakeup import CeleryWaker

            self.hook = CeleryWaker(self.settings, self.redis_url, self.prefix)
        try:
            self.hook(wakes)
        except Exception as exc:  # kombu and the transports raise many types; none may escape
            with self._lock:
                first = self._paused_until == 0.0
                self._paused_until = time.monotonic() + WAKE_PAUSE_S
            if first:
                logger.warning("wake-ups not sent: the broker is unreachable (%s); the intents are "
                               "stored and the workers' sweep wakes their queues once it is back",
                               type(exc).__name__)
            return
        if self._paused_until:
            with self._lock:
                self._paused_until = 0.0
            logger.info("wake-ups sent again: the broker is reachable")

    def close(self) -> None:
        closer = getattr(self.hook, "close", None)
        if callable(closer):
            closer()


def client_options(settings: Settings, retry_class: Any) -> dict[str, Any]:
    """The Redis client options of both producers (``retry_class``: redis-py's ``Retry``, or
    its asyncio twin): answer rather than hang when Redis is away, retry a failed connection."""
    s = settings
    return {"socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": REPLY_TIMEOUT_S + (s.enqueue_wait_ms / 1000
                                                 if s.enqueue_min_replicas else 0),
            "retry": retry_class(ExponentialWithJitterBackoff(base=0.05, cap=0.5), RETRIES)}


def store_options(settings: Settings) -> dict[str, Any]:
    """The store options both producers take from the settings."""
    s = settings
    return {"max_items": s.max_items_per_call, "linger_ms": s.linger_ms, "lease_s": s.lease_s,
            "status_ttl_s": s.status_ttl_s, "status_detail_s": s.status_detail_s}


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Turn the Redis errors of a producer method into ``StoreUnavailableError``."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            producer = args[0]
            assert isinstance(producer, Producer)
            raise producer.unavailable(exc) from exc

    return guarded


class Producer:
    """Enqueue intents and read their statuses."""

    def __init__(self, redis_url: str | None = None, prefix: str | None = None, *,
                 settings: Settings | None = None, client: redis.Redis | None = None,
                 wake: WakeHook | None = None) -> None:
        self.settings = s = settings or Settings.from_env()
        url = redis_url or resolve_redis_url(s.redis_url, s.data_dir)
        self.redis_url = url
        #: the URL as errors name it: without its password (worked out once, not per call)
        self.shown_url = redact_url(url) or ""
        self.redis = client or redis_client(url, **client_options(s, Retry))
        self.store = Store(self.redis, prefix or s.prefix, **store_options(s),
                           events_maxlen=s.events_maxlen)
        self.wake_sender = WakeSender(s, url, self.store.prefix, wake)
        self.app_names = AppNames(s.apps)
        #: concurrent ``submit`` calls share one enqueue call (``worker.groupcommit``)
        self.group: GroupCommit[tuple[str, Intent], str] = GroupCommit(self._commit_group, depth=DEPTH)

    @classmethod
    def from_env(cls, **kw: Any) -> Producer:
        """A producer configured like every command: environment, then ``config/``, then defaults."""
        return cls(settings=Settings.from_env(), **kw)

    # -- apps and wakes ----------------------------------------------------------------------

    @_guarded
    def apps(self) -> frozenset[str]:
        """Known app names: configured here, or registered in Redis by running workers."""
        return self._app_names()

    def _app_names(self) -> frozenset[str]:
        return self.app_names.fresh() or self.app_names.update(self.store.known_apps())

    def unavailable(self, exc: BaseException, **groups: Any) -> StoreUnavailableError | StoreError:
        """The typed error for a Redis error ``exc`` (``groups``: stored, refused, in_doubt,
        result). The message names the URL without its password."""
        return bulk.error_for(self.shown_url, exc, **groups)

    def _send_wakes(self, wakes: Sequence[Wake]) -> None:
        self.wake_sender(wakes)

    # -- enqueue -----------------------------------------------------------------------------

    def validate(self, obj: Any) -> Intent:
        """Check one intent (SPEC §4) without storing it."""
        return validate(obj, self.apps(), self.settings.default_app)

    def submit(self, intent: Any) -> str:
        """Enqueue one intent; returns its id. Raises ``IntentError`` and stores nothing if invalid.

        Concurrent calls from many threads are stored together, up to two enqueue calls in
        flight, each carrying the intents queued meanwhile (group commit); each caller still
        gets its own id or its own error.
        """
        return self.group.run(lambda: self._prepare_one(intent))

    def _prepare_one(self, intent: Any) -> tuple[str, Intent]:
        try:
            apps = self.apps()
        except StoreUnavailableError as exc:  # nothing was sent
            raise bulk.unread([intent], exc) from exc.__cause__
        return bulk.prepare_one(intent, apps, self.settings.default_app,
                                app_ids=self.store.cluster)

    def _commit_group(self, valid: list[tuple[str, Intent]]) -> list[str | BaseException]:
        """Store the items of concurrent ``submit`` calls at once; each caller's answer."""
        prepared = bulk.grouped(valid)
        failure = self._store(prepared, None)
        return bulk.per_caller(prepared, failure, self.shown_url)

    def submit_many(self, intents: Iterable[Any], *, strict: bool = False) -> list[str | None]:
        """Enqueue many intents, pipelined. Returns ids in input order, None for refused ones.

        With ``strict=True`` the first invalid intent raises ``IntentError`` and nothing is stored.
        """
        items = bulk.listed(intents)
        if strict:
            for obj in items:
                self.validate(obj)
        return self.enqueue(items).ids

    def enqueue(self, intents: Iterable[Any], *, first_line: int | None = None,
                line_numbers: Sequence[int] | None = None) -> BulkResult:
        """Validate and store each intent on its own; refused ones are reported, not stored.

        Raises ``StoreUnavailableError`` (``QueueFullError`` for back-pressure) when Redis did
        not take all of them; its ``result`` is this call's ``BulkResult`` so far.
        """
        items = bulk.listed(intents)
        prepared = self._prepare(items, line_numbers)
        if prepared.valid:
            failure = self._store(prepared, line_numbers)
            bulk.raise_failure(self.shown_url, failure, prepared.result)
        return prepared.result

    def _prepare(self, items: Sequence[Any], line_numbers: Sequence[int] | None) -> Prepared:
        """Check the items and give ids; ``StoreUnavailableError`` if the apps cannot be read."""
        try:
            apps = self.apps()
        except StoreUnavailableError as exc:  # nothing was sent
            raise bulk.unread(items, exc) from exc.__cause__
        return bulk.prepare(items, apps, self.settings.default_app, line_numbers,
                            app_ids=self.store.cluster)

    def _store(self, prepared: Prepared, line_numbers: Sequence[int] | None) -> Failure | None:
        """Store the valid intents round by round, recording each one's fate; once the wakes of
        what was stored are sent, what went wrong (None: everything was stored)."""
        s = self.settings
        rounds = bulk.Rounds(prepared, line_numbers, s)
        for rnd in self.store.enqueue_rounds(prepared.valid, max_pending=s.max_pending,
                                             min_replicas=s.enqueue_min_replicas,
                                             wait_ms=s.enqueue_wait_ms):
            if rounds.take(rnd):
                break
        self._send_wakes(rounds.finish())
        return rounds.failure

    @_guarded
    def requeue_failed(self, error: str | None = None) -> list[str]:
        """Put failed intents (optionally only those that failed with ``error``) back into the
        queue with a fresh retry budget; returns their ids."""
        ids, wakes = self.store.requeue_failed(error)
        self._send_wakes(wakes)
        return ids

    # -- status ------------------------------------------------------------------------------

    @_guarded
    def status(self, intent_id: str) -> Status | None:
        """The status of one intent, or None when the id is unknown."""
        return self.store.status(intent_id)

    @_guarded
    def statuses(self, ids: Sequence[str]) -> list[Status | None]:
        return self.store.statuses(ids)

    def wait(self, ids: Sequence[str], timeout_s: float = 30.0,
             poll_s: float = 0.05) -> list[Status | None]:
        """Poll until every known id is terminal; raises ``TimeoutError`` past ``timeout_s``.

        Unknown ids come back as None at once (they will never become terminal).
        """
        # not guarded as a whole: TimeoutError is an OSError, and would pass for an outage
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.statuses(ids)
            if bulk.all_terminal(statuses, timeout_s, deadline):
                return statuses
            time.sleep(poll_s)

    @_guarded
    def stats(self) -> dict[str, Any]:
        apps = self.apps()
        figures = self.store.stats(apps)
        # None until a worker with TPNS_WEBHOOK_URL has delivered under this prefix
        figures["webhook"] = store_figures(self.store, apps)
        return figures

    # -- history and events ------------------------------------------------------------------

    @_guarded
    def history(self, token: str | None = None, *, account: str | None = None,
                account_type: int | None = None, app: str | None = None,
                limit: int | None = None) -> list[Status]:
        """The latest intents that named ``token``, or ``account`` with its ``account_type``
        (default 0), in ``app`` (default: the default app), newest first, with their statuses;
        at most ``limit`` (default 50, at most 500). Bad parameters raise ``IntentError``."""
        query = history_query(token=token, account=account, account_type=account_type, app=app,
                              limit=limit, default_app=self.settings.default_app)
        return self.store.history(query)

    def events(self, from_id: str = "0", *, follow: bool = False,
               state: str | None = None, app: str | None = None) -> Iterator[Event | Gap]:
        """The events stream (SPEC §8) from ``from_id`` (``0``: all kept, ``$``: only new ones,
        or a stream id to resume after): ``Event``s, and a ``Gap`` where entries were trimmed
        before they were read. With ``follow``, waits for new ones until the caller stops.
        Bad parameters raise ``IntentError`` at once. On a Redis Cluster store each app has its
        own stream: ``app`` names one, and without it every app's are read merged in time order
        (``worker.events_merged``): each item's ``cursor`` is then the point to resume from."""
        return self._guard_iter(self.event_reader(from_id, state=state, app=app)
                                .follow(follow=follow))

    def event_reader(self, from_id: str = "0", *, state: str | None = None,
                     app: str | None = None,
                     name: str = "from") -> EventReader | MergedEventReader:
        """The reader ``events`` iterates (``serve``'s SSE reads it step by step); ``name``
        is the field a bad ``from_id`` is reported under."""
        key = self.store.events_key(app)
        if key is None:
            return MergedEventReader(self.redis, self.store.app_events_key, self._app_names, from_id,
                                     state=state, name=name)
        return EventReader(self.redis, key, parse_from(from_id, name), state=state,
                           app=app if self.store.cluster else None)

    def _guard_iter(self, items: Iterator[T]) -> Iterator[T]:
        try:
            yield from items
        except (redis.RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc

    def close(self) -> None:
        """Close the Redis connections (and the broker's, if wakes were sent)."""
        self.wake_sender.close()
        self.redis.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
