"""The store's reads: statuses, counters, stats, pauses, queues, apps and workers.

Plain queries (``GET``/``MGET``, ``HGETALL``, pipelines of ``LLEN``): no script, no rule of order
or atomicity, which is why they live apart from the writes in ``worker.store``. ``StoreReads`` is
the base of ``Store``, so ``store.stats(...)`` and the rest read as before.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from .keys import RECORD_STATES, WORKER_TTL_S
from .model import OPERATOR_TYPES, STATES, Status
from .store_calls import Layout, as_text, evalsha


class StoreReads(Layout):
    """The reads of ``Store`` (which sets ``redis``)."""

    redis: redis.Redis
    #: the store's scripts by name (``Store`` loads them)
    _scripts: dict[str, Any]

    def apps_of(self, apps: Iterable[str] = ()) -> list[str]:
        """The apps whose keys to visit for something global (counters, leases, failures): in
        cluster mode each has its own, so ``apps`` and the known ones; standalone, one pass."""
        if not self.cluster:
            return [""]
        return sorted(set(apps) | self.known_apps())

    def pauses(self, apps: Iterable[str]) -> dict[str, tuple[float, str]]:
        """Apps paused now: app -> (seconds left, reason)."""
        apps = list(apps)
        pipe = self.redis.pipeline(transaction=False)
        for app in apps:
            pipe.pttl(self.scope(app).pause(app))
            pipe.get(self.scope(app).pause(app))
        res = pipe.execute()
        out = {}
        for k, app in enumerate(apps):
            ms, reason = res[2 * k], res[2 * k + 1]
            if ms and ms > 0 and reason is not None:
                out[app] = (ms / 1000, as_text(reason))
        return out

    def ready_counts(self, apps: Iterable[str]) -> dict[tuple[str, int], tuple[int, int]]:
        """(app, op) -> (eligible now, retrying) for every pair with work."""
        pairs = [(a, op) for a in apps for op in OPERATOR_TYPES]
        pipe = self.redis.pipeline(transaction=False)
        for app, op in pairs:
            pipe.llen(self.scope(app).ready(app, op))
            pipe.zcard(self.scope(app).delayed(app, op))
        res = pipe.execute()
        return {pair: (res[2 * k], res[2 * k + 1]) for k, pair in enumerate(pairs)
                if res[2 * k] or res[2 * k + 1]}

    def known_apps(self) -> set[str]:
        return {as_text(a) for a in self.redis.smembers(self.keys.apps)}

    def workers(self, ttl_s: int = WORKER_TTL_S) -> dict[str, float]:
        """Workers seen in the last ``ttl_s`` seconds -> seconds since last seen."""
        now_s = int(self.redis.time()[0])
        seen: Any = self.redis.zrangebyscore(self.keys.workers, now_s - ttl_s, "+inf",
                                             withscores=True)
        return {as_text(w): now_s - float(score) for w, score in seen}

    def status(self, intent_id: str) -> Status | None:
        """The status of one intent, or None for an unknown id."""
        return self.statuses([intent_id])[0]

    def statuses(self, ids: Sequence[str]) -> list[Status | None]:
        """Statuses of many intents in one round trip (None for unknown ids)."""
        if not ids:
            return []
        raws = self.records(ids)
        return [None if raw is None else record_to_status(i, json.loads(raw))
                for i, raw in zip(ids, raws, strict=True)]

    def records(self, ids: Sequence[str]) -> list[Any]:
        """The raw records of ``ids`` (None where gone): one MGET, or in cluster mode one
        pipelined GET each (their keys are in as many slots as they have apps); for the ids
        whose whole record is gone, their summaries' (compacted records), in one more round trip."""
        if not self.cluster:
            raws = list(self.redis.mget([self.keys.record(i) for i in ids]))
        else:
            pipe = self.redis.pipeline(transaction=False)
            for intent_id in ids:
                pipe.get(self.of_id(intent_id).record(intent_id))
            raws = list(pipe.execute())
        missing = [k for k, raw in enumerate(raws) if raw is None]
        if missing:
            calls = [("lookup", keys, args)
                     for keys, args in lookup_calls(self, [ids[k] for k in missing])]
            found = [raw for reply in self._evalsha_pipeline(calls) for raw in reply]
            for k, raw in zip(missing, found, strict=True):
                raws[k] = raw or None
        return raws

    def _evalsha_pipeline(self, calls: Sequence[tuple[str, list[Any], list[Any]]],
                          delete: Sequence[str] = (), *, raise_errors: bool = True) -> list[Any]:
        """``DEL delete…`` then each ``(script name, keys, args)`` in one round trip; replies.

        By SHA in a plain pipeline: redis-py's script-aware pipeline would add a ``SCRIPT
        EXISTS`` round trip to every execute. On a server that lost its scripts (a restart),
        each call that did not run is run again through its ``Script``, which loads it. A call's
        own error is raised, or with ``raise_errors=False`` left in its place among the replies.
        """
        pipe = self.redis.pipeline(transaction=False)
        if delete:
            pipe.delete(*delete)
        for name, keys, args in calls:
            evalsha(pipe, self._scripts[name].sha, keys, args)
        replies = list(pipe.execute(raise_on_error=False))[1 if delete else 0:]
        for n, reply in enumerate(replies):
            if isinstance(reply, redis.exceptions.NoScriptError):
                # only the calls that did not run go again (Script loads itself on NOSCRIPT)
                name, keys, args = calls[n]
                replies[n] = self._scripts[name](keys=keys, args=args)
            elif isinstance(reply, Exception) and raise_errors:
                raise reply
        return replies

    def _summed(self, key_of: Any, convert: Any) -> dict[str, Any]:
        """A hash of counters (``key_of(keys)``) summed over the apps' keys in cluster mode."""
        total: dict[str, Any] = {}
        names = [key_of(self.keys)] + [key_of(self.keys.tagged(a)) for a in self.apps_of()
                                       if self.cluster]
        for name in names:
            for k, v in self.redis.hgetall(name).items():
                total[as_text(k)] = total.get(as_text(k), 0) + convert(v)
        return total

    def counters(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """The counters; in cluster mode each app's summed (plus the global ``sweeps``). With
        ``names``, only those (0 for a counter never counted)."""
        total = self._summed(lambda keys: keys.counters, int)
        return total if names is None else {name: total.get(name, 0) for name in names}

    def timings(self, ids: Sequence[str]) -> list[tuple[int, int] | None]:
        """(enqueued, last changed) of each intent, epoch ms (None: unknown). For a terminal
        intent the second is when it became terminal."""
        out: list[tuple[int, int] | None] = []
        for raw in self.records(ids) if ids else []:
            rec = None if raw is None else json.loads(raw)
            out.append(None if rec is None else (int(rec["c"]), int(rec.get("u", rec["c"]))))
        return out

    def call_metrics(self) -> dict[str, float]:
        """The raw metrics hash: ``call:<op>:<class>``, ``lat:<le ms>``, ``lat_sum_ms``,
        ``bs:<size>`` and ``retries:<op>`` (see complete.lua); summed over apps in cluster mode."""
        return self._summed(lambda keys: keys.metrics, float)

    def stats(self, apps: Iterable[str]) -> dict[str, Any]:
        """Counts per state and op, queue depth, oldest pending age, calls, items per call, pauses."""
        apps = sorted(set(apps) | self.known_apps())
        counters = self.counters()
        by_op: dict[str, dict[str, int]] = {}
        totals = dict.fromkeys(STATES, 0)
        for op in OPERATOR_TYPES:
            row = {state: counters.get(f"{state}:{op}", 0) for state in totals}
            row["enqueued"] = counters.get(f"enqueued:{op}", 0)
            # ever-growing terminal counts (``failed`` drops when failed intents are requeued)
            row["done_succeeded"] = counters.get(f"done_succeeded:{op}", 0)
            row["done_failed"] = counters.get(f"done_failed:{op}", 0)
            by_op[str(op)] = row
            for state in totals:
                totals[state] += row[state]
        pairs = [(a, op) for a in apps for op in OPERATOR_TYPES]
        pipe = self.redis.pipeline(transaction=False)
        # as a plain command: a cluster pipeline blocks .time() (it goes to one node)
        pipe.execute_command("TIME")  # type: ignore[no-untyped-call]
        for app, op in pairs:
            pipe.llen(self.scope(app).ready(app, op))
            pipe.lindex(self.scope(app).ready(app, op), 0)
        for app in apps:  # the verifying item checked next: roughly the longest verifying
            pipe.zrange(self.scope(app).verifying(app), 0, 0)
        res = pipe.execute()
        now_ms = res[0][0] * 1000 + res[0][1] // 1000
        heads = [res[1 + 2 * k + 1] for k in range(len(pairs))]
        heads += [r[0] for r in res[1 + 2 * len(pairs):] if r]
        depth = {f"{a}:{op}": res[1 + 2 * k] for k, (a, op) in enumerate(pairs) if res[1 + 2 * k]}
        head_ids = [as_text(h) for h in heads if h is not None]
        oldest_ms = 0
        if head_ids:
            for raw in self.records(head_ids):
                if raw is not None:
                    rec = json.loads(raw)
                    oldest_ms = max(oldest_ms, now_ms - int(rec.get("u", rec["c"])))
        calls = counters.get("calls", 0)
        items_sent = counters.get("items_sent", 0)
        return {
            "states": totals,
            "by_operator_type": by_op,
            "eligible": depth,
            # verifying items are pending: they hold their keys until seen applied (SPEC §6.1)
            "queue_depth": totals["queued"] + totals["retrying"] + totals["verifying"],
            "in_flight": totals["sending"],
            "oldest_pending_age_s": round(oldest_ms / 1000, 3),
            "calls": calls,
            "items_sent": items_sent,
            "items_per_call": round(items_sent / calls, 2) if calls else 0.0,
            "leases_reclaimed": counters.get("leases_reclaimed", 0),
            "verify": {"ok": counters.get("verify_ok", 0),
                       "retry": counters.get("verify_retry", 0),
                       "not_applied": counters.get("verify_not_applied", 0),
                       "query_calls": counters.get("query_calls", 0)},
            "paused": {app: {"seconds_left": round(left, 1), "reason": reason}
                       for app, (left, reason) in self.pauses(apps).items()},
            "apps": apps,
        }

    def recent_failures(self, limit: int = 20) -> list[Status]:
        """The most recently failed intents, newest first."""
        scored: list[tuple[float, str]] = []
        for app in self.apps_of():
            found: Any = self.redis.zrevrange(self.scope(app).failed, 0, limit - 1,
                                              withscores=True)
            scored += [(float(t), as_text(i)) for i, t in found]
        ids = [i for _, i in sorted(scored, reverse=True)[:limit]]
        return [s for s in self.statuses(ids) if s is not None]


def lookup_calls(layout: Layout, ids: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """The ``lookup.lua`` calls that find the summaries of ``ids``, their answers in the order of
    ``ids``: one call, or in cluster mode one per id (each in its app's slot)."""
    if not layout.cluster:
        return [([layout.keys.summary_meta], [layout.prefix, *ids])]
    return [([layout.of_id(i).summary_meta], [layout.of_id(i).prefix, i]) for i in ids]


def iso_ms(epoch_ms: int | float) -> str:
    """``2026-11-25T10:00:00.000Z`` for an epoch time in milliseconds."""
    moment = dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch_ms) % 1000:03d}Z"


def record_to_status(intent_id: str, rec: Mapping[str, Any]) -> Status:
    """Turn a stored record into the status of SPEC §5."""
    op = int(rec["o"])
    accounts = [{"account": a, "account_type": int(k)} for a, k in (rec.get("l") or [])]
    return Status(
        id=intent_id,
        operator_type=op,
        app=rec.get("a", "default"),
        token=rec.get("t"),
        account_list=accounts,
        state=RECORD_STATES[rec["s"]],
        attempts=int(rec.get("n", 0)),
        result_code=rec.get("rc"),
        ret_code=rec.get("ret"),
        err_msg=rec.get("m"),
        error=rec.get("er"),
        batch_id=rec.get("b"),
        verified=rec.get("vf"),
        detail="compacted" if rec.get("x") else None,
        created_at=iso_ms(rec["c"]),
        updated_at=iso_ms(rec.get("u", rec["c"])),
    )
