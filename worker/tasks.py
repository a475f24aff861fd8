"""The Celery tasks: a few lines each around ``Flusher`` (the framework-free core in flush.py)."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from celery import Celery, signals
from kombu.exceptions import OperationalError

from .connections import redis_client
from .flush import Flusher, FlushResult
from .keys import FLUSH_TASK, SWEEP_TASK, VERIFY_TASK
from .settings import Settings
from .store import Store, unavailable
from .verifier import Verifier
from .wakeup import CeleryWaker
from .watchdog import attach

logger = logging.getLogger(__name__)


def outage(exc: BaseException) -> bool:
    """A task that meets this ends quietly: Redis (store or broker) is away or cannot write."""
    return unavailable(exc) or isinstance(exc, OperationalError)


#: set in the main process when a warm shutdown starts (SIGTERM); a multiprocessing Event, not a
#: threading one, so that prefork pool children (forked before the signal, which only the main
#: process receives) see it too: a flush then claims no more and waits for its calls in flight,
#: and the shutdown waits for the flush
_shutting_down = multiprocessing.Event()
_local: dict[int, Flusher] = {}
_verifiers: dict[int, Verifier] = {}


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    _shutting_down.set()
    logger.info("shutting down: flushes finish their calls in flight and claim no more")


#: socket timeouts of the worker's store connection: a network cut (no RST) must end in an error
#: within seconds, not after the kernel's retransmission timeout of many minutes
STORE_SOCKET_TIMEOUT_S = 15.0
STORE_CONNECT_TIMEOUT_S = 5.0


def make_store(settings: Settings, redis_url: str, prefix: str) -> Store:
    client = redis_client(redis_url, health_check_interval=30,
                          socket_timeout=STORE_SOCKET_TIMEOUT_S,
                          socket_connect_timeout=STORE_CONNECT_TIMEOUT_S)
    verify = (settings.verify_delay_ms, int(settings.verify_timeout_s * 1000)) \
        if settings.verify else None
    return Store(client, prefix, max_items=settings.max_items_per_call,
                 linger_ms=settings.linger_ms, lease_s=settings.lease_s,
                 status_ttl_s=settings.status_ttl_s, verify=verify,
                 status_detail_s=settings.status_detail_s,
                 events_maxlen=settings.events_maxlen)


def register(app: Celery, settings: Settings, redis_url: str, prefix: str) -> None:
    """Register ``tpns.flush``, ``tpns.verify`` and ``tpns.sweep`` on ``app``.

    While Redis is unreachable a task ends quietly (a debug line; the watchdog logs the outage
    once) instead of with a traceback: nothing is lost, the sweep wakes the work again.
    """
    progress, _rebuild = attach(app)

    @signals.task_received.connect(weak=False)
    def _received(**_: Any) -> None:  # the consumer got a message: it is not stuck
        progress.progressed()

    def flusher() -> Flusher:
        # one per process, shared by its task threads (the default pool): the process's call
        # slots, sender threads and HTTP sessions; a prefork child builds its own
        pid = os.getpid()
        if pid not in _local:
            _local.clear()
            store = make_store(settings, redis_url, prefix)
            waker = CeleryWaker(settings, redis_url, prefix, celery_app=app)
            _local[pid] = Flusher(settings, store, waker, should_stop=_shutting_down.is_set,
                                  on_claim=progress.progressed)
        return _local[pid]

    verifier = _register_verify(app, settings, flusher, progress.progressed)

    @app.task(name=FLUSH_TASK, ignore_result=True)
    def flush(app_name: str, operator_type: int) -> dict[str, Any]:
        try:
            result: FlushResult = flusher().flush(app_name, int(operator_type))
        except Exception as exc:
            if not outage(exc):
                raise
            logger.debug("flush %s/%s stopped: Redis unreachable (%r)", app_name, operator_type,
                         exc)
            return {"batches": 0, "items": 0, "stopped": "redis_unreachable"}
        return {"batches": result.batches, "items": result.items, "stopped": result.stopped}

    @app.task(name=SWEEP_TASK, ignore_result=True)
    def sweep() -> dict[str, int]:
        try:
            done = flusher().sweep()
            if not done.get("skipped"):
                done["verify_wakes"] = verifier().sweep()
            return done
        except Exception as exc:
            if not outage(exc):
                raise
            logger.debug("sweep skipped: Redis unreachable (%r)", exc)
            return {"skipped": 1}


def _register_verify(app: Celery, settings: Settings, flusher: Callable[[], Flusher],
                     progressed: Callable[[], None]) -> Callable[[], Verifier]:
    """Register ``tpns.verify`` (SPEC §6.1); returns the process's ``Verifier`` getter."""

    def verifier() -> Verifier:
        # one per process, on the flusher's store and waker (its own HTTP sessions)
        pid = os.getpid()
        if pid not in _verifiers:
            _verifiers.clear()
            flush_side = flusher()
            _verifiers[pid] = Verifier(settings, flush_side.store, flush_side.wake)
        return _verifiers[pid]

    @app.task(name=VERIFY_TASK, ignore_result=True)
    def verify(app_name: str) -> dict[str, Any]:
        # runs whatever TPNS_VERIFY says now: items that went verifying before it was turned
        # off still hold their keys and must be checked
        try:
            progressed()
            result = verifier().verify(app_name)
        except Exception as exc:
            if not outage(exc):
                raise
            logger.debug("verify %s stopped: Redis unreachable (%r)", app_name, exc)
            return {"rounds": 0, "stopped": "redis_unreachable"}
        return {"rounds": result.rounds, "items": result.items, "verified": result.verified,
                "stopped": result.stopped}

    return verifier
