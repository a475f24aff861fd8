"""RabbitMQ as the Celery broker, Redis still the store (SPEC §2, issue 7 "scaling out").

Runs when a RabbitMQ server answers on 127.0.0.1:5672 (guest/guest), is skipped with the reason
otherwise. The queue is ``<prefix>flush``, unique to the test, and is deleted afterwards.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from worker.sandbox.server import SandboxServer

from .conftest import MakeProducer, StartWorker

pytestmark = pytest.mark.e2e

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
BROKER_URL = os.environ.get("TPNS_TEST_AMQP_URL", f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}//")


def _reachable() -> str | None:
    try:
        with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=0.5):
            return None
    except OSError as exc:
        return f"no RabbitMQ on {AMQP_HOST}:{AMQP_PORT} ({exc.strerror or exc})"


@pytest.fixture
def amqp_queue(prefix: str) -> Iterator[str]:
    """The test's queue name; the queue and its exchange are deleted when the test ends."""
    reason = _reachable()
    if reason:
        pytest.skip(reason)
    name = f"{prefix}flush"
    yield name
    with Connection(BROKER_URL, connect_timeout=5) as conn:
        channel: Any = conn.channel()  # an amqp Channel (kombu's stub types only StdChannel)
        try:
            channel.queue_delete(name)
            channel.exchange_delete(name)
        finally:
            channel.close()


def test_rabbitmq_broker_with_redis_store(amqp_queue: str, sandbox: SandboxServer,
                                          start_worker: StartWorker,
                                          make_producer: MakeProducer) -> None:
    worker = start_worker(sandbox, name="amqp", CELERY_BROKER_URL=BROKER_URL)
    worker.wait_ready(timeout_s=30)
    assert "amqp://" in worker.log() and amqp_queue in worker.log()
    producer = make_producer(CELERY_BROKER_URL=BROKER_URL)
    ids = producer.submit_many(
        [{"operator_type": 2, "token": f"amqp-{k:03d}", "account_list": [{"account": f"u{k}"}]}
         for k in range(200)])
    assert None not in ids
    statuses = producer.wait([i for i in ids if i], timeout_s=30)
    assert {s.state for s in statuses if s} == {"succeeded"}
    # the wakes went through RabbitMQ: the Redis broker keys under the prefix were never made
    keys = list(producer.redis.scan_iter(match=f"{producer.store.prefix}celery:*", count=1000))
    assert keys == []
    assert "tpns.flush" in worker.log()
