"""The benchmark's run of the naive design (worker/tools/naive.py): the same stack, workers and
gate as the real design, one Celery task and one HTTP call per intent (SPEC §10)."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

from ..intents import validate
from ..producer import Producer, new_id
from ..settings import Settings
from .ceiling import baseline_default
from .harness import (
    GATE_QUEUE,
    NAIVE_CONCURRENCY,
    BenchConfig,
    Reporter,
    alive_or_raise,
    bench_intents,
    close_gate,
    hostnames,
    open_gate,
    wait_control,
)
from .naive import NAIVE_TASK, done_key, make_naive_celery, task_args
from .stack import SandboxProcess, StackRedis, WorkerProcess

#: default cap of the baseline's backlog
BASELINE_MAX_INTENTS = 2000


class NaiveBaseline:
    """One baseline run: start the workers, warm them up, publish, drain, measure."""

    def __init__(self, config: BenchConfig, workdir: Path, redis: StackRedis,
                 sandbox: SandboxProcess, report: Reporter, env: dict[str, str],
                 settings: Settings) -> None:
        self.config = config
        self.redis = redis
        self.sandbox = sandbox
        self.report = report
        self.settings = settings
        self.count = config.baseline_intents or baseline_default(
            config.intents, config.latency_ms, BASELINE_MAX_INTENTS)
        self.names = hostnames("naive", config.workers, redis.prefix)
        concurrency = (["--concurrency", str(config.concurrency)] if config.concurrency
                       else ["--concurrency", str(NAIVE_CONCURRENCY)])
        self.procs = [WorkerProcess([sys.executable, "-m", "worker.tools.naive", "worker",
                                     "--hostname", name, "-Q", GATE_QUEUE,
                                     "--loglevel", "WARNING", *concurrency],
                                    env, workdir / f"naive{k}.log")
                      for k, name in enumerate(self.names)]
        self.app = make_naive_celery(settings, redis.url, redis.prefix)
        self.queue = f"{redis.prefix}naive"
        # the warm-up has a queue of its own: the drain then adds a queue the workers never
        # consumed, instead of re-adding a cancelled one (kombu may apply a cancel late, after
        # its read, and drop a queue added again in between: the drain would never start)
        self.warm_queue = f"{redis.prefix}naive-warm"
        self.counter = done_key(redis.prefix)

    def run(self) -> dict[str, Any]:
        """The ``baseline_*`` figures."""
        client = Producer(self.redis.url, self.redis.prefix, settings=self.settings).redis
        try:
            self._start_workers()
            self._warm_up(client)
            publish_s = self._publish()
            drain_s = self._drain(client)
        finally:
            client.close()
            for proc in self.procs:
                proc.stop()
        return {"baseline_intents": self.count,
                "baseline_enqueue_per_s": round(self.count / publish_s, 1),
                "baseline_drain_per_s": round(self.count / drain_s, 1),
                "baseline_api_calls": self.sandbox.stats()["calls"]}

    def _start_workers(self) -> None:
        self.report.phase(f"baseline: starting {self.config.workers} naive worker process(es)")
        for proc in self.procs:
            proc.start()
        wait_control(self.app, self.names, 90.0, self.procs)

    def _warm_up(self, client: Any) -> None:
        warm = self.config.workers * 40 * (self.config.concurrency or NAIVE_CONCURRENCY) // 20 * 2
        self.report.phase(f"baseline: warming the workers up ({warm} tasks, not measured)")
        open_gate(self.app, self.warm_queue, self.names)
        for k in range(warm):
            self.app.send_task(NAIVE_TASK, args=[new_id(), 4, f"warm-{k:035d}", []],
                               queue=self.warm_queue)
        self.report.waiting("baseline warm-up", warm, lambda: int(client.get(self.counter) or 0),
                            timeout_s=120.0, on_poll=lambda: alive_or_raise(self.procs))
        close_gate(self.app, self.warm_queue, self.names)
        client.delete(self.counter)

    def _publish(self) -> float:
        """Seconds to publish one task per intent (validated as the real design validates)."""
        apps = frozenset(self.settings.apps)
        intents = [validate(obj, apps, self.settings.default_app)
                   for obj in bench_intents(self.count, None, random.Random(3))]
        self.report.phase(f"baseline: publishing {self.count} tasks (one per intent)")
        started = time.perf_counter()
        with self.app.producer_or_acquire() as publisher:
            for intent in intents:
                self.app.send_task(NAIVE_TASK, args=task_args(new_id(), intent),
                                   queue=self.queue, producer=publisher)
        return time.perf_counter() - started

    def _drain(self, client: Any) -> float:
        """Seconds from opening the gate until every task has finished."""
        self.sandbox.reset()
        self.report.phase("baseline: draining")
        started = time.monotonic()
        open_gate(self.app, self.queue, self.names)
        try:
            ended = self.report.waiting("baseline drain", self.count,
                                        lambda: int(client.get(self.counter) or 0),
                                        timeout_s=max(120.0, self.count / 5),
                                        on_poll=lambda: alive_or_raise(self.procs))
        except TimeoutError as exc:  # what the workers said is what tells why
            tails = "\n".join(f"{p.log_path}:\n{p.log()[-1500:]}" for p in self.procs)
            raise TimeoutError(f"{exc}\n{tails}") from exc
        return ended - started
