"""The worker's watchdog: a thread of the main process that sees outages and stuck consumers.

Every ``PROBE_INTERVAL_S`` it probes the store (a write of a short-lived key: a Redis that answers
but cannot write is down too) and the broker (a PING), with short timeouts on their own
connections, and then:

* logs ONE line when an outage starts (what is unreachable, where, why) and one when Redis answers
  again (with the outage's length). Tasks that die in the outage log at debug level only;
* judges whether the worker is stuck (``worker.liveness.stuck_reason``). A stuck consumer is first
  rebuilt in the process (the consumer's event loop is asked to drop its broker connection and
  reconnect, see ``worker/consumer.py``); if it is still stuck ``TPNS_WORKER_STUCK_S`` later, the
  last resort is to exit NON-zero (``EXIT_STUCK``) so that a supervisor starts a fresh process;
* writes the local heartbeat file and, under systemd, sends ``WATCHDOG=1`` while not stuck.

The recovery itself (reconnecting) is not done here: the consumer reconnects on its own policy
(``worker/consumer.py``), the flush tasks find the store again on their next call. The watchdog
only watches, reports, and kicks what does not move.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.backoff import NoBackoff
from redis.retry import Retry

from . import liveness
from .connections import is_redis_url, redis_client
from .keys import PROBE_TTL_MS
from .settings import redact_url

logger = logging.getLogger(__name__)

#: seconds between two probes of the store and the broker
PROBE_INTERVAL_S = 0.5
#: timeout of one probe (connect and reply)
PROBE_TIMEOUT_S = 2.0
#: seconds between two looks at the store's eligible work (for the stuck rule)
WORK_LOOK_S = 2.0
#: exit status of a worker that stayed stuck after an in-process rebuild (EX_SOFTWARE)
EXIT_STUCK = 70


class Progress:
    """Times (epoch s) of the consumer loop's last tick and of the last task or claim.

    Shared memory created before the pool forks, so prefork children report their claims too.
    """

    def __init__(self) -> None:
        self._loop = multiprocessing.Value("d", 0.0, lock=False)
        self._progress = multiprocessing.Value("d", 0.0, lock=False)

    def loop_ticked(self, at: float | None = None) -> None:
        self._loop.value = liveness.now() if at is None else at

    def progressed(self, at: float | None = None) -> None:
        self._progress.value = liveness.now() if at is None else at

    @property
    def loop_at(self) -> float:
        return float(self._loop.value)

    @property
    def progress_at(self) -> float:
        return float(self._progress.value)


Probe = Callable[[], None]


def redis_probe(url: str, write_key: str | None = None) -> Probe:
    """A PING on a connection of its own (for a store URL or a Redis broker URL); with
    ``write_key``, a small write instead (a short-lived key), so that a Redis that answers but
    cannot write (a full disk: ``MISCONF``; a demoted master: ``READONLY``) counts as down."""
    # no client-side retries: a probe that retried across a short outage would not see it
    client = redis_client(url, socket_timeout=PROBE_TIMEOUT_S,
                          socket_connect_timeout=PROBE_TIMEOUT_S, retry=Retry(NoBackoff(), 0))

    def probe() -> None:
        if write_key is None:
            client.ping()
        else:
            client.set(write_key, "1", px=PROBE_TTL_MS)

    return probe


def broker_probe(url: str) -> Probe:
    """A PING for a Redis broker; a TCP connect for any other (RabbitMQ)."""
    if is_redis_url(url):
        return redis_probe(url)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672

    def probe() -> None:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()

    return probe


def shown_url(url: str) -> str:
    """``url`` fit for a log line: no password, no query (which may carry ``sentinel_password``)."""
    return str(redact_url(url.partition("?")[0]))


def _cause(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class Watchdog:
    """One worker process's watchdog (see the module docstring). ``step()`` is one round."""

    def __init__(self, *, name: str, store_url: str, broker_url: str, store_probe: Probe,
                 broker_probe: Probe, work_waiting: Callable[[], bool], heartbeat_dir: Path,
                 stuck_s: float, progress: Progress, rebuild: threading.Event,
                 clock: Callable[[], float] = liveness.now,
                 notify: Callable[[str], bool] = liveness.sd_notify,
                 give_up: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.pid = os.getpid()
        self._where = {"store": shown_url(store_url), "broker": shown_url(broker_url)}
        self._probes = {"store": store_probe, "broker": broker_probe}
        self._work_waiting = work_waiting
        self.heartbeat_dir = heartbeat_dir
        self.stuck_s = stuck_s
        self.progress = progress
        self.rebuild = rebuild
        self.clock = clock
        self.notify = notify
        self.give_up = give_up or exit_stuck
        started = clock()
        self.up = {"store": True, "broker": True}
        #: when the current outage started (None: no outage)
        self.down_since: float | None = None
        #: when store and broker last became reachable together (or the watchdog started)
        self.up_since = started
        self._work = False
        self._work_at = 0.0
        self._rebuild_at: float | None = None
        self._write_failed = False
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round ---------------------------------------------------------------------------

    def step(self) -> liveness.Heartbeat:
        now = self.clock()
        causes: dict[str, str] = {}
        for part, probe in self._probes.items():
            try:
                probe()
                self.up[part] = True
            except Exception as exc:  # any failure to answer is "unreachable" for this purpose
                self.up[part] = False
                causes[part] = _cause(exc)
        self._log_transition(now, causes)
        if self.up["store"] and now - self._work_at >= WORK_LOOK_S:
            try:
                self._work = self._work_waiting()
                self._work_at = now
            except Exception:  # lost between the probe and the look: the next round sees it
                self._work = False
        reason = liveness.stuck_reason(
            now=now, store_up=self.up["store"], broker_up=self.up["broker"],
            up_since=self.up_since, loop_at=self.progress.loop_at,
            progress_at=self.progress.progress_at, work_waiting=self._work,
            stuck_s=self.stuck_s)
        self._act_on(now, reason)
        beat = liveness.Heartbeat(
            pid=self.pid, name=self.name, written_at=now, loop_at=self.progress.loop_at,
            progress_at=self.progress.progress_at, store_up=self.up["store"],
            broker_up=self.up["broker"], work_waiting=self._work, stuck=reason)
        self._write(beat)
        if not self._ready:  # the process is up and watching: under systemd, start is done
            self._ready = True
            self.notify("READY=1\nSTATUS=running")
        if not reason:
            self.notify("WATCHDOG=1")
        return beat

    def _log_transition(self, now: float, causes: dict[str, str]) -> None:
        if causes and self.down_since is None:
            self.down_since = now
            parts = "; ".join(f"{part} at {self._where[part]}: {cause}"
                              for part, cause in causes.items())
            logger.warning("Redis unreachable (%s): claiming stopped; the worker stays up and "
                           "reconnects every %g s", parts, PROBE_INTERVAL_S)
            self.notify("STATUS=Redis unreachable; waiting for it")
        elif not causes and self.down_since is not None:
            logger.warning("Redis answering again after a %.1f s outage; flushing resumes",
                           now - self.down_since)
            self.down_since = None
            self.up_since = now
            self._rebuild_at = None
            self.notify("STATUS=running")

    def _act_on(self, now: float, reason: str) -> None:
        if not reason:
            self._rebuild_at = None
            return
        if self._rebuild_at is None:
            self._rebuild_at = now
            logger.error("worker stuck: %s; rebuilding its consumer", reason)
            self.rebuild.set()
        elif now - self._rebuild_at > self.stuck_s:
            logger.critical("worker still stuck %.0f s after rebuilding its consumer (%s); "
                            "exiting with status %d so that the supervisor starts a fresh one",
                            now - self._rebuild_at, reason, EXIT_STUCK)
            self.give_up(reason)

    def _write(self, beat: liveness.Heartbeat) -> None:
        try:
            liveness.write_heartbeat(self.heartbeat_dir, beat)
            self._write_failed = False
        except OSError as exc:
            if not self._write_failed:  # once, not every second
                logger.error("cannot write the heartbeat file under %s (%s): health --worker "
                             "--local will report this worker as gone", self.heartbeat_dir,
                             exc.strerror or exc)
            self._write_failed = True

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run ``step`` every ``PROBE_INTERVAL_S`` in a daemon thread."""

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:  # the watchdog must outlive any surprise of its own
                    logger.exception("watchdog round failed")
                self._stop.wait(PROBE_INTERVAL_S)

        self._thread = threading.Thread(target=run, name="tpns-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        liveness.remove_heartbeat(self.heartbeat_dir, self.pid)


def exit_stuck(_reason: str = "") -> None:
    """The last resort: SIGKILL the pool's children, then leave with ``EXIT_STUCK`` at once.

    No warm shutdown: it would wait on the very loop that is stuck. Batches in flight come back
    when their lease expires, as after any crash.
    """
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception:  # best effort: the supervisor's stop kills what is left
        pass
    logging.shutdown()
    os._exit(EXIT_STUCK)


def consumer_tick(progress: Progress, rebuild: threading.Event) -> Callable[[], None]:
    """The consumer loop's heartbeat: notes the tick; when a rebuild was asked for, raises a
    connection error inside the loop so the consumer drops its connection and reconnects."""

    def tick() -> None:
        progress.loop_ticked()
        if rebuild.is_set():
            rebuild.clear()
            raise ConnectionResetError("tpns watchdog: rebuilding a stuck consumer")

    return tick


def attached(app: Any) -> tuple[Progress, threading.Event] | None:
    """The ``(progress, rebuild)`` pair attached to a Celery app by ``attach``, if any."""
    found: tuple[Progress, threading.Event] | None = getattr(app, "_tpns_liveness", None)
    return found


def attach(app: Any) -> tuple[Progress, threading.Event]:
    """Give a Celery app the shared progress and the rebuild flag (before the pool forks)."""
    pair = (Progress(), threading.Event())
    app._tpns_liveness = pair
    return pair
