"""Fixtures for end-to-end tests: an in-process sandbox, worker processes, producers.

A worker is the real ``tpns-batcher worker`` command in its own process group (Celery prefork pool
and embedded beat), talking to the real Redis under the test's prefix and to the sandbox over a real
socket. Its log goes to a file under ``tmp_path``, printed when the test fails.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings

from .helpers import wait_until

#: the console script next to the interpreter running the tests (the project's virtualenv)
WORKER_COMMAND = str(Path(sys.executable).with_name("tpns-batcher"))
#: environment variables of the product; the test's own values replace whatever the shell has
_PRODUCT_VARS = ("TPNS_", "REDIS_URL", "CELERY_")


@dataclass
class WorkerProcess:
    """One ``tpns-batcher worker`` process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log_file: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until Celery reports the worker ready (its pool is up and consuming)."""
        wait_until(lambda: " ready." in self.log() or self.proc.poll() is not None, timeout_s,
                   message=f"worker {self.name} ready")
        assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.log()[-4000:]}"

    def kill(self) -> None:
        """SIGKILL the whole group (main process, pool children, beat): a crash, nothing runs on."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self._close()

    def terminate(self) -> None:
        """SIGTERM to the main process only: Celery's warm shutdown."""
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._close()
        return code

    def _close(self) -> None:
        # children left behind by an unclean exit of the main process
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def product_env(redis_url: str | None, prefix: str, **extra: str) -> dict[str, str]:
    """The settings every party of a test shares (prefix, Redis, a short linger and lease).
    ``redis_url`` None: no ``REDIS_URL``, the embedded Redis of ``TPNS_DATA_DIR``."""
    env = {"TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "50", "TPNS_LEASE_S": "3",
           "TPNS_HTTP_TIMEOUT_S": "0.75"}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(seed=4).start()
    try:
        yield server
    finally:
        server.stop()


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
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            [WORKER_COMMAND, "worker", "--concurrency", str(concurrency),
             "--hostname", f"{name}-{prefix.rstrip(':').replace(':', '-')}@%h"],
            env=env, cwd=self.tmp_path, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True)
        worker = WorkerProcess(name, proc, log_path, log_file)
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
