"""The ``tpns-batcher`` command (SPEC §8). Errors go to stderr with a non-zero exit code."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any, NoReturn

import click

from ..errors import ConfigError, IntentError, StoreUnavailableError, TpnsBatcherError
from ..jsonin import decode_line, iter_lines
from ..settings import Settings
from ..store import UNREACHABLE

logger = logging.getLogger(__name__)

#: lines read and enqueued per round of ``enqueue``
ENQUEUE_BATCH = 5000
#: pool processes of ``worker`` unless CELERY_ARGS set --concurrency
DEFAULT_CONCURRENCY = 4
#: exit status when Redis is unreachable or refuses new intents (``queue_full``), SPEC §8
EXIT_UNAVAILABLE = 3


def _unavailable(exc: StoreUnavailableError) -> NoReturn:
    """One line on stderr (the URL without its password, the cause), then exit 3."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_UNAVAILABLE)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def _producer() -> Any:
    from ..producer import Producer

    try:
        return Producer(settings=_settings())
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tpns-batcher")
def main() -> None:
    """Batch TPNS account bind/unbind intents into the fewest correct calls.

    Producers enqueue one intent at a time (``enqueue``, the Python ``Producer``, or ``serve``);
    workers (``worker``) group them into calls of at most 20 tokens per operator_type, keep
    per-key order, retry transient failures and record a status for every intent in Redis.

    Without REDIS_URL every command uses one embedded Redis under TPNS_DATA_DIR.
    Try it with no credentials: ``tpns-batcher demo``.
    """


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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

    CELERY_ARGS go to ``celery worker`` (e.g. --concurrency 8, --hostname w1@%h, --pool threads).
    Needs TPNS credentials, or an explicit TPNS_BASE_URL such as a sandbox's URL.
    """
    from ..celery_app import make_celery
    from ..consumer import quiet_outage_logs
    from ..embedded import guard_embedded, resolve_redis_url
    from ..logs import setup_logging
    from ..tasks import make_store

    settings = _settings()
    try:
        settings.require_credentials()
        redis_url = resolve_redis_url(settings.redis_url, settings.data_dir)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    setup_logging(settings.log_format)
    quiet_outage_logs()
    guard_embedded(settings.redis_url, settings.data_dir)  # restarts the embedded Redis if it dies
    app = make_celery(settings, redis_url, with_tasks=True)
    store = make_store(settings, redis_url, settings.prefix)
    try:
        store.register_apps(settings.apps)
    except UNREACHABLE as exc:  # the worker waits for Redis like after any outage
        logger.warning("Redis unreachable at start (%s); waiting for it", type(exc).__name__)
    _start_heartbeat(store, settings)
    watchdog = _start_watchdog(app, settings, redis_url, store)
    if metrics_port is not None:
        from ..monitor.metrics import start_metrics_server

        try:
            start_metrics_server(metrics_port, store, settings.apps, addr=metrics_host)
        except OSError as exc:
            raise click.ClickException(f"--metrics-port {metrics_port}: {exc.strerror}") from None
    argv = ["worker", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    if not any(a.startswith(("-c", "--concurrency")) for a in celery_args):
        argv += ["--concurrency", str(DEFAULT_CONCURRENCY)]
    if not no_beat:
        argv.append("--beat")
    status = _ExitStatus()
    try:
        app.start(argv=argv + list(celery_args))
    finally:
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
            if stop.wait(5.0):
                return

    threading.Thread(target=beat, name="tpns-heartbeat", daemon=True).start()


def _start_watchdog(app: Any, settings: Settings, redis_url: str, store: Any) -> Any:
    """The watchdog thread (``worker/watchdog.py``) and systemd's READY/STOPPING notices."""
    from celery import signals

    from ..liveness import heartbeat_dir, sd_notify
    from ..watchdog import Watchdog, attached, broker_probe, redis_probe

    pair = attached(app)
    assert pair is not None, "make_celery(with_tasks=True) attaches the progress"
    progress, rebuild = pair
    broker_url = settings.broker_url or redis_url

    def work_waiting() -> bool:
        return bool(store.ready_counts(set(settings.apps) | store.known_apps()))

    watchdog = Watchdog(name=f"{socket.gethostname()}:{os.getpid()}", store_url=redis_url,
                        broker_url=broker_url,
                        store_probe=redis_probe(redis_url, store.key("probe", socket.gethostname(),
                                                                     os.getpid())),
                        broker_probe=broker_probe(broker_url), work_waiting=work_waiting,
                        heartbeat_dir=heartbeat_dir(settings.data_dir),
                        stuck_s=settings.worker_stuck_s, progress=progress, rebuild=rebuild)

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_: Any) -> None:
        sd_notify("STOPPING=1")

    watchdog.start()
    return watchdog


