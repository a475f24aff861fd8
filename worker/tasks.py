"""The Celery tasks: a few lines each around ``Flusher`` (the framework-free core in flush.py)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

from celery import Celery, signals

from .connections import redis_client
from .flush import Flusher, FlushResult
from .settings import Settings
from .store import Store
from .wakeup import FLUSH_TASK, SWEEP_TASK, CeleryWaker

#: set in the main process when a warm shutdown starts (SIGTERM); a multiprocessing Event, not a
#: threading one, so that prefork pool children (forked before the signal, which only the main
#: process receives) see it too and a flush stops after its call in flight instead of sending
#: up to BATCHES_PER_TASK more batches while the shutdown waits for it
_shutting_down = multiprocessing.Event()
_local: dict[int, Flusher] = {}


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    _shutting_down.set()


def make_store(settings: Settings, redis_url: str, prefix: str) -> Store:
    client = redis_client(redis_url, health_check_interval=30)
    return Store(client, prefix, max_items=settings.max_items_per_call,
                 linger_ms=settings.linger_ms, lease_s=settings.lease_s,
                 status_ttl_s=settings.status_ttl_s)


def register(app: Celery, settings: Settings, redis_url: str, prefix: str) -> None:
    """Register ``tpns.flush`` and ``tpns.sweep`` on ``app``."""

    def flusher() -> Flusher:
        # one per process: a prefork child builds its own Redis client and HTTP session
        pid = os.getpid()
        if pid not in _local:
            _local.clear()
            store = make_store(settings, redis_url, prefix)
            waker = CeleryWaker(settings, redis_url, prefix, celery_app=app)
            _local[pid] = Flusher(settings, store, waker, should_stop=_shutting_down.is_set)
        return _local[pid]

    @app.task(name=FLUSH_TASK, ignore_result=True)
    def flush(app_name: str, operator_type: int) -> dict[str, Any]:
        result: FlushResult = flusher().flush(app_name, int(operator_type))
        return {"batches": result.batches, "items": result.items, "stopped": result.stopped}

    @app.task(name=SWEEP_TASK, ignore_result=True)
    def sweep() -> dict[str, int]:
        return flusher().sweep()
