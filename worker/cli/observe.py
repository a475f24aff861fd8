"""Commands that look at the system: stats (figures, live view) and health (exit code)."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import click

from ..errors import ConfigError, StoreUnavailableError
from ..keys import WORKER_TTL_S
from ..settings import Settings
from . import common


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--watch", is_flag=True,
              help="Refresh a live view in place (with --json: one JSON line per interval) "
                   "until Ctrl-C.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, help="Seconds between refreshes with --watch.")
def stats(as_json: bool, watch: bool, interval_s: float) -> None:
    """Counts per state and operator_type, queue depth, oldest pending age, calls, pauses."""
    producer = common.producer()
    try:
        if watch:
            _watch_stats(producer, as_json, interval_s)
            return
        figures = producer.stats()
    except StoreUnavailableError as exc:
        common.unavailable(exc)
    finally:
        producer.close()
    if as_json:
        click.echo(json.dumps(figures))
        return
    from rich.console import Console

    from ..monitor.views import stats_table

    Console().print(stats_table(figures))


def _watch_stats(producer: Any, as_json: bool, interval_s: float) -> None:
    """``stats --watch``: the live view (or JSON Lines) until Ctrl-C, which exits 0."""
    from ..monitor.overview import read_overview
    from ..monitor.views import watch

    if not as_json:
        watch(lambda: read_overview(producer.store, producer.apps()), interval_s)
        return
    stop = threading.Event()
    try:
        while True:
            click.echo(json.dumps(producer.stats()))
            stop.wait(interval_s)
    except KeyboardInterrupt:
        return


@click.command()
@click.option("--worker", "need_worker", is_flag=True,
              help=f"Also require a worker seen in the last {WORKER_TTL_S} s.")
@click.option("--local", "local", is_flag=True,
              help="Judge the worker processes of this host from their heartbeat files under "
                   "TPNS_DATA_DIR: alive and not stuck. Never asks Redis, so an outage does not "
                   "fail it: the worker's liveness probe. Implies --worker.")
@click.option("--allow-paused", is_flag=True,
              help="Report a sending pause (credentials/billing) without failing: a restart "
                   "would not fix it.")
def health(need_worker: bool, local: bool, allow_paused: bool) -> None:
    """Exit 0 when healthy, 1 otherwise, with a one-line reason.

    Healthy: Redis answers, no app's sending is paused, and (with --worker) a worker has
    heartbeated in the last 30 s (``worker.health``). With TPNS_WEBHOOK_URL, a webhook lag over a
    tenth of TPNS_EVENTS_MAXLEN says "degraded" (exit 0), over half of it is unhealthy.
    With --local: a worker process runs on this host, its
    heartbeat file is fresh and its watchdog does not judge it stuck (Redis unreachable is
    reported, not a failure).
    """
    if local:
        _health_local()
        return
    from ..health import check
    from ..webhook_state import lag_limits

    try:
        producer = common.producer()
    except click.ClickException as exc:
        click.echo(f"unhealthy: {exc.message}")
        sys.exit(1)
    try:
        verdict = check(producer.store, producer.apps, need_worker=need_worker,
                        allow_paused=allow_paused,
                        webhook_limits=lag_limits(producer.settings.webhook_url,
                                                  producer.settings.events_maxlen))
    finally:
        producer.close()
    click.echo(verdict.line())
    if not verdict.ok:
        sys.exit(1)


def _health_local() -> None:
    from ..liveness import heartbeat_dir, judge_local, now, read_heartbeats

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        click.echo(f"unhealthy: configuration: {exc}")
        sys.exit(1)
    healthy, reason = judge_local(read_heartbeats(heartbeat_dir(settings.data_dir)), now())
    click.echo(f"{'ok' if healthy else 'unhealthy'}: {reason}")
    if not healthy:
        sys.exit(1)
