"""``tpns-batcher bench --ingest``: a short run of every door; the answers are checked, never the
speeds (they belong to a quiet machine and the benchmark itself)."""

from __future__ import annotations

import pytest

from worker.tools.harness import Reporter
from worker.tools.ingest import TARGETS, run_ingest

FIGURES = ("bare_post_per_s", "post_per_s", "post_ratio", "submit_1_per_s", "submit_16_per_s",
           "submit_16_intents_per_commit", "submit_many_per_s", "async_submit_256_per_s",
           "async_256_intents_per_commit", "submit_16_per_cpu_s", "submit_many_per_cpu_s")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_every_door_is_measured_and_every_post_was_answered_with_an_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "TPNS_REDIS_PREFIX", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)  # a private Redis, stopped afterwards
    figures = run_ingest(Reporter(quiet=True), connections=4, seconds=0.4, many=300, rounds=2)
    assert figures["post_errors"] == 0  # every POST was a 200 with an id, on both servers
    for name in FIGURES:
        assert isinstance(figures[name], (int, float)) and figures[name] > 0, name
    assert set(figures["targets_met"]) == set(TARGETS)