def _read_batches(stream: IO[bytes]) -> Iterator[tuple[list[int], list[Any], list[IntentError]]]:
    """Lines read as bytes, one at a time (any size, stdin too), each decoded on its own."""
    numbers: list[int] = []
    objs: list[Any] = []
    bad: list[IntentError] = []
    for number, line in iter_lines(stream):
        try:
            objs.append(decode_line(line, number))
            numbers.append(number)
        except IntentError as exc:
            bad.append(exc)
        if len(objs) + len(bad) >= ENQUEUE_BATCH:
            yield numbers, objs, bad
            numbers, objs, bad = [], [], []
    if objs or bad:
        yield numbers, objs, bad


@main.command()
@click.argument("source", type=click.File("rb"))
def enqueue(source: IO[bytes]) -> None:
    """Enqueue JSON Lines from SOURCE (a file, or - for stdin).

    Prints one id per accepted line, in input order, to stdout; each refused line goes to stderr
    as ``line N: reason``. Exits 1 if any line was refused. If Redis becomes unreachable (or
    refuses new intents: queue_full), the stored ids are printed as usual, the lines in doubt
    and those not stored are named on stderr, and the exit status is 3. A UTF-8 BOM and CRLF
    line ends are accepted; a line that is not valid UTF-8 or JSON is refused on its own.
    """
    producer = _producer()
    refused = 0
    progress = _progress() if sys.stderr.isatty() else None
    last_line = 0
    try:
        for numbers, objs, bad in _read_batches(source):
            try:
                result = producer.enqueue(objs, line_numbers=numbers)
            except StoreUnavailableError as exc:
                _report_unavailable(exc, numbers, bad, last_line)
                _unavailable(exc)
            refusals = sorted([*bad, *result.errors.values()], key=lambda e: e.line or 0)
            for err in refusals:
                click.echo(f"line {err.line}: {err.reason}", err=True)
            if result.accepted:
                click.echo("\n".join(result.accepted))
            refused += len(refusals)
            last_line = max([last_line, *numbers, *(e.line or 0 for e in bad)])
            if progress is not None:
                progress.advance(len(objs) + len(bad))
    except TpnsBatcherError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if progress is not None:
            progress.stop()
        producer.close()
    if refused:
        sys.exit(1)


def _report_unavailable(exc: StoreUnavailableError, numbers: list[int], bad: list[IntentError],
                        last_line: int) -> None:
    """The round Redis failed in: stored ids on stdout; refusals, lines in doubt and lines not
    stored on stderr; and where the lines never read begin."""
    from ..producer import BulkResult

    result = exc.result if isinstance(exc.result, BulkResult) else BulkResult()
    notes: list[tuple[int, str]] = [(e.line or 0, e.reason) for e in bad]
    notes += [(e.line or 0, e.reason) for e in result.errors.values()]
    notes += [(numbers[k], f"in doubt (id {i}): sent, not acknowledged; look it up with "
                           f"`tpns-batcher status {i}`") for k, i in result.in_doubt.items()]
    notes += [(numbers[k], f"not stored ({exc.code}): safe to send again")
              for k in result.not_stored]
    for line, note in sorted(notes):
        click.echo(f"line {line}: {note}", err=True)
    if result.accepted:
        click.echo("\n".join(result.accepted))
    last = max([last_line, *numbers, *(e.line or 0 for e in bad)])
    click.echo(f"lines after {last}: not read, not sent", err=True)


