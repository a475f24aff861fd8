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
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .connections import redis_client
from .embedded import resolve_redis_url
from .errors import IdConflictError, IntentError, QueueFullError, StoreError, StoreUnavailableError
from .intents import validate
from .model import Intent, Status
from .settings import Settings, redact_url
from .store import NOT_WRITTEN, UNKNOWN, Round, Store, Wake, merge_wakes, unavailable

logger = logging.getLogger(__name__)

WakeHook = Callable[[Sequence[Wake]], None]
P = ParamSpec("P")
R = TypeVar("R")

#: seconds to open a connection to Redis; a producer must answer, not hang, when Redis is away
CONNECT_TIMEOUT_S = 2.0
#: seconds to wait for a reply (plus ``TPNS_ENQUEUE_WAIT_MS`` when enqueues wait for replicas)
REPLY_TIMEOUT_S = 10.0
#: redis-py retries of a command whose connection failed: a few, within about a second. Re-sending
#: an enqueue whose reply was lost is safe: ids are assigned here and enqueue.lua is idempotent by id
RETRIES = 3
#: after a wake-up could not be sent, wakes are skipped for this long (the sweep sends them)
WAKE_PAUSE_S = 5.0


def new_id() -> str:
    """A fresh intent id: 20 lowercase hex digits (80 random bits); URL-safe, and never starting
    with ``-``, so that a shell or a CLI never reads it as an option."""
    return secrets.token_hex(10)


