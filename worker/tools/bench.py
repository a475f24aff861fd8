"""``tpns-batcher bench``: the whole path on this machine, against the naive design (SPEC §10).

One invocation runs, in order:

1. **Stack.** A private Redis (``start_private``; with ``REDIS_URL`` set, that server under a fresh
   prefix, and then the memory figures also hold other clients' writes), the sandbox with the given
   latency, and W real ``tpns-batcher worker`` processes (prefork pool, ``--concurrency C`` each,
   beat embedded). The workers start consuming a placeholder queue only, so that nothing is drained
   before the benchmark says so; it then adds the real queue with Celery's ``add_consumer``
   remote-control command (the same gate for both designs).
2. **Enqueue** N intents with ``Producer.submit_many`` (validation, the store's Lua, and the wake
   hook live: Celery wake messages are sent) -> ``enqueue_per_s``. The ``used_memory`` delta
   (client buffers left out) over the N pending intents (records, queues, key index, history
   index, counters, wakes) -> ``redis_bytes_per_pending_intent``.
3. **Drain**, between two halves of the **ceiling** (``worker/tools/ceiling.py``: a bare client
   keeping many calls of 20 in flight against the same sandbox, just before and just after the
   drain, so that load drifting meanwhile moves both) -> ``ceiling_per_s`` (their mean),
   ``ceiling_before_per_s``, ``ceiling_after_per_s``, ``drain_to_ceiling``. The drain: the gate
   opens and the clock runs until every intent is terminal -> ``drain_per_s``;
   the sandbox's per-call record over the drain -> ``api_calls``, ``items_per_call``; psutil over
   the worker process trees, sampled while draining -> ``worker_rss_mb`` (the peak).
4. **Latency at light load**: intents submitted one at a time at ``--light-rate`` per second for
   ``--light-seconds``; enqueue -> terminal from each status's ``created_at``/``updated_at`` (both
   stamped by Redis' clock) -> ``latency_p50_ms``, ``latency_p99_ms``.
With ``--verify``, steps 1-4 run again with ``TPNS_VERIFY=on`` on the same Redis and sandbox ->
``verify_drain_per_s``, ``verify_drain_ratio`` (over the run without), ``query_calls_per_intent``
(the sandbox's query count over the intents drained) and ``verify_latency_p50_ms`` /
``verify_latency_p99_ms`` (accepted -> verified adds about the first check's delay).

5. **Baseline** (``worker/tools/baseline.py``): the same number of worker processes, pool and
   concurrency of the naive design (``worker/tools/naive.py``: one Celery task and one HTTP call
   per intent) on the same Redis and sandbox, ``baseline_intents`` = min(N, 2000) by default
   (rates are comparable; a smaller backlog keeps the run short) -> ``baseline_drain_per_s`` and
   ``speedup``.
6. **Memory** (``worker/tools/memory.py``): N intents stored and completed as succeeded with the
   ``Store`` directly, under a fresh prefix deleted after, as after their detail period ->
   ``redis_bytes_per_terminal_intent``, and the capped events stream apart (a fixed cost) ->
   ``redis_events_bytes_per_intent``.

Intents: a mix of operator types like real traffic (55 % bind with override, 20 % unbind, 12 %
uninstall, 8 % account deletion, 5 % append bind), 64-hex tokens and e-mail accounts.
``--tokens T`` sets how many distinct tokens they use (default: one each, so no two intents share a
key); fewer tokens chain intents through per-key order, which lowers items per call by design.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..celery_app import make_celery
from ..model import OPERATOR_TYPES, TERMINAL_STATES
from ..producer import Producer
from ..settings import Settings
from ..store import Store
from .baseline import BASELINE_MAX_INTENTS, NaiveBaseline
from .ceiling import CEILING_CALLS, Ceiling, ceiling_figures, in_flight_met, in_flight_targets, measure_ceiling
from .harness import (
    GATE_QUEUE,
    VERIFY_FIGURES,
    BenchConfig,
    Reporter,
    bench_intents,
    cli_concurrency,
    close_gate,
    hostnames,
    open_gate,
    verify_figures,
    wait_control,
    warm_count,
)
from .measure import machine, own_cpu_s, percentile, redis_cpu_s, tree_cpu_s, tree_rss_mb
from .memory import MEMORY_TARGETS, data_memory, memory_figures, memory_met
from .stack import SandboxProcess, StackRedis, WorkerProcess, local_redis, product_settings_env, stack_env

# Re-exported: tests and tools import these from here.
__all__ = ["BenchConfig", "Reporter", "bench_command", "bench_intents", "machine", "percentile",
           "run_bench", "targets"]


def _done_count(store: Store) -> int:
    return sum(store.counters([f"done_{s}:{op}" for s in TERMINAL_STATES for op in OPERATOR_TYPES]).values())


class Bench:
    """One benchmark run over one stack (see the module docstring for the phases)."""

    def __init__(self, config: BenchConfig, workdir: Path, redis: StackRedis,
                 sandbox: SandboxProcess, report: Reporter) -> None:
        self.config = config
        self.workdir = workdir
        self.redis = redis
        self.sandbox = sandbox
        self.report = report
        self.concurrency_args = ([] if config.concurrency is None
                                 else ["--concurrency", str(config.concurrency)])
        self.env = stack_env(redis, sandbox.url, TPNS_LINGER_MS=str(config.linger_ms))
        self.settings = Settings.from_env(product_settings_env(self.env))
        self.results: dict[str, Any] = {}

    # -- the real design ---------------------------------------------------------------------

    def run_batched(self, kind: str = "bench") -> None:
        names = hostnames(kind, self.config.workers, self.redis.prefix)
        procs = [WorkerProcess.cli_worker(self.env, self.workdir / f"worker{k}.log",
                                          "--hostname", name, "-Q", GATE_QUEUE,
                                          *self.concurrency_args)
                 for k, name in enumerate(names)]
        control = make_celery(self.settings, self.redis.url, self.redis.prefix)
        producer = Producer(self.redis.url, self.redis.prefix, settings=self.settings)
        try:
            self._start_workers(control, procs, names)
            self._warm_up(control, producer, names)
            total = self._enqueue(producer)
            before = self._ceiling("before") if kind == "bench" else None
            self._drain(control, producer.store, procs, names, total)
            if before is not None:
                self.results.update(ceiling_figures(before, self._ceiling("after"),
                                                    self.results["drain_per_s"]))
            self._light_latency(producer)
        finally:
            producer.close()
            for proc in procs:
                proc.stop()

    def _start_workers(self, control: Any, procs: Sequence[WorkerProcess],
                       names: Sequence[str]) -> None:
        self.report.phase(f"starting {self.config.workers} worker process(es) "
                          f"({' '.join(self.concurrency_args) or 'default concurrency'})")
        for proc in procs:
            proc.start()
        wait_control(control, names, 90.0, procs)

    def _ceiling(self, when: str) -> Ceiling:
        self.report.phase(f"ceiling {when} the drain: a bare client, many calls in flight")
        return measure_ceiling(self.sandbox.url, CEILING_CALLS // 2)

    def _enqueue(self, producer: Producer) -> int:
        """Enqueue the run's intents behind the closed gate; returns how many."""
        config = self.config
        intents = bench_intents(config.intents, config.tokens, random.Random(1))
        producer.apps()
        mem_before = data_memory(producer.redis)
        self.report.phase(f"enqueueing {config.intents} intents (submit_many, wakes live)")
        started = time.perf_counter()
        ids = [i for i in producer.submit_many(intents) if i is not None]
        enqueue_s = time.perf_counter() - started
        mem_after = data_memory(producer.redis)
        if len(ids) != config.intents:
            raise RuntimeError(f"{config.intents - len(ids)} intents were refused")
        self.results.update(
            intents=len(ids), enqueue_per_s=round(len(ids) / enqueue_s, 1),
            redis_bytes_per_pending_intent=round((mem_after - mem_before) / len(ids), 1),
            redis_private=self.redis.private)
        return len(ids)

    def _warm_up(self, control: Any, producer: Producer, names: Sequence[str]) -> None:
        count = warm_count(self.config, self.settings.max_in_flight)
        self.report.phase(f"warming the workers up ({count} intents, not measured)")
        queue = self.redis.prefix + "flush"
        open_gate(control, queue, names)
        ids = [i for i in producer.submit_many(
            [{"operator_type": 4, "token": f"warm-{k:035d}"} for k in range(count)]) if i]
        producer.wait(ids, timeout_s=120.0)
        close_gate(control, queue, names)
        # delayed (linger) wakes already held by the workers fire, find nothing, and are done
        time.sleep(self.config.linger_ms / 1000 + 0.5)

    def _drain(self, control: Any, store: Store, procs: Sequence[WorkerProcess],
               names: Sequence[str], total: int) -> None:
        self.sandbox.reset()
        total += _done_count(store)  # the warm-up's
        rss = [0.0]
        pids = [p.pid for p in procs]

        def sample() -> None:
            rss[0] = max(rss[0], tree_rss_mb(pids))

        self.report.phase("draining")
        sandbox_pid = [self.sandbox.proc.pid]
        cpu = (tree_cpu_s(pids), redis_cpu_s(store.redis), tree_cpu_s(sandbox_pid), own_cpu_s())
        started = time.monotonic()
        open_gate(control, self.redis.prefix + "flush", names)
        ended = self.report.waiting("drain", total, lambda: _done_count(store),
                                    timeout_s=max(120.0, total / 50), on_poll=sample)
        cpu_after = (tree_cpu_s(pids), redis_cpu_s(store.redis), tree_cpu_s(sandbox_pid),
                     own_cpu_s())
        sample()
        drain_s = ended - started
        sandbox = self.sandbox.stats()
        sizes = sandbox["items_per_call"]
        counters = store.counters()
        metrics = store.call_metrics()
        timed = sum(v for k, v in metrics.items() if k.startswith("lat:"))
        self.results.update(
            drain_s=round(drain_s, 3), drain_per_s=round(total / drain_s, 1),
            api_calls=sandbox["calls"], queries=sandbox["queries"],
            in_flight_max=sandbox.get("in_flight_max", 0),
            items_per_call=round(sandbox["items"] / sandbox["calls"], 2) if sandbox["calls"] else 0.0,
            full_calls_share=round(sum(1 for s in sizes if s == 20) / len(sizes), 3) if sizes else 0.0,
            failed=sum(counters.get(f"done_failed:{op}", 0) for op in range(1, 6)),
            worker_rss_mb=round(rss[0], 1),
            # one HTTP round trip as the workers timed it, sandbox latency included
            call_ms_mean=round(metrics.get("lat_sum_ms", 0.0) / timed, 1) if timed else 0.0,
            # where the CPU went while draining (seconds; 2 cores give 2 s per wall second)
            drain_cpu_s={name: round(after - before, 2) for name, before, after in zip(
                ("workers", "redis", "sandbox", "bench"), cpu, cpu_after, strict=True)})

    def _light_latency(self, producer: Producer) -> None:
        config = self.config
        count = max(1, int(config.light_rate * config.light_seconds))
        intents = bench_intents(count, None, random.Random(2))
        self.report.phase(f"light load: {count} intents one at a time at "
                          f"{config.light_rate:g}/s")
        ids: list[str] = []
        interval = 1.0 / config.light_rate
        started = time.monotonic()
        for k, intent in enumerate(intents):
            pause = started + k * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            ids.append(producer.submit(intent))
        producer.wait(ids, timeout_s=60.0)
        # (None cannot happen: statuses live for TPNS_STATUS_TTL_S)
        latencies = [t[1] - t[0] for t in producer.store.timings(ids) if t is not None]
        self.results.update(
            latency_intents=count, latency_rate_per_s=config.light_rate,
            latency_p50_ms=round(percentile(latencies, 50), 1),
            latency_p99_ms=round(percentile(latencies, 99), 1))

    def run_verified(self) -> None:
        """Steps 1-4 again with TPNS_VERIFY=on; the plain run's figures stay as they were."""
        plain, delay = dict(self.results), self.config.verify_delay_ms
        self.env = {**self.env, "TPNS_VERIFY": "on", "TPNS_VERIFY_DELAY_MS": str(delay)}
        self.settings = Settings.from_env(product_settings_env(self.env))
        self.report.phase(f"again with TPNS_VERIFY=on (first check after {delay} ms)")
        self.run_batched("benchv")
        self.results = plain | verify_figures(plain, self.results, delay)

    # -- the naive design --------------------------------------------------------------------

    def run_baseline(self) -> None:
        self.results.update(NaiveBaseline(self.config, self.workdir, self.redis, self.sandbox,
                                          self.report, self.env, self.settings).run())


