"""Webhooks (SPEC §8): the events stream POSTed to ``TPNS_WEBHOOK_URL``, in order, at least once.

Every worker's main process runs a ``Deliverer`` in a thread of its own (never in the pool: the
flushes that call TPNS run in other processes and never wait on it, so a slow or dead webhook
cannot slow them). Only the holder of the lease delivers (``worker.webhook_state``): one reader,
one cursor, so the receiver sees the stream's order, which a consumer group would not keep.

The leader reads the stream after the cursor with ``worker.events.EventReader`` (its gap logic:
entries trimmed before delivery arrive as one ``{"event": "gap", ...}`` item, never a silent
skip) and POSTs JSON arrays of at most ``MAX_EVENTS`` items, as soon as that many are ready or
``DELAY_S`` after the first unsent one was read. Each body is signed:
``X-Tpns-Signature: sha256=<hex HMAC-SHA256(TPNS_WEBHOOK_SECRET, body)>``. Any non-2xx answer,
timeout or connection error is retried with jittered exponential backoff (each attempt bounded
by ``TIMEOUT_S``), for as long as this worker holds the lease; the cursor moves only after a 2xx.
A leader that dies, or stalls past its lease, leaves the rest to the next one from the cursor:
what it had posted without moving the cursor is posted again (at least once, never lost).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import redis
import requests
from redis.cluster import RedisCluster
from tenacity import Retrying, retry_if_exception_type, wait_random_exponential
from tenacity.stop import stop_base

from .connections import redis_client
from .errors import WebhookError
from .events import BLOCK_MS, Event, EventReader, Gap, as_replies
from .keys import WEBHOOK_RENEW_S, Keys
from .settings import Settings, shown_webhook_url
from .webhook_state import WebhookState

logger = logging.getLogger(__name__)

#: events (and gaps) per POST at most
MAX_EVENTS = 100
#: a POST leaves at most this long after its first event was read
DELAY_S = 1.0
#: one attempt's bound (connect and each read)
TIMEOUT_S = 10.0
#: backoff between attempts: jittered, doubling from BACKOFF_BASE_S up to BACKOFF_MAX_S
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
#: how often a follower asks for the lease
ACQUIRE_EVERY_S = 1.0
SIGNATURE_HEADER = "X-Tpns-Signature"
#: while a receiver keeps failing, a warning this often (the lag shows in stats and health)
FAILURE_LOG_EVERY_S = 60.0

#: ``post(url, body, headers, timeout_s) -> HTTP status``; raises ``requests.RequestException``
Transport = Callable[[str, bytes, Mapping[str, str], float], int]


def signature(secret: str, body: bytes) -> str:
    """The ``X-Tpns-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def requests_transport() -> Transport:
    """A transport on one ``requests`` session (kept-alive connections to the receiver)."""
    session = requests.Session()

    def post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
        with session.post(url, data=body, headers=dict(headers), allow_redirects=False,
                          timeout=(min(timeout_s, 5.0), timeout_s)) as response:
            return int(response.status_code)

    return post


@dataclass
class _Pending:
    item: Event | Gap
    #: entries ever added to the stream up to this item (None where Redis cannot say)
    ordinal: int | None
    read_at: float


class _OrdinalReader(EventReader):
    """``EventReader`` that also numbers what it hands out (for the lag, see webhook_state)."""

    def __init__(self, client: redis.Redis, key: str, from_id: str, ordinal: int | None,
                 count: int, app: str | None = None) -> None:
        super().__init__(client, key, from_id, count=count, app=app)
        self.ordinal = ordinal
        self.ordinals: list[int | None] = []

    def _take(self, info: Any, entries: Any) -> list[Event | Gap]:
        items = super()._take(info, entries)
        info, _ = as_replies(info, [])
        added = None if isinstance(info, Exception) else info.get("entries-added")
        length = 0 if isinstance(info, Exception) else int(info.get("length") or 0)
        self.ordinals = []
        for item in items:
            if isinstance(item, Gap):  # what is left starts right after what was trimmed
                self.ordinal = int(added) - length if added is not None else None
            elif self.ordinal is not None:
                self.ordinal += 1
            self.ordinals.append(self.ordinal)
        return items


