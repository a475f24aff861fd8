"""``tpns-batcher bench``: a tiny run as a real subprocess; only the shape of its JSON is checked.

Speeds are never asserted here: they belong to a quiet machine and ``tpns-batcher bench`` itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker.tools.ceiling import Ceiling, baseline_default, ceiling_figures, in_flight_met, in_flight_targets
from worker.tools.harness import bench_intents
from worker.tools.measure import percentile

#: the console script next to the interpreter running the tests (the project's virtualenv)
COMMAND = str(Path(sys.executable).with_name("tpns-batcher"))

NUMBERS = ("intents", "tokens", "sandbox_latency_ms", "linger_ms", "workers", "concurrency",
           "enqueue_per_s", "drain_s", "drain_per_s", "api_calls", "items_per_call",
           "full_calls_share", "failed", "latency_p50_ms", "latency_p99_ms", "latency_intents",
           "latency_rate_per_s", "redis_bytes_per_pending_intent", "worker_rss_mb",
           "call_ms_mean", "baseline_intents", "baseline_enqueue_per_s", "baseline_drain_per_s",
           "baseline_api_calls", "speedup", "max_in_flight", "in_flight_max", "ceiling_per_s",
           "ceiling_before_per_s", "ceiling_after_per_s", "ceiling_in_flight", "drain_to_ceiling",
           "redis_bytes_per_terminal_intent", "redis_events_bytes_per_intent")
TARGETS = ("speedup", "items_per_call", "latency_p99_ms", "redis_bytes_per_pending_intent",
           "redis_bytes_per_terminal_intent", "worker_rss_mb")
HEX64 = re.compile(r"[0-9a-f]{64}")
EMAIL = re.compile(r"user\d{8}@example\.com")


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_bench_json_has_every_figure(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPNS_", "REDIS_URL", "CELERY_"))}
    env["TPNS_DATA_DIR"] = str(tmp_path / "data")
    env["TPNS_VERIFY_DELAY_MS"] = "200"
    # the warm-ups give every call slot a connection (40 intents a slot): 8 slots, not 64, keep
    # them at 320 intents each, and the in-flight figures are still measured and checked
    env["TPNS_MAX_IN_FLIGHT"] = "8"
    done = subprocess.run(
        [COMMAND, "bench", "--intents", "400", "--light-seconds", "0.5", "--light-rate", "100",
         "--baseline-intents", "100", "--concurrency", "2", "--verify", "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=220, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout)
    for key in NUMBERS:
        value = figures[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), key
        assert value >= 0, key
    assert figures["intents"] == 400
    # with --verify: the same drain with TPNS_VERIFY=on; binds are read per account and per
    # token, unbinds per token or account, 20 or so to a query call
    assert figures["verify_delay_ms"] == 200
    assert 0 < figures["query_calls_per_intent"] < 1
    assert figures["verify_drain_per_s"] > 0 and figures["verify_drain_ratio"] > 0
    # a check comes at the earliest after the delay: verified intents took at least that long
    assert figures["verify_latency_p50_ms"] >= 200
    assert figures["baseline_intents"] == 100
    assert figures["latency_intents"] == 50
    assert isinstance(figures["redis_private"], bool)
    assert set(figures["drain_cpu_s"]) == {"workers", "redis", "sandbox", "bench"}
    assert all(v >= 0 for v in figures["drain_cpu_s"].values())
    assert set(figures["targets_met"]) == set(TARGETS)
    assert all(isinstance(v, bool) for v in figures["targets_met"].values())
    assert set(figures["targets"]) == {"speedup_min", "items_per_call_min",
                                       "latency_p99_ms_max", "redis_bytes_per_pending_intent_max",
                                       "redis_bytes_per_terminal_intent_max", "worker_rss_mb_max"}
    # the memory phase on the run's own (private) Redis: the records it stored cost something,
    # and so did the events stream, reported apart
    assert figures["redis_bytes_per_terminal_intent"] > 0
    assert figures["redis_events_bytes_per_intent"] > 0
    # the ceiling is the mean of its two halves, measured just before and just after the drain
    halves = (figures["ceiling_before_per_s"], figures["ceiling_after_per_s"])
    assert min(halves) > 0
    assert figures["ceiling_per_s"] == pytest.approx(sum(halves) / 2, abs=0.1)
    # the sandbox saw calls in flight together; the bare client kept its own number in flight
    assert 1 <= figures["in_flight_max"] <= figures["max_in_flight"]
    assert figures["targets"]["latency_p99_ms_max"] == 250 + 3 * 20 + 50
    machine = figures["machine"]
    assert machine["cores"] >= 1 and machine["python"] and machine["redis_version"]
    assert machine["redis_allocator"]


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_the_drain_is_judged_against_the_ceiling_at_real_latency_only() -> None:
    assert "drain_to_ceiling_min" not in in_flight_targets(20.0)
    goal = in_flight_targets(200.0)
    assert goal == {"worker_rss_mb_max": 200.0, "drain_to_ceiling_min": 0.6}
    assert in_flight_met({"worker_rss_mb": 150.0, "drain_to_ceiling": 0.59}, goal) == {
        "worker_rss_mb": True, "drain_to_ceiling": False}
    assert in_flight_met({"worker_rss_mb": 201.0, "drain_to_ceiling": 0.6}, goal) == {
        "worker_rss_mb": False, "drain_to_ceiling": True}


def test_the_naive_baseline_is_shorter_at_real_latency() -> None:
    assert baseline_default(20_000, 20.0, 2000) == 2000
    assert baseline_default(20_000, 200.0, 2000) == 200
    assert baseline_default(150, 20.0, 2000) == 150


def test_bench_intents_have_64_hex_tokens_and_e_mail_accounts() -> None:
    intents = bench_intents(500, None, random.Random(1))
    tokens = [i["token"] for i in intents if "token" in i]
    accounts = [a["account"] for i in intents for a in i.get("account_list", ())]
    accounts += [i["account"] for i in intents if "account" in i]
    assert tokens and accounts
    assert all(HEX64.fullmatch(t) for t in tokens)
    assert all(EMAIL.fullmatch(a) for a in accounts)
    assert {i["operator_type"] for i in intents} == {1, 2, 3, 4, 5}


def test_the_ceiling_is_the_mean_of_its_halves_around_the_drain() -> None:
    before = Ceiling(calls=500, items=10_000, seconds=1.0, in_flight=128)
    after = Ceiling(calls=500, items=10_000, seconds=2.0, in_flight=128)
    assert ceiling_figures(before, after, 6000.0) == {
        "ceiling_per_s": 7500.0, "ceiling_before_per_s": 10_000.0,
        "ceiling_after_per_s": 5000.0, "ceiling_in_flight": 128, "drain_to_ceiling": 0.8}
