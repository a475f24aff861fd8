"""SPEC §3.6: the secret key never appears in logs, metrics, statuses, reprs, exceptions or CLI output.

Batches run through the real ``Flusher`` and ``TpnsClient`` against the sandbox over a real socket,
with both auth methods, a wrong secret (the call is refused) and injected faults (retries).
"""

from __future__ import annotations

import base64
import json
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.errors import TpnsError
from worker.flush import Flusher
from worker.logs import JsonFormatter
from worker.monitor.metrics import make_registry, render
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings

ACCESS_ID = "1500000042"
SECRET = "Sx7-distinctive-SECRET-9q4tKp2w"
FAULTS = ("http_500", "http_503", "1008004", "1008028", "http_429", "drop")


def forbidden() -> list[str]:
    """The secret and the encodings of it that a careless log line could carry."""
    basic = base64.b64encode(f"{ACCESS_ID}:{SECRET}".encode()).decode()
    return [SECRET, SECRET.lower(), basic, base64.b64encode(SECRET.encode()).decode()]


def assert_clean(text: str, where: str) -> None:
    for needle in forbidden():
        assert needle not in text, f"the secret leaked into {where}"


def env(redis_url: str, prefix: str, base_url: str, auth: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "0",
            "TPNS_ACCESS_ID": ACCESS_ID, "TPNS_SECRET_KEY": SECRET, "TPNS_BASE_URL": base_url,
            "TPNS_AUTH": auth, "TPNS_MAX_ATTEMPTS": "2", "TPNS_API_TOKEN": "api-token-1"}


def render_records(records: list[logging.LogRecord]) -> str:
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    structured = JsonFormatter()
    out = []
    for record in records:
        out += [plain.format(record), structured.format(record), repr(record.__dict__)]
    return "\n".join(out)


def run_batches(settings: Settings, redis_url: str, prefix: str) -> tuple[Producer, list[str]]:
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    intents: list[dict[str, Any]] = [
        {"operator_type": 2, "token": f"tok-{k}", "account_list": [{"account": f"u{k}"}]}
        for k in range(5)]
    intents.append({"operator_type": 2, "token": "invalid-1", "account_list": [{"account": "x"}]})
    ids = [i for i in producer.submit_many(intents) if i is not None]
    flusher = Flusher(settings, producer.store, wake=lambda wakes: None, sleep=lambda s: None)
    try:
        flusher.flush("default", 2)
    finally:
        flusher.close()
    return producer, ids


@pytest.fixture(params=["sign", "basic"])
def auth(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["wrong secret", "faults", "partial failure"])
def leak_sandbox(request: pytest.FixtureRequest) -> Iterator[SandboxServer]:
    kind = request.param
    secret = "not-the-workers-secret" if kind == "wrong secret" else SECRET
    with SandboxServer(access_id=ACCESS_ID, secret_key=secret, seed=3,
                       fault_rate=1.0 if kind == "faults" else 0.0, faults=FAULTS,
                       retry_after_s=0.01) as server:
        yield server


