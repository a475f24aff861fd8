"""What the benchmark measures with: percentiles, the memory and CPU of process trees and of the
Redis server, and a description of the machine the figures came from."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections.abc import Iterator, Sequence
from typing import Any

import psutil

from ..connections import redis_client


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def _tree(pids: Sequence[int]) -> Iterator[psutil.Process]:
    """These processes and all their live descendants."""
    for pid in pids:
        try:
            root = psutil.Process(pid)
            yield from (root, *root.children(recursive=True))
        except psutil.NoSuchProcess:
            continue


def tree_rss_mb(pids: Sequence[int]) -> float:
    """Resident memory of these processes and all their descendants, in MiB."""
    total = 0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / (1 << 20)


def tree_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and their live descendants."""
    total = 0.0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def own_cpu_s() -> float:
    """CPU seconds of this process alone (the benchmark's polling and progress view)."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def redis_cpu_s(client: Any) -> float:
    """CPU seconds the Redis server has used (its own ``INFO cpu``, main thread and all)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def machine(redis_url: str) -> dict[str, Any]:
    """Cores, Python, the Redis version and allocator (memory figures depend on both), the
    platform and the load when the run ended."""
    client = redis_client(redis_url)  # any REDIS_URL form (Sentinel, TLS), not only redis://
    try:
        version = str(client.info("server").get("redis_version", "?"))
        allocator = str(client.info("memory").get("mem_allocator", "?"))
    finally:
        client.close()
    return {"cores": os.cpu_count() or 0, "python": platform.python_version(),
            "redis_version": version, "redis_allocator": allocator,
            "platform": platform.platform(terse=True),
            "load_avg_1m": round(os.getloadavg()[0], 2)}
