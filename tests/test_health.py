"""The one health check (worker/health.py) as ``tpns-batcher health`` prints it, against a real
Redis; ``/healthz`` renders the same verdict (tests/test_http.py checks its status codes)."""

from __future__ import annotations

import pytest
import redis
from click.testing import CliRunner

from worker.cli import main
from worker.health import check
from worker.producer import Producer
from worker.settings import Settings
from worker.store import Store
from worker.tools.drill import free_port


@pytest.fixture
def producer(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Producer:
    for name, value in {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                        "TPNS_APPS": "beta,alpha"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    return Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)


def health(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["health", *args])
    return result.exit_code, result.output.strip()


def test_each_verdict_and_its_exit_code(producer: Producer) -> None:
    assert health() == (0, "ok: redis reachable, 0 worker(s) seen")
    assert health("--worker") == (1, "unhealthy: no worker seen in the last 30 s")

    producer.store.heartbeat("w1")
    assert health("--worker") == (0, "ok: redis reachable, 1 worker(s) seen")

    producer.store.pause("beta", 100, "credentials")
    producer.store.pause("alpha", 50, "billing")
    code, line = health("--worker")
    assert code == 1 and line.startswith("unhealthy: sending for app alpha paused (billing, ")
    assert health("--worker", "--allow-paused") == (
        0, "ok: redis reachable, 1 worker(s) seen; sending paused for alpha, beta")


def test_the_http_body_carries_the_same_verdict(producer: Producer) -> None:
    producer.store.heartbeat("w1")
    producer.store.pause("alpha", 50, "billing")
    verdict = check(producer.store, producer.apps)
    body = verdict.to_dict()
    assert not verdict.ok and body["ok"] is False and body["workers"] == 1
    assert body["reason"] == verdict.reason and verdict.reason.startswith("sending for app alpha")
    assert body["paused"]["alpha"]["reason"] == "billing"


def test_redis_unreachable_is_a_verdict_not_an_exception() -> None:
    nobody = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=2)
    verdict = check(Store(nobody, "tpnstest:health:"), lambda: ["alpha"])
    assert verdict.to_dict() == {"ok": False, "reason": "redis unreachable (ConnectionError)"}
    assert verdict.line() == "unhealthy: redis unreachable (ConnectionError)"