class _progress:
    """A live count on the terminal (stderr) while a bulk enqueue runs."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(SpinnerColumn(), TextColumn("enqueued {task.completed} lines"),
                             TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._task = self._bar.add_task("enqueue", total=None)
        self._bar.start()

    def advance(self, n: int) -> None:
        self._bar.advance(self._task, n)

    def stop(self) -> None:
        self._bar.stop()


@main.command()
@click.argument("ids", nargs=-1, required=True)
def status(ids: tuple[str, ...]) -> None:
    """Print the status of each intent as one JSON object per line; exit 1 if any id is unknown."""
    producer = _producer()
    missing = 0
    try:
        found = producer.statuses(list(ids))
    except StoreUnavailableError as exc:
        _unavailable(exc)
    finally:
        producer.close()
    for intent_id, st in zip(ids, found, strict=True):
        if st is None:
            missing += 1
            click.echo(f"{intent_id}: not found", err=True)
        else:
            click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
    if missing:
        sys.exit(1)


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds to wait.")
def wait(ids: tuple[str, ...], timeout_s: float) -> None:
    """Wait until every intent is terminal, then print their statuses.

    Exit 0 if all succeeded, 1 if any failed (or is unknown), 2 on timeout.
    """
    producer = _producer()
    try:
        statuses = producer.wait(list(ids), timeout_s=timeout_s)
    except TimeoutError as exc:
        click.echo(f"timeout: {exc}", err=True)
        sys.exit(2)
    except StoreUnavailableError as exc:
        _unavailable(exc)
    finally:
        producer.close()
    code = 0
    for intent_id, st in zip(ids, statuses, strict=True):
        if st is None:
            click.echo(f"{intent_id}: not found", err=True)
            code = 1
        else:
            click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
            if st.state != "succeeded":
                code = 1
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--watch", is_flag=True,
              help="Refresh a live view in place (with --json: one JSON line per interval) "
                   "until Ctrl-C.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=1.0,
              show_default=True, help="Seconds between refreshes with --watch.")
def stats(as_json: bool, watch: bool, interval_s: float) -> None:
    """Counts per state and operator_type, queue depth, oldest pending age, calls, pauses."""
    producer = _producer()
    try:
        if watch:
            _watch_stats(producer, as_json, interval_s)
            return
        figures = producer.stats()
    except StoreUnavailableError as exc:
        _unavailable(exc)
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


@main.command("requeue-failed")
@click.option("--error", "error", default=None, metavar="CODE",
              help="Only intents that failed with this error (e.g. exhausted, invalid_token).")
def requeue_failed(error: str | None) -> None:
    """Put failed intents back into the queue (prints their ids)."""
    producer = _producer()
    try:
        ids = producer.requeue_failed(error)
    except StoreUnavailableError as exc:
        _unavailable(exc)
    finally:
        producer.close()
    for intent_id in ids:
        click.echo(intent_id)
    click.echo(f"requeued {len(ids)} failed intents", err=True)


@main.command()
@click.option("--worker", "need_worker", is_flag=True,
              help="Also require a worker seen in the last 30 s.")
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
    heartbeated in the last 30 s. With --local: a worker process runs on this host, its
    heartbeat file is fresh and its watchdog does not judge it stuck (Redis unreachable is
    reported, not a failure).
    """
    if local:
        _health_local()
        return
    import redis as redis_lib

    try:
        producer = _producer()
    except click.ClickException as exc:
        click.echo(f"unhealthy: {exc.message}")
        sys.exit(1)
    try:
        producer.redis.ping()
    except (redis_lib.RedisError, OSError) as exc:
        producer.close()
        click.echo(f"unhealthy: redis unreachable ({type(exc).__name__})")
        sys.exit(1)
    try:
        workers = producer.store.workers()
        pauses = producer.store.pauses(producer.apps())
    finally:
        producer.close()
    if need_worker and not workers:
        click.echo("unhealthy: no worker seen in the last 30 s")
        sys.exit(1)
    if pauses and not allow_paused:
        app, (left, reason) = next(iter(pauses.items()))
        click.echo(f"unhealthy: sending for app {app} paused ({reason}, {left:.0f} s left)")
        sys.exit(1)
    paused = f"; sending paused for {', '.join(sorted(pauses))}" if pauses else ""
    click.echo(f"ok: redis reachable, {len(workers)} worker(s) seen{paused}")


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


def _register_optional() -> None:
    from ..sandbox.server import sandbox_command
    from ..serve.app import serve_command
    from ..tools.bench import bench_command
    from ..tools.demo import demo_command

    main.add_command(bench_command)
    main.add_command(demo_command)
    main.add_command(sandbox_command)
    main.add_command(serve_command)


_register_optional()
