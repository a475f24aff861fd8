"""The timeline: what happened second by second for the last 10 minutes, minute by minute for the
last hour, read from two small rings of counters in Redis (the status page's charts).

The scripts that change the state count in the rings in the same call (``lib.lua``'s ``tl_add``:
``enqueue.lua`` intents in, ``complete.lua`` and ``verify_done.lua`` intents finished, calls by
result class, call latency buckets and failures by reason; ``reap.lua``, which the sweep runs every
second, samples the queue depth), so counting costs no round trip. The rings have a slot per
second (``P ts``, ``TIMELINE_SECONDS_KEPT``) and per minute (``P tm``, ``TIMELINE_MINUTES_KEPT``),
each slot stamped with the second or minute it holds and emptied when it comes round again: the
memory is fixed, not per intent, and needs no TTL: with every slot of both rings busy (3,600 and
~1,900 fields) ``MEMORY USAGE`` gives ~180 kB and ~120 kB.
Times are Redis's clock (``TIME``), as in the scripts, so workers with skewed clocks agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster

from .keys import LATENCY_BUCKETS_MS, TIMELINE_MINUTES_KEPT, TIMELINE_SECONDS_KEPT, Keys

#: the series' names in the rings -> in what ``read_timeline`` returns
SERIES = {"in": "in", "ok": "succeeded", "f": "failed", "c": "calls", "d": "depth"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _slots(raw: Mapping[Any, Any], kept: int, newest: int) -> dict[int, dict[str, str]]:
    """The fields of each slot that holds one of the ``kept`` units up to ``newest``, by unit."""
    stamps: dict[int, int] = {}
    fields: dict[int, dict[str, str]] = {}
    for key, value in raw.items():
        name = _text(key)
        slot, sep, rest = name.partition(":")
        if not slot.isdigit():
            continue
        if sep:
            fields.setdefault(int(slot), {})[rest] = _text(value)
        else:
            stamps[int(slot)] = int(_text(value))
    return {unit: fields.get(slot, {}) for slot, unit in stamps.items()
            if newest - kept < unit <= newest}


def quantile_ms(buckets: Mapping[str, int], q: float) -> float | None:
    """The upper bound of the latency bucket that holds quantile ``q`` (None without calls).

    Calls slower than the last bound count as that bound: the figure says "at least" then.
    """
    total = sum(buckets.values())
    if total == 0:
        return None
    seen = 0
    for bound in (*LATENCY_BUCKETS_MS, "+Inf"):
        seen += buckets.get(str(bound), 0)
        if seen >= q * total:
            return float(bound if bound != "+Inf" else LATENCY_BUCKETS_MS[-1])
    return float(LATENCY_BUCKETS_MS[-1])


def _series(units: Sequence[int], slots: Mapping[int, Mapping[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for short, name in SERIES.items():
        if short == "d":  # a sample, not a count: None where nobody sampled (no sweep ran)
            out[name] = [int(slots[u]["d"]) if u in slots and "d" in slots[u] else None
                         for u in units]
        else:
            out[name] = [int(slots.get(u, {}).get(short, 0)) for u in units]
    return out


def _per_minute(units: Sequence[int], slots: Mapping[int, Mapping[str, str]]) -> dict[str, Any]:
    """The minute ring's own fields: calls by class, failures by reason, latency quantiles."""
    classes: dict[str, list[int]] = {}
    reasons: dict[str, list[int]] = {}
    p50: list[float | None] = []
    p99: list[float | None] = []
    for k, unit in enumerate(units):
        fields = slots.get(unit, {})
        lat: dict[str, int] = {}
        for name, value in fields.items():
            kind, _, what = name.partition(":")
            target = {"cc": classes, "er": reasons}.get(kind)
            if target is not None:
                target.setdefault(what, [0] * len(units))[k] = int(value)
            elif kind == "lat":
                lat[what] = int(value)
        p50.append(quantile_ms(lat, 0.50))
        p99.append(quantile_ms(lat, 0.99))
    return {"calls_by_class": dict(sorted(classes.items())),
            "failures_by_reason": dict(sorted(reasons.items())),
            "latency_p50_ms": p50, "latency_p99_ms": p99}


def _merge(into: dict[int, dict[str, str]], more: Mapping[int, Mapping[str, str]]) -> None:
    """Add ``more``'s counts into ``into`` (one app's rings into the sum of all, cluster mode)."""
    for unit, fields in more.items():
        mine = into.setdefault(unit, {})
        for name, value in fields.items():
            mine[name] = str(int(mine.get(name, 0)) + int(value))


def _now_s(client: redis.Redis | RedisCluster) -> int:
    reply: Any = client.time()
    if isinstance(reply, dict):  # a cluster answers per node: any one will do
        reply = next(iter(reply.values()))
    return int(reply[0])


def read_timeline(client: redis.Redis | RedisCluster, *scopes: Keys) -> dict[str, Any]:
    """The last ``TIMELINE_SECONDS_KEPT`` seconds and ``TIMELINE_MINUTES_KEPT`` minutes as arrays.

    ``seconds`` and ``minutes`` each have ``start`` (epoch s of the first entry), ``step`` (s)
    and one array per series, oldest first and ending with the current second (minute): ``in``,
    ``succeeded``, ``failed``, ``calls`` (counts in the unit), ``depth`` (the queue depth
    sampled by the sweep; the minute's highest; None where nothing was sampled). ``minutes``
    adds ``calls_by_class`` and ``failures_by_reason`` (name -> array) and ``latency_p50_ms`` /
    ``latency_p99_ms`` (bucket bounds, None in a minute without a timed call).

    ``scopes`` are the key sets whose rings to sum: one standalone, each app's in cluster mode
    (``Store.scope``), where every app counts in its own slot.
    """
    now_s = _now_s(client)
    now_m = now_s // 60
    sec_units = list(range(now_s - TIMELINE_SECONDS_KEPT + 1, now_s + 1))
    min_units = list(range(now_m - TIMELINE_MINUTES_KEPT + 1, now_m + 1))
    sec_slots: dict[int, dict[str, str]] = {}
    min_slots: dict[int, dict[str, str]] = {}
    for keys in scopes:
        seconds_key, minutes_key = keys.timeline
        _merge(sec_slots, _slots(client.hgetall(seconds_key), TIMELINE_SECONDS_KEPT, now_s))
        _merge(min_slots, _slots(client.hgetall(minutes_key), TIMELINE_MINUTES_KEPT, now_m))
    return {
        "now": now_s,
        "seconds": {"start": sec_units[0], "step": 1, **_series(sec_units, sec_slots)},
        "minutes": {"start": min_units[0] * 60, "step": 60, **_series(min_units, min_slots),
                    **_per_minute(min_units, min_slots)},
    }
