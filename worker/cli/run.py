"""``tpns-batcher worker``: the Celery worker with its heartbeat, watchdog and exit status."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any

import click

from ..errors import ConfigError
from ..keys import HEARTBEAT_INTERVAL_S
from ..settings import DEFAULT_CONCURRENCY, DEFAULT_POOL, Settings
from ..store import UNREACHABLE
from . import common

logger = logging.getLogger(__name__)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--no-beat", is_flag=True, help="Do not embed beat (run the sweeps elsewhere).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="TPNS_METRICS_PORT",
              default=None, help="Serve Prometheus /metrics (cluster-wide) on this port "
                                 "[env TPNS_METRICS_PORT].")
@click.option("--metrics-host", default="127.0.0.1", envvar="TPNS_METRICS_HOST",
              show_default=True, help="Address for --metrics-port [env TPNS_METRICS_HOST].")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(no_beat: bool, metrics_port: int | None, metrics_host: str,
           celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker with the flush and sweep tasks.

    CELERY_ARGS go to ``celery worker`` (e.g. --hostname w1@%h, --concurrency 8). The default is
    one process with a pool of 8 task threads that keeps up to TPNS_MAX_IN_FLIGHT calls in
    flight; with --pool prefork each child keeps that many. Needs TPNS credentials, or an explicit
    TPNS_BASE_URL such as a sandbox's URL.
    """
    from ..celery_app import make_celery
    from ..consumer import quiet_outage_logs
    from ..embedded import guard_embedded, resolve_redis_url
    from ..logs import setup_logging
    from ..tasks import make_store, register

    settings = common.settings()
    try:
        settings.require_credentials()
        redis_url = resolve_redis_url(settings.redis_url, settings.data_dir)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    setup_logging(settings.log_format)
    quiet_outage_logs()
    guard_embedded(settings.redis_url, settings.data_dir)  # restarts the embedded Redis if it dies
    app = make_celery(settings, redis_url)
    register(app, settings, redis_url, settings.prefix)
    store = make_store(settings, redis_url, settings.prefix)
    try:
        store.register_apps(settings.apps)
    except UNREACHABLE as exc:  # the worker waits for Redis like after any outage
        logger.warning("Redis unreachable at start (%s); waiting for it", type(exc).__name__)
    _start_heartbeat(store, settings)
    watchdog = _start_watchdog(app, settings, redis_url, store)
    from ..webhooks import start_deliverers

    deliverers = start_deliverers(settings, redis_url)  # threads here, never in the pool
    if metrics_port is not None:
        from ..monitor.metrics import start_metrics_server

        try:
            start_metrics_server(metrics_port, store, settings.apps, addr=metrics_host)
        except OSError as exc:
            raise click.ClickException(f"--metrics-port {metrics_port}: {exc.strerror}") from None
    argv = ["worker", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    pool_given = any(a.startswith(("-P", "--pool")) for a in celery_args)
    if not pool_given:
        argv += ["--pool", DEFAULT_POOL]
    if not pool_given and not any(a.startswith(("-c", "--concurrency")) for a in celery_args):
        argv += ["--concurrency", str(DEFAULT_CONCURRENCY)]
    if not no_beat:
        argv.append("--beat")
    status = _ExitStatus()
    try:
        app.start(argv=argv + list(celery_args))
    finally:
        for deliverer in deliverers:
            deliverer.stop()
        watchdog.stop()
    sys.exit(status.code())


class _ExitStatus:
    """The worker's exit status: 0 only when asked to stop (SIGTERM, SIGINT), else non-zero.

    Celery's own status cannot be used as is: ``app.start()``/``worker_main()`` return nothing
    (an "Unrecoverable error" exited 0, and a supervisor with ``Restart=on-failure`` left the
    worker dead); a cold shutdown drops its code; Ctrl+C is a warm shutdown with status 1.
    """

    def __init__(self) -> None:
        from celery import signals

        self.worker: Any = None
        self.asked: int | None = None

        @signals.worker_init.connect(weak=False)
        def _init(sender: Any = None, **_: Any) -> None:
            self.worker = sender

        @signals.worker_shutting_down.connect(weak=False)
        def _asked(sig: str = "", exitcode: int | None = None, **_: Any) -> None:
            if self.asked is None:
                self.asked = 0 if sig in ("SIGTERM", "SIGINT") else int(exitcode or 1)

    def code(self) -> int:
        failed = getattr(self.worker, "exitcode", None)
        if failed:  # Celery stopped it on an error of its own
            return int(failed)
        if self.asked is not None:
            return self.asked
        return 1  # stopped without being asked (or never started)


def _start_heartbeat(store: Any, settings: Settings) -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"

    def beat() -> None:
        stop = threading.Event()
        while True:
            try:
                store.heartbeat(name)
                store.register_apps(settings.apps)
            except Exception:  # Redis away for a moment: the next beat tries again
                pass
            if stop.wait(HEARTBEAT_INTERVAL_S):
                return

    threading.Thread(target=beat, name="tpns-heartbeat", daemon=True).start()


def _start_watchdog(app: Any, settings: Settings, redis_url: str, store: Any) -> Any:
    """The watchdog thread (``worker/watchdog.py``) and systemd's READY/STOPPING notices."""
    from celery import signals

    from ..liveness import heartbeat_dir, sd_notify
    from ..watchdog import Watchdog, attached, broker_probe, redis_probe

    pair = attached(app)
    assert pair is not None, "tasks.register attaches the progress"
    progress, rebuild = pair
    broker_url = settings.broker_url or redis_url

    def work_waiting() -> bool:
        return bool(store.ready_counts(set(settings.apps) | store.known_apps()))

    watchdog = Watchdog(name=f"{socket.gethostname()}:{os.getpid()}", store_url=redis_url,
                        broker_url=broker_url,
                        store_probe=redis_probe(redis_url,
                                                store.keys.probe(socket.gethostname(), os.getpid())),
                        broker_probe=broker_probe(broker_url), work_waiting=work_waiting,
                        heartbeat_dir=heartbeat_dir(settings.data_dir),
                        stuck_s=settings.worker_stuck_s, progress=progress, rebuild=rebuild)

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_: Any) -> None:
        sd_notify("STOPPING=1")

    watchdog.start()
    return watchdog
