"""The Celery adapters of worker/consumer.py, in the parts that can be checked without a worker.

The consumer's reconnect policy and rebuilds run for real in tests/integration/test_outages.py
(Redis SIGKILLed mid-drain, a Sentinel failover, a stuck consumer).
"""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import redis
from kombu.asynchronous.timer import Timer

from worker.consumer import LostAckFilter, ResilientConsumer


def test_timers_move_by_the_time_the_loop_stood_still() -> None:
    timer = Timer()
    try:
        first = timer.call_after(5, print)
        second = timer.call_after(1, print)
        before = {id(e.entry): e.eta for e in timer._queue}
        ResilientConsumer._postpone_timers(SimpleNamespace(hub=SimpleNamespace(timer=timer)), 60.0)
        after = {id(e.entry): e.eta for e in timer._queue}
        assert {k: round(after[k] - before[k], 6) for k in before} == {id(first): 60.0,
                                                                      id(second): 60.0}
        assert timer._queue[0].entry is second  # still a heap: the earliest first
    finally:
        timer.stop()


def _record(msg: str, exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("celery.worker.request", logging.CRITICAL, __file__, 1, msg,
                             ("tag", exc), info)


def test_an_ack_lost_to_an_outage_becomes_one_warning_line() -> None:
    record = _record("Couldn't ack %r, reason:%r", redis.ConnectionError("Connection closed"))
    assert LostAckFilter().filter(record)
    assert (record.levelname, record.exc_info) == ("WARNING", None)
    assert record.getMessage().endswith("(broker away: the wake is restored and runs again)")


def test_other_critical_lines_are_left_alone() -> None:
    record = _record("Couldn't ack %r, reason:%r", ValueError("a bug"))
    assert LostAckFilter().filter(record)
    assert record.levelname == "CRITICAL" and record.exc_info is not None
