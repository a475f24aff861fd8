"""The ceiling of ``bench --latency-ms``: what a bare client pushes through the same sandbox.

``ceiling_per_s`` is a reference, not a product figure: ``threads`` plain threads share one
``requests.Session`` (its pool sized to them) and each sends signed ``batchoperate`` calls of 20
distinct tokens back to back, so ``threads`` calls stay in flight. No Redis, no Celery, no
outcome rules: the most this machine (the sandbox's own CPU included) can push at the sandbox's
latency. The benchmark reports the worker's ``drain_per_s`` as a ratio of it, measured in the same
run around the drain: half the calls just before it and half just after, and ``ceiling_per_s`` is
the mean of the two rates, so that load drifting on a shared machine during the run moves the
ceiling as it moves the drain (``ceiling_before_per_s`` and ``ceiling_after_per_s`` show the drift).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from ..auth import sign_headers
from ..client import BATCHOPERATE_PATH
from ..settings import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY

#: calls a bare client keeps in flight by default: as many as a worker keeps by default
CEILING_IN_FLIGHT = 128
#: items per call: the service's maximum
ITEMS = 20


@dataclass(frozen=True)
class Ceiling:
    """What the bare client did: calls answered, items carried, the wall time they took."""

    calls: int
    items: int
    seconds: float
    in_flight: int

    @property
    def per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def measure_ceiling(base_url: str, calls: int, in_flight: int = CEILING_IN_FLIGHT,
                    access_id: str = SANDBOX_ACCESS_ID,
                    secret_key: str = SANDBOX_SECRET_KEY) -> Ceiling:
    """Send ``calls`` calls of 20 op-4 items with ``in_flight`` of them in flight at a time.

    Raises ``RuntimeError`` if a call is not answered with HTTP 200 (the ceiling would be wrong).
    """
    url = base_url.rstrip("/") + BATCHOPERATE_PATH
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=in_flight)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    numbers = itertools.count()
    errors: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        while not errors:
            with lock:
                n = next(numbers)
            if n >= calls:
                return
            body = json.dumps({"operator_type": 4, "token_list": [
                f"ceiling-{n:09d}-{k:02d}" for k in range(ITEMS)]}).encode()
            headers = sign_headers(access_id, secret_key, body, int(time.time()))
            headers["Content-Type"] = "application/json"
            try:
                reply = session.post(url, data=body, headers=headers, timeout=30)
            except requests.RequestException as exc:
                errors.append(type(exc).__name__)
                return
            if reply.status_code != 200:
                errors.append(f"HTTP {reply.status_code}")

    threads = [threading.Thread(target=run, name=f"ceiling-{k}", daemon=True)
               for k in range(in_flight)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    session.close()
    if errors:
        raise RuntimeError(f"ceiling: a call failed ({errors[0]})")
    return Ceiling(calls=calls, items=calls * ITEMS, seconds=seconds, in_flight=in_flight)


#: sandbox latency from which a run is judged as at real TPNS distance (SPEC §10's 200 ms run)
REAL_LATENCY_MS = 100.0
#: calls the bare client sends for the ceiling, half before the drain and half after (a few
#: seconds at any latency this box can push)
CEILING_CALLS = 1000
#: the default worker's drain as a share of the ceiling at real latency (stretch: 0.8)
DRAIN_TO_CEILING_MIN = 0.6
#: worker memory, all its processes (main, beat)
WORKER_RSS_MB_MAX = 200.0


def ceiling_figures(before: Ceiling, after: Ceiling, drain_per_s: float) -> dict[str, float]:
    """``ceiling_per_s`` (the mean of the rates measured just ``before`` and just ``after`` the
    drain), both parts, and the drain's share of the mean."""
    mean = (before.per_s + after.per_s) / 2
    return {"ceiling_per_s": round(mean, 1), "ceiling_before_per_s": round(before.per_s, 1),
            "ceiling_after_per_s": round(after.per_s, 1), "ceiling_in_flight": before.in_flight,
            "drain_to_ceiling": round(drain_per_s / mean, 3) if mean else 0.0}


def in_flight_targets(latency_ms: float) -> dict[str, float]:
    """The calls-in-flight targets of SPEC §10 for a run at ``latency_ms``: memory always, the
    drain's share of the ceiling at real latency only (at 20 ms the speedup is the target)."""
    goal = {"worker_rss_mb_max": WORKER_RSS_MB_MAX}
    if latency_ms >= REAL_LATENCY_MS:
        goal["drain_to_ceiling_min"] = DRAIN_TO_CEILING_MIN
    return goal


def in_flight_met(results: dict[str, Any], goal: dict[str, float]) -> dict[str, bool]:
    met = {"worker_rss_mb": results["worker_rss_mb"] <= goal["worker_rss_mb_max"]}
    if "drain_to_ceiling_min" in goal:
        met["drain_to_ceiling"] = results["drain_to_ceiling"] >= goal["drain_to_ceiling_min"]
    return met


def baseline_default(intents: int, latency_ms: float, cap: int) -> int:
    """The naive baseline's backlog: ``cap`` at 20 ms, fewer at higher latency (the naive design
    sends one call per intent, so 2,000 of them at 200 ms would take minutes; rates compare)."""
    return min(intents, cap, max(100, int(cap * 20 / max(latency_ms, 20.0))))
