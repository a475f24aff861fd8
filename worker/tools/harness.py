"""What both designs' benchmark runs share: the run's settings and intents, progress on stderr,
and the gate that keeps started workers idle until a phase opens it (Celery's ``add_consumer``)."""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from ..settings import DEFAULT_CONCURRENCY
from .stack import WorkerProcess, mixed_intent

#: the queue a worker consumes until the benchmark opens the gate (nothing is ever sent to it)
GATE_QUEUE = "gate"
#: how often a drain's progress is polled (also the resolution of its end time)
POLL_S = 0.005


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run does (the command's options)."""

    intents: int = 20_000
    tokens: int | None = None
    latency_ms: float = 20.0
    workers: int = 1
    concurrency: int | None = None
    light_seconds: float = 5.0
    light_rate: float = 200.0
    baseline_intents: int | None = None
    linger_ms: int = 250
    #: also drain with TPNS_VERIFY=on (SPEC §6.1) and report its cost; with this first check delay
    verify: bool = False
    verify_delay_ms: int = 1000


#: what ``bench --verify`` adds to the figures
VERIFY_FIGURES = ("verify_delay_ms", "verify_drain_per_s", "verify_drain_ratio",
                  "query_calls_per_intent", "verify_latency_p50_ms", "verify_latency_p99_ms")


def verify_figures(plain: dict[str, Any], verified: dict[str, Any],
                   delay_ms: int) -> dict[str, Any]:
    """The cost of TPNS_VERIFY=on: the verified run's figures next to the plain run's."""
    return {"verify_delay_ms": delay_ms,
            "verify_drain_per_s": verified["drain_per_s"],
            "verify_drain_ratio": round(verified["drain_per_s"] / plain["drain_per_s"], 3),
            "query_calls_per_intent": round(verified["queries"] / verified["intents"], 3),
            "verify_latency_p50_ms": verified["latency_p50_ms"],
            "verify_latency_p99_ms": verified["latency_p99_ms"]}


def bench_intents(count: int, tokens: int | None, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` intents of a realistic mix over ``tokens`` distinct 64-hex tokens (the size of
    real TPNS tokens; default: one each); every e-mail account (``user00000001@example.com``)
    is used once."""
    pool = [f"{rng.getrandbits(256):064x}" for _ in range(tokens or count)]
    return [mixed_intent(rng.random(), pool[k % len(pool)], f"user{k + 1:08d}@example.com",
                         append_account=(f"user{k + 1:08d}@example.com", 0))
            for k in range(count)]


class Reporter:
    """Progress on stderr (rich): one line per phase, and a live count while draining."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet, log_path=False)

    def phase(self, text: str) -> None:
        self.console.log(text)

    def waiting(self, what: str, total: int, done: Callable[[], int],
                timeout_s: float, on_poll: Callable[[], None] = lambda: None) -> float:
        """Poll ``done()`` every ``POLL_S`` until it reaches ``total``; returns the monotonic
        time it was first seen there. ``TimeoutError`` after ``timeout_s``."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        deadline = time.monotonic() + timeout_s
        with Progress(f"[bold]{what}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            task = progress.add_task(what, total=total)
            last_ui = 0.0
            while True:
                count = done()
                now = time.monotonic()
                if count >= total:
                    return now
                if now > deadline:
                    raise TimeoutError(f"{what}: {count} of {total} after {timeout_s:g} s")
                if now - last_ui > 0.1:
                    progress.update(task, completed=count)
                    on_poll()
                    last_ui = now
                time.sleep(POLL_S)


def hostnames(kind: str, workers: int, prefix: str) -> list[str]:
    """Celery node names of a run's workers, unique per prefix so that runs never mix."""
    tag = prefix.rstrip(":").replace(":", "-")
    return [f"{kind}{k}-{tag}@{platform.node() or 'localhost'}" for k in range(workers)]


def wait_control(app: Any, names: Sequence[str], timeout_s: float,
                 procs: Sequence[WorkerProcess]) -> None:
    """Until every named worker answers a remote-control ping (its pool is up, it consumes)."""
    deadline = time.monotonic() + timeout_s
    waiting = set(names)
    while waiting:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"a worker exited during start-up; see {proc.log_path}")
        for reply in app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
            waiting -= set(reply)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready after {timeout_s:g} s: {sorted(waiting)}")


def open_gate(app: Any, queue: str, names: Sequence[str], timeout_s: float = 60.0) -> None:
    """Make every named worker consume ``queue``."""
    # asked again until each worker has answered: a busy machine may answer a broadcast late,
    # and adding a consumer twice is harmless
    _until_all_answer(app.control.add_consumer, "add_consumer", queue, names, timeout_s)


def close_gate(app: Any, queue: str, names: Sequence[str], timeout_s: float = 60.0) -> None:
    """Make every named worker stop consuming ``queue``; returns once each has answered."""
    # as open_gate: a loaded machine may answer after the reply window, and a phase that
    # publishes before a worker has cancelled races it for the next phase's messages
    _until_all_answer(app.control.cancel_consumer, "cancel_consumer", queue, names, timeout_s)


def _until_all_answer(command: Any, what: str, queue: str, names: Sequence[str],
                      timeout_s: float) -> None:
    """Send the remote-control ``command`` about ``queue`` to the named workers that have not
    answered yet, again and again, until all have (``RuntimeError`` past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    waiting = set(names)
    while waiting:
        replies = command(queue, destination=sorted(waiting), reply=True, timeout=5.0) or []
        waiting -= {name for reply in replies for name in reply}
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no answer from {sorted(waiting)}")


def alive_or_raise(procs: Sequence[WorkerProcess]) -> None:
    """``RuntimeError`` naming the log of a worker that has exited (a wait would only time out)."""
    for proc in procs:
        if not proc.alive():
            raise RuntimeError(f"a worker exited; the end of {proc.log_path}:\n"
                               f"{proc.log()[-2000:]}")


#: pool processes of the naive design unless --concurrency is given: it has one call in flight
#: per process, and this is the prefork pool it was always measured with
NAIVE_CONCURRENCY = 4


def cli_concurrency() -> int:
    """The worker command's default task threads (unless --concurrency says otherwise)."""
    return DEFAULT_CONCURRENCY


def warm_count(config: BenchConfig, in_flight: int = 1) -> int:
    """Intents (or naive tasks / 20) that give every pool process of every worker a few calls,
    and every call slot a connection, before the measured phases, so that no figure includes a
    cold start (imports, connections, script loading in each freshly forked process)."""
    return config.workers * max(40 * (config.concurrency or cli_concurrency()), 40 * in_flight)
