"""Celery adapters that let a worker ride out broker outages in its own process (SPEC §3.7).

Out of the box a Celery 5 consumer that loses its Redis broker:

* reconnects on kombu's schedule: 2 s, then 2 s more per attempt up to 30 s between attempts, and
  gives up after ``broker_connection_max_retries`` (100): after a long outage the next attempt can
  be 30 s away, and after ~46 min the worker stops for good;
* can die while cleaning up the dead connection: closing the broken connection's channel restores
  its unacked messages through a transport that the collect step just detached, and the
  ``AttributeError("'NoneType' object has no attribute 'hostname'")`` it raises is not a
  connection error, so it ends the worker ("Unrecoverable error", celery #8030 and #10205; seen
  here with Celery 5.7 / kombu 5.7 on the first ``kill -9`` of Redis);
* logs one line per failed attempt.

``ResilientConsumer`` changes exactly that: no retry limit and at most ``RECONNECT_MAX_S`` between
attempts; a cleanup that cannot fail the worker; any other error of the consumer's blueprint (a
kombu bug surfacing as something else than a connection error) is treated like a lost connection
and the consumer is rebuilt, up to ``MAX_REBUILDS`` in ``REBUILD_WINDOW_S`` (past that the worker
exits non-zero, and the supervisor restarts it); a tick on the event loop feeds the watchdog and
lets it ask for a rebuild (``worker.watchdog.consumer_tick``). The outage itself is logged once by
the watchdog.

``QuietScheduler`` is beat's scheduler with one change: a wake-up that cannot be sent because the
broker is away is logged once per outage instead of once per second with a traceback (the sweep
it carries has nothing to do while the broker, which is usually the store too, is away).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from celery.beat import Scheduler
from celery.exceptions import WorkerShutdown, WorkerTerminate
from celery.worker.consumer import Consumer
from celery.worker.state import maybe_shutdown

from .store import UNREACHABLE
from .watchdog import attached, consumer_tick

logger = logging.getLogger(__name__)

#: blueprint states in which the consumer is being stopped (celery.bootsteps CLOSE, TERMINATE)
_STOPPING = (2, 3)

#: the longest wait between two attempts to reach the broker (the first is immediate)
RECONNECT_MAX_S = 0.5
#: rebuilds after an unexpected consumer error allowed in REBUILD_WINDOW_S before giving up
MAX_REBUILDS = 10
REBUILD_WINDOW_S = 60.0
#: how often the event loop ticks for the watchdog
TICK_S = 1.0
#: bound on the cleanup of a dead connection (its sockets may hang on a network cut)
COLLECT_TIMEOUT_S = 1.0


class ResilientConsumer(Consumer):
    """Celery's consumer with an in-process reconnect policy (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rebuilds: deque[float] = deque(maxlen=MAX_REBUILDS)
        #: when the event loop stopped for a lost connection (None: it runs)
        self._stalled_at: float | None = None

    def start(self) -> None:
        while True:
            try:
                super().start()
                return
            except (WorkerShutdown, WorkerTerminate, SystemExit, KeyboardInterrupt):
                raise
            except Exception as exc:
                if self.blueprint.state in _STOPPING:
                    raise
                now = time.monotonic()
                if (len(self._rebuilds) == MAX_REBUILDS
                        and now - self._rebuilds[0] < REBUILD_WINDOW_S):
                    logger.critical("the consumer failed %d times in %.0f s (last: %r); "
                                    "exiting non-zero for the supervisor to restart the worker",
                                    MAX_REBUILDS + 1, now - self._rebuilds[0], exc)
                    raise
                self._rebuilds.append(now)
                logger.warning("consumer failed (%r); rebuilding it in the process", exc)
                logger.debug("consumer failure", exc_info=exc)
                self.on_connection_error_after_connected(exc)
                self.on_close()
                cancel = getattr(self, "_cancel_connection_timer_entries", None)
                if cancel is not None:  # Celery >= 5.6: timer entries of the dead connection
                    cancel()
                self.blueprint.restart(self)

    def ensure_connected(self, conn: Any) -> Any:
        """Reach the broker: no retry limit, the first retry at once, then every
        ``RECONNECT_MAX_S`` at most; SIGTERM still stops the worker while it waits."""

        def errback(exc: BaseException, interval: float) -> None:
            # the watchdog logs the outage once; one line per attempt would flood the log
            logger.debug("broker unreachable (%r); next attempt in %.2f s", exc, interval)

        conn = conn.ensure_connection(errback, None, interval_start=0,
                                      interval_step=RECONNECT_MAX_S / 2,
                                      interval_max=RECONNECT_MAX_S, callback=maybe_shutdown)
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        if self._stalled_at is not None:
            self._postpone_timers(time.monotonic() - self._stalled_at)
            self._stalled_at = None
        return conn

    def _postpone_timers(self, seconds: float) -> None:
        """Shift the event loop's timers by the time it stood still while reconnecting.

        Reconnecting blocks the main thread, so the pool's children's results are not read
        meanwhile; the hard time limit of a task that finished early in a long outage would
        otherwise fire on the first turn of the loop (timers run before reading results) and
        kill a pool process that is only waiting to be heard. Time stood still for the loop,
        so its timers move by as much (adding a constant keeps the heap ordered).
        """
        timer = getattr(getattr(self, "hub", None), "timer", None)
        queue = getattr(timer, "_queue", None)
        if seconds <= 0 or not isinstance(queue, list):
            return
        queue[:] = [entry._replace(eta=entry.eta + seconds) for entry in queue]

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        """Drop the dead connection without letting its cleanup end the worker."""
        logger.debug("broker connection lost: %r", exc)
        if self._stalled_at is None:
            self._stalled_at = time.monotonic()
        connection, self.connection = self.connection, None
        if connection is None:
            return
        try:
            # releases the sockets without a round trip (the broker may be gone); no close()
            # after it: that is the call that fails once collect detached the transport
            connection.collect(socket_timeout=COLLECT_TIMEOUT_S)
        except Exception as err:  # the connection is dropped either way
            logger.debug("cleanup of the lost broker connection failed: %r", err)

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        pair = attached(self.app)
        if pair is not None:
            progress, rebuild = pair
            progress.loop_ticked()
            hub.call_repeatedly(TICK_S, consumer_tick(progress, rebuild))


