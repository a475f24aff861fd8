"""Prometheus metrics read from Redis at scrape time, so every process shows the cluster's figures.

The workers record their calls in the store (counters ``P n`` and the metrics hash ``P m``, written
by ``complete.lua``); ``ClusterCollector`` turns one read of those into metric families. Any process
can therefore serve ``/metrics`` — ``tpns-batcher serve``, or a worker with ``--metrics-port`` — and
every one of them reports the same cluster-wide numbers: scrape one of them, not all (or
aggregate with ``max``, not ``sum``).

Each exposing process builds its own ``CollectorRegistry`` (``make_registry``); nothing is
registered on prometheus_client's global registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..errors import StoreUnavailableError
from ..keys import LATENCY_BUCKETS_MS, WORKER_TTL_S
from ..model import OPERATOR_TYPES, STATES
from ..store import Store
from ..tpns_codes import CALL_CLASSES
from ..webhook_state import store_figures

logger = logging.getLogger(__name__)

#: upper bounds of the batch-size histogram (items per claimed batch)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 15, 19, 20)


class ClusterCollector(Collector):
    """A custom collector: each ``collect()`` reads the store once and yields fresh families.

    ``apps`` is called at every scrape, so apps that workers register later show up too. When
    Redis does not answer, only ``tpns_redis_up 0`` is exported (a scrape never fails with 500).
    """

    def __init__(self, store: Store, apps: Callable[[], Iterable[str]]) -> None:
        self.store = store
        self.apps = apps

    def describe(self) -> Iterable[Metric]:
        # no up-front description: registering must not touch Redis
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tpns_redis_up", "1 when Redis answered this scrape, else 0.")
        try:
            apps = set(self.apps())
            stats = self.store.stats(apps)
            metrics = self.store.call_metrics()
            workers = self.store.workers()
            webhook = store_figures(self.store, apps)
        except (redis.RedisError, OSError, StoreUnavailableError) as exc:
            logger.warning("metrics scrape: Redis unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _intent_families(stats["by_operator_type"])
        yield from _call_families(metrics)
        yield from _pipeline_families(stats, len(workers))
        yield from _webhook_families(webhook)


def _intent_families(by_op: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    enqueued = CounterMetricFamily("tpns_intents_enqueued", "Intents accepted at enqueue.",
                                   labels=["operator_type"])
    completed = CounterMetricFamily(
        "tpns_intents_completed", "Intents that reached a terminal state (a requeued failed intent "
        "counts again when it ends).", labels=["operator_type", "outcome"])
    current = GaugeMetricFamily("tpns_intents", "Intents per state and operator_type (succeeded "
                                "and failed: every terminal intent so far).",
                                labels=["state", "operator_type"])
    depth = GaugeMetricFamily("tpns_queue_depth", "Intents pending but not in a call (queued + "
                              "retrying + verifying).", labels=["operator_type"])
    for op in OPERATOR_TYPES:
        label = str(op)
        row = by_op.get(label, {})
        enqueued.add_metric([label], row.get("enqueued", 0))
        for outcome in ("succeeded", "failed"):
            completed.add_metric([label, outcome], row.get(f"done_{outcome}", 0))
        for state in STATES:
            current.add_metric([state, label], row.get(state, 0))
        depth.add_metric([label], row.get("queued", 0) + row.get("retrying", 0)
                         + row.get("verifying", 0))
    yield from (enqueued, completed, current, depth)


def _call_families(metrics: Mapping[str, float]) -> Iterator[Metric]:
    calls = CounterMetricFamily("tpns_api_calls", "batchoperate calls by operator_type and result "
                                "class (one per HTTP request that ended a try).",
                                labels=["operator_type", "result"])
    retries = CounterMetricFamily("tpns_retries", "Items sent back to the queue to be retried.",
                                  labels=["operator_type"])
    for op in OPERATOR_TYPES:
        for cls in CALL_CLASSES:
            calls.add_metric([str(op), cls], metrics.get(f"call:{op}:{cls}", 0.0))
        retries.add_metric([str(op)], metrics.get(f"retries:{op}", 0.0))
    yield calls
    yield retries

    buckets: list[tuple[str, float]] = []
    running = 0.0
    for le in LATENCY_BUCKETS_MS:
        running += metrics.get(f"lat:{le}", 0.0)
        buckets.append((_seconds(le), running))
    running += metrics.get("lat:+Inf", 0.0)
    buckets.append(("+Inf", running))
    yield HistogramMetricFamily(
        "tpns_api_call_duration_seconds", "Round trip of batchoperate calls that got an answer.",
        buckets=buckets, sum_value=metrics.get("lat_sum_ms", 0.0) / 1000)

    sizes: dict[int, float] = {}
    for key, value in metrics.items():
        if key.startswith("bs:"):
            sizes[int(key[3:])] = sizes.get(int(key[3:]), 0.0) + value
    size_buckets: list[tuple[str, float]] = []
    for le in BATCH_SIZE_BUCKETS:
        size_buckets.append((str(float(le)), sum(v for n, v in sizes.items() if n <= le)))
    size_buckets.append(("+Inf", sum(sizes.values())))
    yield HistogramMetricFamily(
        "tpns_batch_size_items", "Items per claimed batch (halved calls count once).",
        buckets=size_buckets, sum_value=sum(n * v for n, v in sizes.items()))


def _pipeline_families(stats: Mapping[str, Any], workers_seen: int) -> Iterator[Metric]:
    yield GaugeMetricFamily("tpns_oldest_pending_age_seconds",
                            "Age of the oldest intent waiting at the head of a queue.",
                            value=float(stats["oldest_pending_age_s"]))
    paused = GaugeMetricFamily("tpns_paused", "1 while sending for the app is paused "
                               "(credentials, billing or app errors).", labels=["app"])
    for app in stats["apps"]:
        paused.add_metric([app], 1 if app in stats["paused"] else 0)
    yield paused
    yield CounterMetricFamily("tpns_leases_reclaimed", "Items returned to the queue after their "
                              "batch's lease expired (a worker died or hung).",
                              value=float(stats["leases_reclaimed"]))
    verify = stats["verify"]
    checks = CounterMetricFamily(
        "tpns_verify", "Verification outcomes (TPNS_VERIFY=on): ok, seen applied; retry, not seen "
        "by the timeout and sent again; not_applied, not seen with the retry budget spent.",
        labels=["result"])
    for result in ("ok", "retry", "not_applied"):
        checks.add_metric([result], float(verify[result]))
    yield checks
    yield CounterMetricFamily("tpns_query_calls", "Query API calls made to verify items.",
                              value=float(verify["query_calls"]))
    yield GaugeMetricFamily("tpns_workers_seen", f"Workers whose heartbeat is at most {WORKER_TTL_S} s old.",
                            value=workers_seen)


def _webhook_families(hook: Mapping[str, Any] | None) -> Iterator[Metric]:
    """The webhook's lag and totals; zeros where no deliverer ever ran (no TPNS_WEBHOOK_URL)."""
    hook = hook or {}
    yield GaugeMetricFamily("tpns_webhook_lag_events", "Events in the stream not yet delivered to "
                            "TPNS_WEBHOOK_URL (0 without a webhook).",
                            value=float(hook.get("lag_events", 0)))
    for name, key, text in (
            ("tpns_webhook_delivered", "delivered", "Events delivered to the webhook (2xx)."),
            ("tpns_webhook_failures", "failures", "Webhook POST attempts without a 2xx answer "
                                                  "(each retried with backoff)."),
            ("tpns_webhook_gaps", "gaps", "Gaps delivered: events trimmed from the stream "
                                          "(TPNS_EVENTS_MAXLEN) before the webhook got them.")):
        yield CounterMetricFamily(name, text, value=float(hook.get(key, 0)))


def _seconds(ms: int) -> str:
    return repr(ms / 1000)


def make_registry(store: Store, apps: Callable[[], Iterable[str]]) -> CollectorRegistry:
    """A fresh registry holding only the cluster collector (never the global registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(store, apps))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (blocking: reads Redis)."""
    return generate_latest(registry)


def start_metrics_server(port: int, store: Store, apps: Iterable[str],
                         addr: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` for ``store`` on ``addr:port`` from a daemon thread.

    For a worker's ``--metrics-port``; returns prometheus_client's ``(server, thread)`` so a
    caller can ``server.shutdown()``. ``apps`` are the configured names; apps registered by
    other workers are added at each scrape.
    """
    names = frozenset(apps)
    registry = make_registry(store, lambda: names | store.known_apps())
    server, thread = start_http_server(port, addr=addr, registry=registry)
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", addr, port)
    return server, thread