def test_the_secret_never_leaks(redis_url: str, prefix: str, auth: str, leak_sandbox: SandboxServer,
                                caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(env(redis_url, prefix, leak_sandbox.url, auth))
    caplog.set_level(logging.DEBUG)
    producer, ids = run_batches(settings, redis_url, prefix)
    try:
        sent = leak_sandbox.stats()
        assert sent["calls"] >= 1  # calls really went out, and each scenario did what it says
        if leak_sandbox.config.secret_key != SECRET:
            assert producer.store.pauses(["default"]), "a refused secret pauses the app"
        elif leak_sandbox.config.fault_rate:
            assert sum(sent["faults"].values()) >= 2
            assert any(r.name == "worker.client" and r.levelno == logging.WARNING
                       for r in caplog.records), "in-call retries are logged"
        else:
            assert {s.state for s in producer.statuses(ids) if s} == {"succeeded", "failed"}
        records = list(caplog.records)
        assert any(r.name == "worker.flush" for r in records)
        assert_clean(render_records(records), "the logs")
        statuses = [s.to_dict() for s in producer.statuses(ids) if s is not None]
        assert len(statuses) == len(ids)
        assert_clean(json.dumps(statuses), "the statuses")
        assert_clean(json.dumps(producer.stats()), "the stats")
        registry = make_registry(producer.store, lambda: {"default"})
        assert_clean(render(registry).decode(), "the metrics")
    finally:
        producer.close()
    assert_clean(repr(settings) + str(settings) + repr(settings.app) + repr(dict(settings.apps)),
                 "repr(settings)")


def test_exceptions_carry_no_secret(auth: str, leak_sandbox: SandboxServer) -> None:
    from worker.client import TpnsClient
    from worker.model import Account, BatchItem

    settings = Settings.from_env(env("redis://127.0.0.1:1/0", "x:", leak_sandbox.url, auth))
    items = [BatchItem(id=f"i{k}", token=f"tok-{k}", accounts=(Account(f"u{k}"),))
             for k in range(3)]
    with TpnsClient(settings.app, sleep=lambda s: None, max_attempts=2) as client:
        assert_clean(repr(client), "repr(client)")
        try:
            result = client.batchoperate(2, items)
        except TpnsError as exc:
            text = "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.__dict__)
            assert_clean(text, "an exception")
        else:
            assert_clean(repr(result), "a call result")
    if leak_sandbox.config.secret_key != SECRET or leak_sandbox.config.fault_rate:
        assert leak_sandbox.stats()["calls"] >= 1


def test_cli_output_carries_no_secret(redis_url: str, prefix: str) -> None:
    with SandboxServer(access_id=ACCESS_ID, secret_key="wrong", seed=1) as sandbox:
        environ = env(redis_url, prefix, sandbox.url, "basic")
        producer, ids = run_batches(Settings.from_env(environ), redis_url, prefix)
        producer.close()
    runner = CliRunner()
    outputs = []
    for args in (["stats"], ["stats", "--json"], ["status", "--", *ids, "no-such-id"], ["health"],
                 ["health", "--worker"], ["status", "--help"]):
        result = runner.invoke(main, args, env=environ, catch_exceptions=False)
        outputs.append(result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            outputs.append("".join(traceback.format_exception(result.exception)))
    assert '"state": "queued"' in outputs[2]  # the paused batch went back to the queue
    assert "paused" in outputs[3]
    assert_clean("\n".join(outputs), "the CLI output")


def test_batch_and_call_lines_carry_structured_fields(redis_url: str, prefix: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """With ``TPNS_LOG_FORMAT=json`` the per-batch and per-call lines are queryable fields; the
    worker logs one INFO line per batch (with the answered call's fields), the call's own line
    is DEBUG."""
    with SandboxServer(access_id=ACCESS_ID, secret_key=SECRET, seed=1) as sandbox:
        settings = Settings.from_env({**env(redis_url, prefix, sandbox.url, "sign"),
                                      "TPNS_LOG_FORMAT": "json"})
        caplog.set_level(logging.DEBUG)
        producer, _ = run_batches(settings, redis_url, prefix)
        producer.close()
    assert settings.log_format == "json"
    formatter = JsonFormatter()
    info = [r for r in caplog.records if r.name.startswith("worker.")
            and r.levelno >= logging.INFO and hasattr(r, "operator_type")]
    assert [r.name for r in info] == ["worker.flush"]  # one line per batch at INFO
    batch = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "worker.flush"
             and r.levelno == logging.INFO and hasattr(r, "batch_id")]
    call = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "worker.client"]
    assert len(batch) == 1 and len(call) == 1 and call[0]["level"] == "debug"
    assert batch[0]["batch_id"] and batch[0]["operator_type"] == 2 and batch[0]["items"] == 6
    assert batch[0]["ret_code"] == 1008026 and batch[0]["attempt"] == 1
    assert batch[0]["http_status"] == 200
    assert batch[0]["latency_ms"] > 0 and batch[0]["outcomes"] == {"succeeded": 5, "failed": 1}
    assert call[0]["operator_type"] == 2 and call[0]["items"] == 6
    assert call[0]["ret_code"] == 1008026 and call[0]["attempt"] == 1
    assert call[0]["http_status"] == 200 and call[0]["latency_ms"] > 0
