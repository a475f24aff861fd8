"""A broker-only outage is not the producer's problem (SPEC §3.7): the intents are stored, the
wake-ups are not sent, and a real worker's sweep wakes their queues and drains them."""

from __future__ import annotations

import logging

import pytest

from worker.sandbox.server import SandboxServer
from worker.tools.drill import free_port

from .conftest import MakeProducer, StartWorker

pytestmark = pytest.mark.e2e


def test_intents_stored_while_the_producers_broker_is_dead_are_drained_by_the_sweep(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer,
        caplog: pytest.LogCaptureFixture) -> None:
    worker = start_worker(sandbox)  # its broker is the test's Redis, and it works
    worker.wait_ready()
    producer = make_producer(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="worker.producer"):
        ids = [producer.submit({"operator_type": 4, "token": f"broker-{k}"}) for k in range(30)]
    assert sum("broker is unreachable" in r.getMessage() for r in caplog.records) == 1
    statuses = producer.wait(ids, timeout_s=60)
    assert [s.state for s in statuses if s] == ["succeeded"] * 30
