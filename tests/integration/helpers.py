"""Helpers shared by the integration tests: reading what each claim saw from a worker's log.
(Polling with a deadline is ``tests.support.polling.wait_until``, shared by the whole suite.)"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


# -- what each claim saw, from a worker's JSON log (TPNS_LOG_FORMAT=json) ---------------------

@dataclass(frozen=True)
class ClaimSeen:
    """One batch's log line: what its claim saw (SPEC §3.2) and what it took."""

    batch_id: str
    app: str
    operator_type: int
    items: int
    eligible: int
    oldest_eligible_ms: int
    reason: str


def claims_in_log(text: str) -> list[ClaimSeen]:
    """Every batch line of a worker's JSON log (other lines, and Celery's plain ones, skipped)."""
    out = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("logger") == "worker.flush" and "eligible" in record:
            out.append(ClaimSeen(record["batch_id"], record["app"], record["operator_type"],
                                 record["items"], record["eligible"],
                                 record["oldest_eligible_ms"], record["reason"]))
    return out


def flush_rule_breaches(claims: Iterable[ClaimSeen], max_items: int,
                        linger_ms: int) -> list[str]:
    """The claims that broke SPEC §3.2's flush rule, each with why (empty when none did).

    A claim takes every eligible item up to ``max_items``, and it takes fewer than
    ``max_items`` only when fewer were eligible and the oldest of them had been eligible for
    the linger. (Halving a rejected call makes smaller calls, not smaller claims: the rule is
    about claims, so those calls need no exemption here.)
    """
    bad = []
    for c in claims:
        if c.items != min(c.eligible, max_items):
            bad.append(f"{c.batch_id}: took {c.items} of {c.eligible} eligible items")
        elif c.items < max_items and c.oldest_eligible_ms < linger_ms:
            bad.append(f"{c.batch_id}: a partial batch of {c.items} went after "
                       f"{c.oldest_eligible_ms} ms, before the linger ({linger_ms} ms)")
        elif c.reason != ("full" if c.eligible >= max_items else "linger"):
            bad.append(f"{c.batch_id}: reason {c.reason!r} with {c.eligible} eligible")
    return bad


def assert_flush_rule(logs: Iterable[str], max_items: int, linger_ms: int) -> list[ClaimSeen]:
    """SPEC §3.2 claim by claim over workers' JSON logs; returns the claims (at least one)."""
    claims = [c for text in logs for c in claims_in_log(text)]
    assert claims, "no batch line in the workers' logs (TPNS_LOG_FORMAT=json?)"
    bad = flush_rule_breaches(claims, max_items, linger_ms)
    assert not bad, f"{len(bad)} of {len(claims)} claims broke the flush rule: {bad[:5]}"
    return claims
