"""The health check (SPEC §8): one implementation behind ``tpns-batcher health`` and ``/healthz``.

Healthy means: Redis answers, a worker has heartbeated in the last ``WORKER_TTL_S`` seconds (when
the caller needs one), and no app's sending is paused (unless the caller accepts a pause: a
restart would not fix one). With a webhook, its lag judges too: over ``degraded`` events (a tenth
of ``TPNS_EVENTS_MAXLEN``) the verdict stays ok but says ``degraded``; over ``unhealthy`` (half the
cap: undelivered events will soon be trimmed) it is unhealthy. The CLI prints ``Health.line()``
and exits 0/1; serve answers
``Health.to_dict()`` with 200/503. The host-local liveness probe (``health --local``) is a
different question, answered from heartbeat files by ``worker.liveness``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from .keys import WORKER_TTL_S
from .store import Store
from .webhook_state import store_figures


@dataclass(frozen=True)
class Health:
    """The verdict: ``ok``, and when not ok the one-line ``reason``; what was seen on the way."""

    ok: bool
    reason: str = ""
    redis: bool = True
    workers: int = 0
    #: app -> (seconds left, reason) for each app whose sending is paused now
    paused: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: events not yet delivered to the webhook (None: no webhook judged)
    webhook_lag: int | None = None
    #: why the system works but needs a look ("" when it does not); ``ok`` stays True
    degraded: str = ""

    def line(self) -> str:
        """``ok: ...``, ``degraded: <reason>; ...`` or ``unhealthy: <reason>``, the CLI's line."""
        if not self.ok:
            return f"unhealthy: {self.reason}"
        paused = f"; sending paused for {', '.join(sorted(self.paused))}" if self.paused else ""
        head = f"degraded: {self.degraded}; " if self.degraded else "ok: "
        return f"{head}redis reachable, {self.workers} worker(s) seen{paused}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``/healthz``."""
        if not self.redis:
            return {"ok": False, "reason": self.reason}
        body: dict[str, Any] = {"ok": self.ok, "redis": True, "workers": self.workers,
                                "paused": {app: {"seconds_left": round(left, 1), "reason": why}
                                           for app, (left, why) in self.paused.items()}}
        if not self.ok:
            body["reason"] = self.reason
        if self.webhook_lag is not None:
            body["webhook_lag_events"] = self.webhook_lag
        if self.degraded:
            body["degraded"] = self.degraded
        return body


def check(store: Store, apps: Callable[[], Iterable[str]], *, need_worker: bool = True,
          allow_paused: bool = False, webhook_limits: tuple[int, int] | None = None) -> Health:
    """Ask Redis (through ``store``) whether the system is healthy.

    ``apps`` is called once Redis answered (reading the known apps is itself a Redis call). A Redis
    error at any step is the verdict "redis unreachable", never an exception. ``webhook_limits``
    (``worker.webhook_state.lag_limits``) are the degraded and unhealthy webhook lags.
    """
    try:
        store.redis.ping()
        workers = store.workers(WORKER_TTL_S)
        names = list(apps())
        pauses = store.pauses(names)
        hook = store_figures(store, names) if webhook_limits else None
    except (redis.RedisError, OSError) as exc:
        return Health(ok=False, reason=f"redis unreachable ({type(exc).__name__})", redis=False)
    verdict = Health(ok=True, workers=len(workers), paused=pauses)
    if webhook_limits:
        verdict = _judge_webhook(verdict, hook, webhook_limits)
    if need_worker and not workers:
        return replace(verdict, ok=False, reason=f"no worker seen in the last {WORKER_TTL_S} s")
    if pauses and not allow_paused:
        app, (left, why) = min(pauses.items())  # the same app named on every check
        return replace(verdict, ok=False,
                       reason=f"sending for app {app} paused ({why}, {left:.0f} s left)")
    return verdict


def _judge_webhook(verdict: Health, hook: dict[str, Any] | None,
                   limits: tuple[int, int]) -> Health:
    if hook is None:  # configured, but no worker has led delivery yet
        return replace(verdict, webhook_lag=0)
    lag = int(hook["lag_events"])
    degraded, unhealthy = limits
    what = (f"webhook lag {lag} events (last delivered {hook['last_delivered_at'] or 'never'}"
            + (f", last error {hook['last_error']}" if hook["last_error"] else "") + ")")
    if lag > unhealthy:
        return replace(verdict, ok=False, webhook_lag=lag,
                       reason=f"{what} over {unhealthy}: undelivered events will be trimmed")
    if lag > degraded:
        return replace(verdict, webhook_lag=lag, degraded=f"{what} over {degraded}")
    return replace(verdict, webhook_lag=lag)
