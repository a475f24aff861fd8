"""``tpns-batcher status``, ``wait`` and ``history`` of a compacted intent (issue 16: a
succeeded intent past ``TPNS_STATUS_DETAIL_S``), in process against a real Redis."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.support.summaries import PAYLOAD_FIELDS, settle
from worker.cli import main
from worker.producer import Producer
from worker.settings import Settings


@pytest.fixture
def compacted(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The id of a succeeded intent whose whole record is gone; the CLI's environment set."""
    env = {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "0",
           "TPNS_STATUS_DETAIL_S": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
    with Producer(redis_url, prefix, settings=Settings.from_env(env),
                  wake=lambda wakes: None) as producer:
        intent_id = producer.submit({"operator_type": 1, "token": "tok-cli",
                                     "account_list": [{"account": "cli@example.com"}]})
        settle(producer.store)
        assert producer.store.redis.exists(producer.store.keys.record(intent_id)) == 0
    return intent_id


@pytest.mark.parametrize("command", ["status", "wait"])
def test_status_and_wait_print_the_compacted_status(compacted: str, command: str) -> None:
    done = CliRunner().invoke(main, [command, compacted], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    assert (printed["id"], printed["state"], printed["detail"]) == (
        compacted, "succeeded", "compacted")
    assert not set(PAYLOAD_FIELDS) & set(printed)


def test_history_prints_the_compacted_intent(compacted: str) -> None:
    done = CliRunner().invoke(main, ["history", "--token", "tok-cli"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    [line] = done.stdout.splitlines()
    assert (json.loads(line)["id"], json.loads(line)["detail"]) == (compacted, "compacted")