def targets(config: BenchConfig) -> dict[str, float]:
    """SPEC §10's targets for this run's linger and sandbox latency (memory: ``MEMORY_TARGETS``)."""
    return {"speedup_min": 10.0, "items_per_call_min": 19.5,
            "latency_p99_ms_max": config.linger_ms + 3 * config.latency_ms + 50, **MEMORY_TARGETS}


def targets_met(results: dict[str, Any], goal: dict[str, float]) -> dict[str, bool]:
    return {
        "speedup": results["speedup"] >= goal["speedup_min"],
        "items_per_call": results["items_per_call"] >= goal["items_per_call_min"],
        "latency_p99_ms": results["latency_p99_ms"] <= goal["latency_p99_ms_max"],
        **memory_met(results),
    }


def run_bench(config: BenchConfig, report: Reporter) -> dict[str, Any]:
    """Run every phase; returns the figures (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="tpns-bench-") as tmp, \
            local_redis(Path(tmp), "bench") as redis_target:
        sandbox = SandboxProcess("--latency-ms", f"{config.latency_ms:g}")
        try:
            bench = Bench(config, Path(tmp), redis_target, sandbox, report)
            report.phase(f"redis {redis_target.url} · sandbox {sandbox.url} "
                         f"({config.latency_ms:g} ms latency)")
            bench.run_batched()
            bench.results.update(max_in_flight=bench.settings.max_in_flight)
            if config.verify:
                bench.run_verified()
            bench.run_baseline()
            report.phase(f"memory: {config.intents} intents stored and completed (Store only)")
            bench.results.update(memory_figures(redis_target.url))
            results = bench.results
            info = machine(redis_target.url)
        finally:
            sandbox.stop()
    results["speedup"] = round(results["drain_per_s"] / results["baseline_drain_per_s"], 2)
    ordered: dict[str, Any] = {
        "intents": results["intents"], "tokens": config.tokens or config.intents,
        "sandbox_latency_ms": config.latency_ms, "linger_ms": config.linger_ms,
        "workers": config.workers,
        "concurrency": config.concurrency or cli_concurrency(),
        "max_in_flight": results["max_in_flight"],
        **{k: results[k] for k in (
            "enqueue_per_s", "drain_s", "drain_per_s", "api_calls", "items_per_call",
            "full_calls_share", "failed", "latency_p50_ms", "latency_p99_ms", "latency_intents",
            "latency_rate_per_s", "redis_bytes_per_pending_intent",
            "redis_bytes_per_terminal_intent", "redis_events_bytes_per_intent", "redis_private",
            "worker_rss_mb", "in_flight_max", "ceiling_per_s", "ceiling_before_per_s",
            "ceiling_after_per_s", "ceiling_in_flight",
            "drain_to_ceiling", "call_ms_mean", "drain_cpu_s", "baseline_intents", "baseline_enqueue_per_s",
            "baseline_drain_per_s", "baseline_api_calls", "speedup")},
    }
    if config.verify:
        ordered.update({k: results[k] for k in VERIFY_FIGURES})
    goal = targets(config)
    real = in_flight_targets(config.latency_ms)
    ordered["targets"] = {**goal, **real}
    ordered["targets_met"] = {**targets_met(ordered, goal), **in_flight_met(ordered, real)}
    ordered["machine"] = info
    return ordered


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title="tpns-batcher bench", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    goal, met = results["targets"], results["targets_met"]
    # every target is "<figure>_min" or "<figure>_max"
    marks = {key[:-4]: (">= " if key.endswith("_min") else "<= ") + f"{value:g}"
             for key, value in goal.items()}
    for key, value in results.items():
        if key in ("targets", "targets_met", "machine"):
            continue
        target = ""
        if key in marks:
            target = marks[key] + ("  [green]met[/]" if met[key] else "  [red]missed[/]")
        table.add_row(key, str(value), target)
    table.add_row("machine", ", ".join(f"{k} {v}" for k, v in results["machine"].items()), "")
    return table


@click.command("bench")
@click.option("--intents", "count", type=click.IntRange(20, 1_000_000), default=20_000,
              show_default=True, help="Intents enqueued and drained.")
@click.option("--tokens", type=click.IntRange(1, None), default=None,
              help="Distinct tokens the intents use [default: one per intent]; fewer make "
                   "intents share keys, which per-key order serialises.")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Latency the sandbox adds to every call.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (each a Celery prefork pool; the baseline gets the same).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=None,
              help="Task threads per worker (its calls in flight are TPNS_MAX_IN_FLIGHT) and "
                   "pool processes of the naive design (one call in flight each) [default: the "
                   "worker's own default, 8 threads; 4 naive processes].")
@click.option("--light-seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Length of the light-load latency phase.")
@click.option("--light-rate", type=click.FloatRange(min=1), default=200.0, show_default=True,
              help="Intents per second in the latency phase.")
@click.option("--baseline-intents", type=click.IntRange(20, None), default=None,
              help=f"Intents for the naive baseline [default: min(--intents, "
                   f"{BASELINE_MAX_INTENTS})].")
@click.option("--ingest", is_flag=True, help="Measure the doors instead (tools/ingest.py).")
@click.option("--ingest-seconds", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Length of each --ingest phase.")
@click.option("--verify", is_flag=True,
              help="Drain again with TPNS_VERIFY=on (first check after TPNS_VERIFY_DELAY_MS, "
                   "default 1000) and report query calls per intent and the drain ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def bench_command(count: int, tokens: int | None, latency_ms: float, workers: int,
                  concurrency: int | None, light_seconds: float, light_rate: float,
                  baseline_intents: int | None, ingest: bool, ingest_seconds: float,
                  verify: bool, as_json: bool) -> None:
    """Benchmark the whole path on this machine against the naive design (SPEC §10).

    Starts a private Redis (or uses REDIS_URL under a fresh prefix), the sandbox with the given
    latency and real worker processes; enqueues N intents, drains them, measures latency at a
    light fixed rate, then runs the naive design (one Celery task and one HTTP call per intent)
    with the same workers and concurrency. Progress goes to stderr.
    """
    if ingest:
        from .ingest import print_ingest

        return print_ingest(ingest_seconds, as_json)
    settings_env = {k: v for k, v in os.environ.items()
                    if k in ("TPNS_LINGER_MS", "TPNS_VERIFY_DELAY_MS")}
    read = Settings.from_env(settings_env)
    config = BenchConfig(intents=count, tokens=tokens, latency_ms=latency_ms, workers=workers,
                         concurrency=concurrency, light_seconds=light_seconds,
                         light_rate=light_rate, baseline_intents=baseline_intents,
                         linger_ms=read.linger_ms, verify=verify,
                         verify_delay_ms=read.verify_delay_ms)
    try:
        results = run_bench(config, Reporter())
    except (RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(results))
    else:
        Console().print(results_table(results))