class _StopWhen(stop_base):
    """Stop retrying when ``done()`` says so (this worker stops or lost the lease)."""

    def __init__(self, done: Callable[[], bool]) -> None:
        self.done = done

    def __call__(self, retry_state: Any) -> bool:
        return self.done()


class Deliverer:
    """Delivers the events to one URL while this process holds the lease (module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, url: str, secret: str, *,
                 name: str | None = None, transport: Transport | None = None,
                 max_events: int = MAX_EVENTS, delay_s: float = DELAY_S,
                 timeout_s: float = TIMEOUT_S, backoff_max_s: float = BACKOFF_MAX_S,
                 lease_ms: int | None = None, renew_s: float = WEBHOOK_RENEW_S,
                 app: str | None = None) -> None:
        self.client = client
        self.keys = keys
        #: on a Redis Cluster store, the app whose stream this delivers (named on its gaps)
        self.app = app
        self.url = url
        self._secret = secret
        self.state = (WebhookState(client, keys, name=name) if lease_ms is None
                      else WebhookState(client, keys, name=name, lease_ms=lease_ms))
        self.transport = transport or requests_transport()
        self.max_events = max_events
        self.delay_s = delay_s
        self.timeout_s = timeout_s
        self.backoff_max_s = backoff_max_s
        self.renew_s = renew_s
        self._stop = threading.Event()
        self._leading = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing = 0
        self._warned_at = 0.0
        self._down = False
        self._agent = f"tpns-batcher/{_version()}"

    # -- threads -------------------------------------------------------------------------------

    def start(self) -> Deliverer:
        """The delivery thread and the lease keeper (daemon threads of this process)."""
        for target, name in ((self._run, "tpns-webhook"), (self._keep, "tpns-webhook-lease")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop delivering and give the lease up (a POST in flight is left to its timeout)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        if self._leading.is_set():  # still in a POST: give the lease up without it (fenced)
            try:
                self.state.release()
            except (redis.RedisError, OSError):
                pass  # it expires on its own

    def _keep(self) -> None:
        # renewals run apart from delivery, so a POST that takes longer than the lease does not
        # hand delivery to another worker while this one is still sending
        while not self._stop.wait(self.renew_s):
            if self._leading.is_set():
                try:
                    self.state.renew()
                except (redis.RedisError, OSError):
                    pass  # not renewed: ``held`` runs out on its own clock

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.state.acquire():
                    self._leading.set()
                    logger.info("webhook: this worker delivers the events of %s to %s",
                                self.keys.events, shown_webhook_url(self.url))
                    self._lead()
                    if self._stop.is_set():  # a clean stop: the next leader need not wait
                        self.state.release()
                self._down = False
            except (redis.RedisError, OSError) as exc:
                if not self._down:  # once per outage; the watchdog reports the outage itself
                    logger.warning("webhook: Redis unavailable (%s); delivery waits for it",
                                   type(exc).__name__)
                self._down = True
            except Exception:  # the thread must outlive any surprise of its own
                logger.exception("webhook: delivery round failed")
            finally:
                self._leading.clear()
            self._stop.wait(ACQUIRE_EVERY_S)

    # -- leading -------------------------------------------------------------------------------

    def _lead(self) -> None:
        """Deliver from the cursor while the lease is held."""
        cursor, ordinal = self.state.start()
        reader = _OrdinalReader(self.client, self.keys.events, cursor, ordinal, self.max_events,
                                self.app)
        pending: list[_Pending] = []
        while not self._stop.is_set() and self.state.held:
            if len(pending) < self.max_events:
                reader.count = self.max_events - len(pending)
                wait_s = pending[0].read_at + self.delay_s - time.monotonic() if pending \
                    else BLOCK_MS / 1000
                block_ms = max(1, int(wait_s * 1000)) if wait_s > 0.001 else None
                items = reader.read(block_ms=block_ms)
                now = time.monotonic()
                pending += [_Pending(item, n, now) for item, n in zip(items, reader.ordinals,
                                                                        strict=True)]
            due = pending and (len(pending) >= self.max_events
                               or time.monotonic() - pending[0].read_at >= self.delay_s)
            if due:
                batch, pending = pending[:self.max_events], pending[self.max_events:]
                if not self._deliver(batch):
                    return

    def _deliver(self, batch: list[_Pending]) -> bool:
        """POST ``batch`` until a 2xx, then move the cursor; False when no longer the leader."""
        body = json.dumps([p.item.as_dict() for p in batch], separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": self._agent,
                   SIGNATURE_HEADER: signature(self._secret, body)}
        if not self._post(body, headers):
            return False
        gaps = [p.item for p in batch if isinstance(p.item, Gap)]
        for gap in gaps:
            logger.warning("webhook: events after %s were trimmed before delivery (delivered a "
                           "gap; delivery goes on at %s): raise TPNS_EVENTS_MAXLEN or speed up "
                           "the receiver", gap.from_id, gap.first_id)
        moved = self.state.advance(batch[-1].item.stream_id, batch[-1].ordinal,
                                   len(batch) - len(gaps), len(gaps))
        if moved != 1:
            logger.warning("webhook: lost the lease while delivering; the new leader goes on "
                           "from the cursor (the last batch may be delivered twice)")
        return moved == 1

    def _post(self, body: bytes, headers: Mapping[str, str]) -> bool:
        retrying = Retrying(  # a fresh one per batch: Retrying instances are not thread-safe
            stop=_StopWhen(lambda: self._stop.is_set() or not self.state.held),
            wait=wait_random_exponential(multiplier=BACKOFF_BASE_S, max=self.backoff_max_s),
            retry=retry_if_exception_type(WebhookError), sleep=self._sleep, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    self._attempt(body, headers)
        except WebhookError:
            return False
        if self._failing:
            logger.info("webhook: delivering again after %d failed attempt(s)", self._failing)
            self._failing = 0
        return True

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop ends the backoff at once

    def _attempt(self, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            status = self.transport(self.url, body, headers, self.timeout_s)
        except requests.RequestException as exc:
            error = f"{type(exc).__name__} (no answer within {self.timeout_s:g} s or refused)"
        else:
            if 200 <= status < 300:
                return
            error = f"HTTP {status}"
        self._failing += 1
        now = time.monotonic()
        # the first failure of a run, then once a minute: not once per retry
        if self._failing == 1 or now - self._warned_at >= FAILURE_LOG_EVERY_S:
            self._warned_at = now
            logger.warning("webhook: POST to %s failed: %s; retrying with backoff (%d failed "
                           "attempt(s) in a row)", shown_webhook_url(self.url), error,
                           self._failing)
        try:
            self.state.note_failure(error)
        except (redis.RedisError, OSError):
            pass
        raise WebhookError(error)


def _version() -> str:
    try:
        return metadata.version("tpns-batcher")
    except metadata.PackageNotFoundError:
        return "0"


#: socket timeouts of the deliverer's Redis connection: above the blocking read's wait
REDIS_SOCKET_TIMEOUT_S = 15.0


def start_deliverers(settings: Settings, redis_url: str) -> list[Deliverer]:
    """Running ``Deliverer``s when ``TPNS_WEBHOOK_URL`` is set (worker start-up): one, or on a
    Redis Cluster one per configured app (each app's stream, lease and cursor are in its slot,
    SPEC §8: order is kept per app). None without a webhook."""
    if not settings.webhook_url or not settings.webhook_secret:
        return []
    client = redis_client(redis_url, health_check_interval=30,
                          socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=5.0)
    keys = Keys(settings.prefix)
    scopes: list[tuple[Keys, str | None]] = [(keys, None)]
    if isinstance(client, RedisCluster):
        scopes = [(keys.tagged(app), app) for app in settings.apps]
    return [Deliverer(client, scope, settings.webhook_url, settings.webhook_secret,
                      app=app).start() for scope, app in scopes]
