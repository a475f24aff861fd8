"""Fixtures for end-to-end tests: worker processes and producers.

A worker is the real ``tpns-batcher worker`` command in its own process group (Celery prefork pool
and embedded beat), started by ``worker.tools.stack.WorkerProcess`` as ``demo`` and ``bench`` start
theirs, talking to the real Redis under the test's prefix and to the sandbox (the shared fixture of
``tests/conftest.py``) over a real socket. Its log goes to a file under ``tmp_path``, printed when
the test fails.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings
from worker.tools.stack import WorkerProcess

#: the console script next to the interpreter running the tests (the project's virtualenv)
WORKER_COMMAND = str(Path(sys.executable).with_name("tpns-batcher"))
#: environment variables of the product; the test's own values replace whatever the shell has
_PRODUCT_VARS = ("TPNS_", "REDIS_URL", "CELERY_")


def product_env(redis_url: str | None, prefix: str, **extra: str) -> dict[str, str]:
    """The settings every party of a test shares (prefix, Redis, a short linger and lease).
    ``redis_url`` None: no ``REDIS_URL``, the embedded Redis of ``TPNS_DATA_DIR``."""
    env = {"TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "50", "TPNS_LEASE_S": "3",
           "TPNS_HTTP_TIMEOUT_S": "0.75"}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


StartWorker = Callable[..., WorkerProcess]


class Launcher:
    """Starts ``tpns-batcher worker`` process groups for one test; when the test ends they are all
    SIGKILLed, and their logs are printed if it failed."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.tmp_path = tmp_path
        self.request = request
        self.started: list[WorkerProcess] = []

    def start(self, redis_url: str | None, prefix: str, sandbox: SandboxServer, name: str = "w1",
              concurrency: int = 2, **env_extra: str) -> WorkerProcess:
        """One worker on ``redis_url`` (store and, unless ``CELERY_BROKER_URL`` is given, broker);
        None: the embedded Redis of ``TPNS_DATA_DIR`` (give a short one: it holds a socket)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRODUCT_VARS)}
        env_extra = {"TPNS_DATA_DIR": str(self.tmp_path / "data"), **env_extra}
        env.update(product_env(redis_url, prefix, TPNS_BASE_URL=sandbox.url, **env_extra))
        argv = [WORKER_COMMAND, "worker", "--concurrency", str(concurrency),
                "--hostname", f"{name}-{prefix.rstrip(':').replace(':', '-')}@%h"]
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        worker = WorkerProcess(argv, env, log_path, name=name, cwd=self.tmp_path).start()
        self.started.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.started:
            worker.kill()
        report = getattr(self.request.node, "rep_call", None)
        if report is None or report.failed:
            for worker in self.started:
                print(f"----- log of worker {worker.name} ({worker.log_path}) -----")
                print(worker.log()[-20_000:])


@pytest.fixture
def launcher(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    """Worker processes for this test, on any Redis URL it names."""
    workers = Launcher(tmp_path, request)
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def start_worker(redis_url: str, prefix: str, launcher: Launcher) -> StartWorker:
    """``start_worker(sandbox, name="w1", concurrency=2, **env)``: a worker on the test's Redis
    and prefix."""
    return functools.partial(launcher.start, redis_url, prefix)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


MakeProducer = Callable[..., Producer]


@pytest.fixture
def make_producer(redis_url: str, prefix: str) -> Iterator[MakeProducer]:
    """``make_producer(**env)``: a Producer on the test's prefix whose wakes are real Celery
    messages to the workers' queue."""
    made: list[Producer] = []

    def make(**env_extra: str) -> Producer:
        settings = Settings.from_env(product_env(redis_url, prefix, **env_extra))
        producer = Producer(redis_url, prefix, settings=settings)
        made.append(producer)
        return producer

    yield make
    for producer in made:
        waker = getattr(producer, "_wake", None)
        app = getattr(waker, "_app", None)
        if app is not None:
            app.close()
        producer.close()
