"""The Celery app: configuration chosen for wake-up messages, and the names of the two tasks.

The tasks themselves are registered by ``worker.tasks.register`` (the worker command calls it):
this module imports neither ``tasks`` nor ``wakeup``, which both build on it, so the Celery glue
has no import cycle (``tasks`` -> ``wakeup`` -> ``celery_app``).

Why these settings (the intents live in Redis; a Celery message only says "flush (app, op)"):

* ``task_acks_late=False``: a wake lost with a dying worker costs nothing, the sweep re-sends it
  within a second; intents in flight are protected by the store's own leases, not by the broker.
  Late acks would only add redeliveries of long calls (visibility timeout) for no safety gained.
* ``worker_prefetch_multiplier=1``: one process must not hoard wakes the others could run.
* ``visibility_timeout``: only delayed (linger) wakes sit unacked, for at most a few seconds; the
  default hour is kept, set explicitly so a shared broker does not shorten it below our needs.
* ``task_time_limit``: a flush holds a lease; past the lease its items are reclaimed anyway, so the
  task is stopped a little after ``TPNS_LEASE_S`` rather than left hanging.
* Beat uses the in-memory scheduler: the sweep runs every second and needs no schedule file, and
  two workers with beat only make the sweep's Redis lock skip the extra run.
* The queue name and (on Redis) every broker key carry the product's prefix, so two deployments
  (or two tests) can share one Redis without seeing each other's wakes.
* Outages (SPEC §3.7): the worker's consumer is ``worker.consumer.ResilientConsumer`` (reconnects
  forever, at most 0.5 s apart, and survives kombu's cleanup bugs) and beat's scheduler logs a
  broker outage once (``QuietScheduler``); publishing retries without a limit too. A Redis broker
  gets a connect timeout, so a network cut (no RST) is noticed instead of waited on.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from .connections import celery_broker, is_redis_url
from .keys import SWEEP_TASK, Keys
from .settings import Settings

#: how often the sweep (lease reaper, retry and linger catch-up) runs
SWEEP_INTERVAL_S = 1.0
#: connect timeout of a Redis broker's sockets
BROKER_CONNECT_TIMEOUT_S = 5.0


def base_celery(name: str, broker_source: str, queue: str, key_prefix: str) -> Celery:
    """A Celery app that only carries small JSON messages on ``queue``: no results, early acks,
    the broker's keys under ``key_prefix`` when the broker is a Redis."""
    broker, options = celery_broker(broker_source)
    if os.environ.get("CELERY_BROKER_URL") == broker_source != broker:
        # Celery reads CELERY_BROKER_URL from the environment before its configuration, which
        # would undo the translation to kombu's spelling (unix sockets, Sentinel, rediss://)
        os.environ["CELERY_BROKER_URL"] = broker
    app = Celery(name, broker=broker, set_as_current=False)
    transport: dict[str, Any] = {"visibility_timeout": 3600, **options}
    if is_redis_url(broker_source):
        transport["global_keyprefix"] = key_prefix
        transport.setdefault("socket_connect_timeout", BROKER_CONNECT_TIMEOUT_S)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=False,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


def make_celery(settings: Settings, redis_url: str, prefix: str | None = None) -> Celery:
    """A Celery app for these settings, without tasks: enough to send wakes and control commands.
    A worker registers the flush and sweep tasks on it with ``worker.tasks.register``."""
    keys = Keys(prefix or settings.prefix)
    app = base_celery("tpns_batcher", settings.broker_url or redis_url, keys.flush_queue,
                      keys.celery_prefix)
    app.conf.update(
        worker_prefetch_multiplier=1,
        task_time_limit=int(settings.lease_s + 30),
        beat_scheduler="worker.consumer:QuietScheduler",
        worker_consumer="worker.consumer:ResilientConsumer",
        broker_connection_max_retries=None,
        beat_schedule={
            "tpns-sweep": {"task": SWEEP_TASK, "schedule": SWEEP_INTERVAL_S},
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def __getattr__(name: str) -> Celery:
    """``celery -A worker.celery_app flower``: the app for these settings, built on first use.

    Only for Celery's own commands (Flower, ``inspect``), which look an app up as the module's
    ``app`` attribute; it is built from the environment when asked for, never at import time.
    It sees the same broker, queue (``<prefix>flush``) and key prefix as the workers.
    """
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .embedded import resolve_redis_url

    settings = Settings.from_env()
    return make_celery(settings, resolve_redis_url(settings.redis_url, settings.data_dir))