class QuietScheduler(Scheduler):
    """Beat's in-memory scheduler, logging a broker outage once instead of every second."""

    _broker_down = False

    def _ensure_connected(self) -> Any:
        # beat's producer connection: kombu's 2 s, 4 s, ... schedule and a line per attempt
        # otherwise; the same policy as the consumer's instead
        def errback(exc: BaseException, interval: float) -> None:
            if not self._broker_down:
                logger.warning("beat: broker unreachable (%r); trying again every %g s", exc,
                               RECONNECT_MAX_S)
            self._broker_down = True

        connection: Any = self.connection  # kombu's stubs want ints; floats are fine
        return connection.ensure_connection(errback, None, interval_start=0,
                                            interval_step=RECONNECT_MAX_S / 2,
                                            interval_max=RECONNECT_MAX_S)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        try:
            self.apply_async(entry, producer=producer, advance=False)
        except Exception as exc:
            if not self._broker_down:
                logger.warning("beat: cannot send %s while the broker is unreachable (%r); "
                               "trying again every second", entry.name, exc)
            self._broker_down = True
        else:
            if self._broker_down:
                logger.info("beat: the broker takes scheduled tasks again")
            self._broker_down = False


class LostAckFilter(logging.Filter):
    """kombu logs an ack lost to a broker outage at CRITICAL with a traceback, once per task
    received just before the outage. Here that is harmless (the message is restored when the
    broker is back and the wake runs again: flushing is idempotent), so it becomes one warning
    line; the outage itself is logged by the watchdog."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (isinstance(record.msg, str) and record.msg.startswith("Couldn't ack")
                and record.exc_info and isinstance(record.exc_info[1], (*UNREACHABLE,))):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
            record.msg += " (broker away: the wake is restored and runs again)"
        return True


def quiet_outage_logs() -> None:
    """Install ``LostAckFilter`` where Celery logs acks (the worker's request logger)."""
    logging.getLogger("celery.worker.request").addFilter(LostAckFilter())