@dataclass
class BulkResult:
    """What a bulk enqueue did: ids in input order (None where not stored) and the refusals.

    ``in_doubt`` and ``not_stored`` are filled only when the enqueue raised
    ``StoreUnavailableError`` (whose ``result`` this is).
    """

    ids: list[str | None] = field(default_factory=list)
    #: input index -> why it was refused (the input rules, or an id stored with another payload)
    errors: dict[int, IntentError] = field(default_factory=dict)
    #: input index -> id: sent, but not acknowledged (the reply was lost, or replicas did not ack)
    in_doubt: dict[int, str] = field(default_factory=dict)
    #: input index -> id (None if the intent was not even read): not stored, safe to send again
    not_stored: dict[int, str | None] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        return [i for i in self.ids if i is not None]


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
        self.settings = settings or Settings.from_env()
        url = redis_url or resolve_redis_url(self.settings.redis_url, self.settings.data_dir)
        self.redis_url = url
        s = self.settings
        self.redis = client or redis_client(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=REPLY_TIMEOUT_S + (s.enqueue_wait_ms / 1000 if s.enqueue_min_replicas else 0),
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), RETRIES))
        self.store = Store(self.redis, prefix or s.prefix,
                           max_items=s.max_items_per_call, linger_ms=s.linger_ms,
                           lease_s=s.lease_s, status_ttl_s=s.status_ttl_s)
        self._wake = wake
        self._apps: frozenset[str] | None = None
        self._apps_read = 0.0
        #: monotonic time before which no wake is attempted (the broker failed just now)
        self._wakes_paused_until = 0.0
        self._wake_lock = threading.Lock()

    @classmethod
    def from_env(cls, **kw: Any) -> Producer:
        """A producer configured like every command: environment, then ``config/``, then defaults."""
        return cls(settings=Settings.from_env(), **kw)

    # -- apps and wakes ----------------------------------------------------------------------

    @_guarded
    def apps(self) -> frozenset[str]:
        """Known app names: configured here, or registered in Redis by running workers."""
        if self._apps is None or time.monotonic() - self._apps_read > 10:
            self._apps = frozenset(self.settings.apps) | frozenset(self.store.known_apps())
            self._apps_read = time.monotonic()
        return self._apps

    def unavailable(self, exc: BaseException, **groups: Any) -> StoreUnavailableError | StoreError:
        """The typed error for a Redis error ``exc`` (``groups``: stored, refused, in_doubt,
        result). The message names the URL without its password."""
        url = redact_url(self.redis_url) or ""
        cause = f"{type(exc).__name__}: {exc}".strip()
        if _is_oom(exc):
            return QueueFullError(url, f"Redis answered OOM: out of memory (maxmemory) ({cause})",
                                  retry_after_s=5, **groups)
        if unavailable(exc):  # the one rule of what an outage is (store.unavailable)
            return StoreUnavailableError(url, cause, **groups)
        # an answer no script expects (a wrong type under the prefix, an ACL refusal): not an
        # outage, but still no redis-py exception for the caller
        return StoreError(f"Redis at {url} answered: {cause}")

    def _send_wakes(self, wakes: Sequence[Wake]) -> None:
        """Send wake-ups; a broker that cannot take them is logged once, not raised: the intents
        are stored, and the workers' sweep wakes their queues once the broker is back."""
        if not wakes or time.monotonic() < self._wakes_paused_until:
            return
        if self._wake is None:
            from .wakeup import CeleryWaker

            self._wake = CeleryWaker(self.settings, self.redis_url, self.store.prefix)
        try:
            self._wake(wakes)
        except Exception as exc:  # kombu and the transports raise many types; none may escape
            with self._wake_lock:
                first = self._wakes_paused_until == 0.0
                self._wakes_paused_until = time.monotonic() + WAKE_PAUSE_S
            if first:
                logger.warning("wake-ups not sent: the broker is unreachable (%s); the intents are "
                               "stored and the workers' sweep wakes their queues once it is back",
                               type(exc).__name__)
            return
        if self._wakes_paused_until:
            with self._wake_lock:
                self._wakes_paused_until = 0.0
            logger.info("wake-ups sent again: the broker is reachable")

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
        try:
            items = list(intents)
        except TypeError:
            raise IntentError("intents", "must be an iterable of intents") from None
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
        try:
            items = list(intents)
        except TypeError:
            raise IntentError("intents", "must be an iterable of intents") from None
        result = BulkResult()
        try:
            apps = self.apps()
        except StoreUnavailableError as exc:  # nothing was sent
            result.ids = [None] * len(items)
            result.not_stored = {k: _given_id(obj) for k, obj in enumerate(items)}
            raise StoreUnavailableError(exc.url, exc.cause, result=result, refused=[
                i for i in result.not_stored.values() if i is not None]) from exc.__cause__
        valid: list[tuple[str, Intent]] = []
        positions: list[int] = []
        for k, obj in enumerate(items):
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
            self._store(valid, positions, result, line_numbers)
        return result

    def _store(self, valid: Sequence[tuple[str, Intent]], positions: Sequence[int],
               result: BulkResult, line_numbers: Sequence[int] | None) -> None:
        """Store the valid intents round by round; raise what went wrong, if anything, once the
        wakes of what was stored are sent."""
        s = self.settings
        failure: BaseException | str | None = None
        full = False
        done = 0
        wakes: list[Wake] = []
        for rnd in self.store.enqueue_rounds(valid, max_pending=s.max_pending,
                                             min_replicas=s.enqueue_min_replicas,
                                             wait_ms=s.enqueue_wait_ms):
            done = rnd.start + rnd.size
            wakes.extend(rnd.wakes)
            failure, full = self._apply_round(rnd, valid, positions, result, line_numbers)
            if failure is not None:
                break
        for j in range(done, len(valid)):  # never sent
            result.ids[positions[j]] = None
            result.not_stored[positions[j]] = valid[j][0]
        self._send_wakes(merge_wakes(wakes))
        if failure is None:
            return
        groups: dict[str, Any] = {
            "stored": result.accepted, "in_doubt": list(result.in_doubt.values()),
            "refused": [i for i in result.not_stored.values() if i is not None], "result": result}
        if isinstance(failure, BaseException):
            raise self.unavailable(failure, **groups) from failure
        url = redact_url(self.redis_url) or ""
        if full:
            raise QueueFullError(url, failure, retry_after_s=5, **groups)
        raise StoreUnavailableError(url, failure, **groups)

    def _apply_round(self, rnd: Round, valid: Sequence[tuple[str, Intent]],
                     positions: Sequence[int], result: BulkResult,
                     line_numbers: Sequence[int] | None) -> tuple[BaseException | str | None, bool]:
        """Record one round's outcome in ``result``; (what went wrong or None, queue_full?)."""
        s = self.settings
        if not rnd.codes:  # no reply: it may have run, unless its connection was never made
            for j in range(rnd.start, rnd.start + rnd.size):
                k, intent_id = positions[j], valid[j][0]
                result.ids[k] = None
                if rnd.sent:
                    result.in_doubt[k] = intent_id
                else:
                    result.not_stored[k] = intent_id
            return rnd.error, False
        full = False
        unreplicated = rnd.replicas is not None and rnd.replicas < s.enqueue_min_replicas
        for j, code in enumerate(rnd.codes, start=rnd.start):
            k, intent_id = positions[j], valid[j][0]
            if code == -1:
                line = line_numbers[k] if line_numbers is not None else None
                result.errors[k] = IdConflictError(intent_id, line)
                result.ids[k] = None
            elif code in (-2, NOT_WRITTEN):
                full = full or code == -2
                result.ids[k] = None
                result.not_stored[k] = intent_id
            elif code == UNKNOWN or unreplicated:
                result.ids[k] = None
                result.in_doubt[k] = intent_id
        if rnd.error is not None:
            return rnd.error, full
        if unreplicated:
            return (f"WAIT: {rnd.replicas} of {s.enqueue_min_replicas} replicas acknowledged within "
                    f"{s.enqueue_wait_ms} ms (the intents are stored on the primary)"), full
        if full:
            return f"TPNS_MAX_PENDING ({s.max_pending}) pending intents reached", True
        return None, False

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

    @_guarded
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

    @_guarded
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


def _given_id(obj: Any) -> str | None:
    """The ``id`` an unread intent carries, if it is a plain string (for error reports only)."""
    intent_id = dict.get(obj, "id") if isinstance(obj, dict) else None
    return intent_id if isinstance(intent_id, str) else None


def _is_oom(exc: BaseException) -> bool:
    """Redis refused a write for its ``maxmemory`` (Redis 7 keeps the ``OOM`` code through a
    script's error; 6.2 wraps it in the script's ``ERR``)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))

