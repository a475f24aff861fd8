"""The live terminal view (``stats --watch``) and the overview figures it shows."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from worker.cli import main
from worker.monitor import views
from worker.monitor.overview import read_overview
from worker.producer import Producer
from worker.settings import Settings


@pytest.fixture
def producer(redis_url: str, prefix: str) -> Any:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_LINGER_MS": "0"})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as p:
        yield p


def fill(producer: Producer) -> list[str | None]:
    ids = producer.submit_many([{"operator_type": 4, "token": f"t{k}"} for k in range(3)])
    claim = producer.store.claim("default", 4)
    outcomes = [{"id": ids[0], "state": "succeeded", "result_code": "0", "ret_code": 0},
                {"id": ids[1], "state": "failed", "result_code": "1008006", "ret_code": 1008026,
                 "error": "invalid_token"},
                {"id": ids[2], "state": "retry", "error": "[red]http_503", "delay_s": 60}]
    producer.store.complete(claim.batch_id or "", outcomes, calls=1, items_sent=3,
                            operator_type=4, call_metrics=[("partly_failed", 30.0)])
    producer.store.heartbeat("host:1")
    return ids


def test_watch_refreshes_until_ctrl_c(producer: Producer) -> None:
    ids = fill(producer)
    out = io.StringIO()
    reads = []
    waits: list[float] = []

    def read() -> dict[str, Any]:
        reads.append(1)
        return read_overview(producer.store, producer.apps())

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise KeyboardInterrupt

    views.watch(read, 0.5, console=Console(file=out, width=160, force_terminal=False),
                wait=wait)
    text = out.getvalue()
    assert waits == [0.5, 0.5, 0.5] and len(reads) == 3  # first paint, then one per interval
    assert "queue depth" in text and "1 (in flight 0)" in text
    assert "partly_failed 1" in text and "30.0 ms" in text
    assert "host:1" in text and "not paused" in text
    assert str(ids[1]) in text and "invalid_token, result 1008006, ret_code 1008026" in text


def test_dashboard_shows_a_pause_and_keeps_markup_as_text(producer: Producer) -> None:
    fill(producer)
    producer.store.pause("default", 30, "credentials:[1008003]")
    out = io.StringIO()
    Console(file=out, width=160).print(views.dashboard(read_overview(producer.store, {"default"})))
    assert "default paused (credentials:[1008003]" in out.getvalue()


class _TwoWaits:
    """Stands in for threading.Event: the second wait is a Ctrl-C."""

    calls = 0

    def wait(self, timeout: float | None = None) -> bool:
        type(self).calls += 1
        if type(self).calls >= 2:
            raise KeyboardInterrupt
        return False


def test_stats_watch_exits_0_on_ctrl_c(producer: Producer, redis_url: str, prefix: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fill(producer)
    monkeypatch.setattr(threading, "Event", _TwoWaits)
    environ = {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix}
    _TwoWaits.calls = 0
    result = CliRunner().invoke(main, ["stats", "--watch", "--interval", "0.2"], env=environ)
    assert result.exit_code == 0, result.output
    assert "items/call" in result.output and "workers seen" in result.output
    _TwoWaits.calls = 0
    result = CliRunner().invoke(main, ["stats", "--watch", "--json"], env=environ)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["calls"] == 1 for line in lines)
    result = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    assert json.loads(result.output)["states"]["failed"] == 1


def test_the_views_show_the_webhook_lag_and_last_error(producer: Producer) -> None:
    from worker.webhook_state import WebhookState

    out = io.StringIO()
    Console(file=out, width=200).print(views.dashboard(read_overview(producer.store, {"default"})))
    assert "not configured" in out.getvalue()  # no deliverer ever ran under this prefix
    state = WebhookState(producer.redis, producer.store.keys, name="w")
    assert state.acquire()
    state.start()
    fill(producer)  # three events after the cursor: succeeded, failed, retrying
    state.note_failure("HTTP 502")
    out = io.StringIO()
    Console(file=out, width=200).print(views.dashboard(read_overview(producer.store, {"default"})))
    assert "webhook lag 3 events (last delivered never, last error HTTP 502)" in out.getvalue()
    result = CliRunner().invoke(main, ["stats"], env={"REDIS_URL": producer.redis_url,
                                                       "TPNS_REDIS_PREFIX": producer.store.prefix})
    assert "webhook lag 3 events" in result.stdout
