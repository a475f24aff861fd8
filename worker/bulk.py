"""What an enqueue does to each intent, written once for ``Producer`` and ``AsyncProducer``.

Ids are assigned here before anything is sent, so every intent's fate can be told from the
store's rounds (``worker.store.Round``): stored, refused by the input rules, refused for
back-pressure, never sent, or in doubt (sent, reply lost or replicas not acknowledged). The error
raised when Redis did not take everything is built here too, with the ids grouped by fate
(SPEC §3.7). ``per_caller`` splits one group commit's result into one answer per caller.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from .errors import IdConflictError, IntentError, QueueFullError, StoreError, StoreUnavailableError
from .intents import validate
from .keys import app_id
from .model import Intent, Status
from .settings import Settings
from .store import NOT_WRITTEN, UNKNOWN, Round, Wake, merge_wakes, unavailable

#: seconds a caller refused for back-pressure is told to wait (``Retry-After``)
RETRY_AFTER_S = 5
#: seconds between two readings of the app names the workers registered in Redis
APPS_TTL_S = 10.0


class AppNames:
    """The known app names: configured, or registered in Redis by running workers (read again
    every ``APPS_TTL_S``). One object may serve several producers of a process (``serve``'s
    two doors), so that what one read, the other knows."""

    def __init__(self, configured: Iterable[str]) -> None:
        self.configured = frozenset(configured)
        self._names: frozenset[str] | None = None
        self._read_at = 0.0

    def fresh(self) -> frozenset[str] | None:
        """The names, unless they must be read again (never read, or too old)."""
        if self._names is None or time.monotonic() - self._read_at > APPS_TTL_S:
            return None
        return self._names

    def update(self, registered: Iterable[str]) -> frozenset[str]:
        names = self.configured | frozenset(registered)
        self._names, self._read_at = names, time.monotonic()
        return names


#: ids drawn from the OS's random source at once: ``os.urandom`` releases the GIL, and with
#: many threads submitting, taking the GIL back cost more than the rest of a submit (measured:
#: ~0.2 ms a call under 16 threads); a child process starts with an empty pool (never its parent's)
_ID_POOL: list[str] = []
_IDS_PER_DRAW = 512
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ID_POOL.clear)


def new_id() -> str:
    """A fresh intent id: 20 lowercase hex digits (80 random bits from the OS's CSPRNG);
    URL-safe, and never starting with ``-``, so that a shell or a CLI never reads it as an option."""
    while True:
        try:
            return _ID_POOL.pop()  # atomic: two threads never take the same one
        except IndexError:
            raw = secrets.token_hex(10 * _IDS_PER_DRAW)
            _ID_POOL.extend([raw[k:k + 20] for k in range(0, len(raw), 20)])


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


@dataclass(frozen=True)
class Failure:
    """Why an enqueue stopped short: a Redis error, or a refusal told in words."""

    cause: BaseException | str
    #: the refusal is back-pressure (``queue_full``), not an outage
    full: bool = False


@dataclass
class Prepared:
    """Intents checked and given ids, ready to store: ``valid[j]`` is input item ``positions[j]``."""

    result: BulkResult
    valid: list[tuple[str, Intent]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


def prepare_one(obj: Any, apps: Collection[str], default_app: str, *,
                app_ids: bool = False) -> tuple[str, Intent]:
    """One item checked and given its id (its own, or a new one); ``IntentError`` if invalid.
    With ``app_ids`` (a Redis Cluster store) the id carries its app (``app.<id>``): an explicit
    id is then unique per app, and a lookup by id finds the app's slot."""
    intent = validate(obj, apps, default_app)
    intent_id = intent.id or new_id()
    return (app_id(intent.app, intent_id) if app_ids else intent_id), intent


def prepare(items: Sequence[Any], apps: Collection[str], default_app: str,
            line_numbers: Sequence[int] | None = None, *, app_ids: bool = False) -> Prepared:
    """Each item checked on its own (``prepare_one``), the valid ones ready to store."""
    prepared = Prepared(BulkResult())
    result = prepared.result
    for k, obj in enumerate(items):
        try:
            item = prepare_one(obj, apps, default_app, app_ids=app_ids)
        except IntentError as exc:
            line = line_numbers[k] if line_numbers is not None else None
            result.errors[k] = IntentError(exc.field, exc.rule, line) if line is not None else exc
            result.ids.append(None)
            continue
        prepared.valid.append(item)
        prepared.positions.append(k)
        result.ids.append(item[0])
    return prepared


def unread(items: Sequence[Any], exc: StoreUnavailableError) -> StoreUnavailableError:
    """The error of an enqueue that could not even read the known apps: nothing was sent."""
    result = BulkResult(ids=[None] * len(items),
                        not_stored={k: given_id(obj) for k, obj in enumerate(items)})
    refused = [i for i in result.not_stored.values() if i is not None]
    return StoreUnavailableError(exc.url, exc.cause, result=result, refused=refused)


def apply_round(rnd: Round, prepared: Prepared, line_numbers: Sequence[int] | None,
                min_replicas: int, max_pending: int, wait_ms: int) -> Failure | None:
    """Record one round's outcome in ``prepared.result``; what went wrong, if anything."""
    result, valid, positions = prepared.result, prepared.valid, prepared.positions
    if not rnd.codes:  # no reply: it may have run, unless its connection was never made
        for j in range(rnd.start, rnd.start + rnd.size):
            k, intent_id = positions[j], valid[j][0]
            result.ids[k] = None
            if rnd.sent:
                result.in_doubt[k] = intent_id
            else:
                result.not_stored[k] = intent_id
        return Failure(rnd.error) if rnd.error is not None else None
    full = False
    unreplicated = rnd.replicas is not None and rnd.replicas < min_replicas
    for j, code in enumerate(rnd.codes, start=rnd.start):
        if code in (0, 1) and not unreplicated:
            continue  # the common case first: stored
        k, intent_id = positions[j], valid[j][0]
        result.ids[k] = None
        if code == -1:
            line = line_numbers[k] if line_numbers is not None else None
            result.errors[k] = IdConflictError(intent_id, line)
        elif code in (-2, NOT_WRITTEN):
            full = full or code == -2
            result.not_stored[k] = intent_id
        elif code == UNKNOWN or unreplicated:
            result.in_doubt[k] = intent_id
    if rnd.error is not None:
        return Failure(rnd.error, full)
    if unreplicated:
        return Failure(f"WAIT: {rnd.replicas} of {min_replicas} replicas acknowledged within "
                       f"{wait_ms} ms (the intents are stored on the primary)", full)
    if full:
        return Failure(f"TPNS_MAX_PENDING ({max_pending}) pending intents reached", True)
    return None


def unsent(prepared: Prepared, done: int) -> None:
    """Intents ``done`` onwards were never sent: not stored, safe to send again."""
    for j in range(done, len(prepared.valid)):
        k = prepared.positions[j]
        prepared.result.ids[k] = None
        prepared.result.not_stored[k] = prepared.valid[j][0]


def grouped(valid: list[tuple[str, Intent]]) -> Prepared:
    """The items of concurrent ``submit`` calls (one group commit), as one enqueue to store."""
    return Prepared(BulkResult(ids=[i for i, _ in valid]), valid, list(range(len(valid))))


def listed(intents: Iterable[Any]) -> list[Any]:
    """The intents of an enqueue as a list; ``IntentError`` if they are not an iterable."""
    try:
        return list(intents)
    except TypeError:
        raise IntentError("intents", "must be an iterable of intents") from None


class Rounds:
    """What the rounds of one enqueue did, round by round: the loop over the store's rounds is
    the one part the blocking and asyncio producers cannot share (``for`` / ``async for``)."""

    def __init__(self, prepared: Prepared, line_numbers: Sequence[int] | None,
                 settings: Settings) -> None:
        self.prepared = prepared
        self.line_numbers = line_numbers
        self.settings = settings
        self.failure: Failure | None = None
        self.done = 0
        self.wakes: list[Wake] = []

    def take(self, rnd: Round) -> bool:
        """Record one round's outcome; True when the enqueue must stop (something went wrong)."""
        s = self.settings
        self.done = rnd.start + rnd.size
        self.wakes.extend(rnd.wakes)
        self.failure = apply_round(rnd, self.prepared, self.line_numbers, s.enqueue_min_replicas,
                                   s.max_pending, s.enqueue_wait_ms)
        return self.failure is not None

    def finish(self) -> tuple[Wake, ...]:
        """Mark what was never sent; the wakes of what was stored, merged (to send now)."""
        unsent(self.prepared, self.done)
        return merge_wakes(self.wakes)


def raise_failure(url: str, failure: Failure | None, result: BulkResult) -> None:
    """Raise the one error of an enqueue that went wrong (``failure_error``), if it did."""
    if failure is not None:
        cause = failure.cause if isinstance(failure.cause, BaseException) else None
        raise failure_error(url, failure, result) from cause


def all_terminal(statuses: Sequence[Status | None], timeout_s: float, deadline: float) -> bool:
    """One poll of ``wait``: whether every known intent is terminal; ``TimeoutError`` once
    ``deadline`` (monotonic) has passed with some not."""
    if all(st is None or st.terminal for st in statuses):
        return True
    if time.monotonic() >= deadline:
        pending = sum(1 for st in statuses if st is not None and not st.terminal)
        raise TimeoutError(f"{pending} of {len(statuses)} intents not terminal after "
                           f"{timeout_s:g} s")
    return False


def error_for(url: str, exc: BaseException, **groups: Any) -> StoreUnavailableError | StoreError:
    """The typed error for a Redis error ``exc`` (``groups``: stored, refused, in_doubt, result);
    ``url`` is already without its password."""
    cause = f"{type(exc).__name__}: {exc}".strip()
    if is_oom(exc):
        return QueueFullError(url, f"Redis answered OOM: out of memory (maxmemory) ({cause})",
                              retry_after_s=RETRY_AFTER_S, **groups)
    if unavailable(exc):  # the one rule of what an outage is (store.unavailable)
        return StoreUnavailableError(url, cause, **groups)
    # an answer no script expects (a wrong type under the prefix, an ACL refusal): not an
    # outage, but still no redis-py exception for the caller
    return StoreError(f"Redis at {url} answered: {cause}")


def failure_error(url: str, failure: Failure, result: BulkResult) -> StoreUnavailableError | StoreError:
    """The one error an enqueue raises for ``failure``, naming every id of ``result`` by fate."""
    groups: dict[str, Any] = {
        "stored": result.accepted, "in_doubt": list(result.in_doubt.values()),
        "refused": [i for i in result.not_stored.values() if i is not None], "result": result}
    if isinstance(failure.cause, BaseException):
        return error_for(url, failure.cause, **groups)
    if failure.full:
        return QueueFullError(url, failure.cause, retry_after_s=RETRY_AFTER_S, **groups)
    return StoreUnavailableError(url, failure.cause, **groups)


def per_caller(prepared: Prepared, failure: Failure | None,
               url: str) -> list[str | BaseException]:
    """One answer per valid intent of a group commit (each from its own caller): its id, or the
    error that caller alone would have had — naming only its own id."""
    result = prepared.result
    answers: list[str | BaseException] = []
    for j, (intent_id, _intent) in enumerate(prepared.valid):
        k = prepared.positions[j]
        if k in result.errors:
            answers.append(result.errors[k])
        elif result.ids[k] is not None:
            answers.append(intent_id)
        else:
            own = BulkResult(ids=[None])
            if k in result.in_doubt:
                own.in_doubt[0] = intent_id
            else:
                own.not_stored[0] = intent_id
            answers.append(failure_error(url, failure or Failure("not stored"), own))
    return answers


def given_id(obj: Any) -> str | None:
    """The ``id`` an unread intent carries, if it is a plain string (for error reports only)."""
    intent_id = dict.get(obj, "id") if isinstance(obj, dict) else None
    return intent_id if isinstance(intent_id, str) else None


def is_oom(exc: BaseException) -> bool:
    """Redis refused a write for its ``maxmemory`` (Redis 7 keeps the ``OOM`` code through a
    script's error; 6.2 wraps it in the script's ``ERR``)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))
