"""One read of everything an operator looks at: the figures behind ``stats --watch`` and ``/``.

``read_overview(store, apps)`` adds to ``Store.stats`` what the workers write to the metrics hash
(calls by result class, mean call latency), the workers seen, the most recent failures and the
webhook's figures (None without one). It is a
plain dict of JSON-ready values, so the terminal view, the HTML page and ``--json`` share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..keys import WORKER_TTL_S
from ..store import Store
from ..webhook_state import store_figures

#: failures shown by the live views
RECENT_FAILURES = 10


def call_classes(metrics: Mapping[str, float]) -> dict[str, int]:
    """HTTP calls by result class (``ok``, ``transient``, ...) summed over operator types."""
    out: dict[str, int] = {}
    for key, value in metrics.items():
        if key.startswith("call:"):
            cls = key.rsplit(":", 1)[1]
            out[cls] = out.get(cls, 0) + int(value)
    return dict(sorted(out.items()))


def mean_latency_ms(metrics: Mapping[str, float]) -> float | None:
    """Mean round trip of the calls that got an answer, or None before the first one."""
    count = sum(v for k, v in metrics.items() if k.startswith("lat:"))
    return round(metrics.get("lat_sum_ms", 0.0) / count, 1) if count else None


def read_overview(store: Store, apps: Iterable[str],
                  failures: int = RECENT_FAILURES) -> dict[str, Any]:
    """``Store.stats`` plus call classes, mean latency, workers seen and recent failures."""
    apps = list(apps)
    figures = store.stats(apps)
    metrics = store.call_metrics()
    figures["call_classes"] = call_classes(metrics)
    figures["mean_latency_ms"] = mean_latency_ms(metrics)
    figures["retries"] = int(sum(v for k, v in metrics.items() if k.startswith("retries:")))
    figures["workers"] = {name: round(age, 1)
                          for name, age in sorted(store.workers(WORKER_TTL_S).items())}
    figures["recent_failures"] = [s.to_dict() for s in store.recent_failures(failures)]
    figures["webhook"] = store_figures(store, apps)
    return figures


def failure_reason(status: Mapping[str, Any]) -> str:
    """A short human reason of one failed status: its error, the item's code, the call's."""
    parts = [str(status.get("error") or "failed")]
    if status.get("result_code") not in (None, "", "0"):
        parts.append(f"result {status['result_code']}")
    if status.get("ret_code") not in (None, 0):
        parts.append(f"ret_code {status['ret_code']}")
    if status.get("err_msg"):
        parts.append(str(status["err_msg"]))
    return ", ".join(parts)
