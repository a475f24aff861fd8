"""The outcome rules of SPEC §6 as plain functions: what one claimed batch's calls did to its items.

No Celery, no Redis, no HTTP (the codes and their tables are ``worker.tpns_codes``): ``run_batch``
takes the call to make (``TpnsClient.batchoperate`` in the worker), makes it (and, for a rejected
call, its halves), and returns one ``ItemOutcome`` per item for the store to record. Nothing here
sleeps or reads the clock; ``now_ms`` and ``rng`` come in.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import CredentialsError, RateLimitedError, RejectedError, TpnsError
from .model import BatchItem
from .tpns_codes import (
    ACCEPTED_CLASSES,
    FAILED_ITEM_CODES,
    ITEM_LEVEL_RET_CODES,
    MAX_RETRY_DELAY_S,
    SUCCESS_ITEM_CODES,
    CallResult,
    item_verdict,
)

# the tables are SPEC §6's, in worker.tpns_codes; these names stay importable from here
__all__ = ["FAILED_ITEM_CODES", "MAX_RETRY_DELAY_S", "SUCCESS_ITEM_CODES", "BatchReport",
           "ItemOutcome", "call_class", "judge_items", "retry_delay_s", "retry_or_exhausted",
           "run_batch"]

State = Literal["succeeded", "failed", "retry", "requeue"]


@dataclass(frozen=True)
class ItemOutcome:
    """What happens to one item after its batch's calls.

    ``retry``: back to the queue as ``retrying``, eligible again after ``delay_s``; ``requeue``:
    back to the queue without counting the attempt (sending for the app pauses).
    """

    id: str
    state: State
    #: the item's own code from ``result``
    result_code: str | None = None
    #: ret_code and err_msg of the call that decided the outcome
    ret_code: int | None = None
    err_msg: str | None = None
    #: short machine-readable reason: ``invalid_token``, ``rejected:1008007``, ``exhausted``, ...
    error: str | None = None
    #: for ``retry``: seconds until the item is eligible again
    delay_s: float = 0.0


@dataclass(frozen=True)
class BatchReport:
    """The outcome of every item of a batch, in the items' order, and what the worker must know."""

    outcomes: list[ItemOutcome]
    #: every HTTP call made for this batch (halving makes several), in the order made
    calls: list[CallResult | TpnsError]
    #: set when sending for the app must pause (a credentials/billing error)
    pause: CredentialsError | None
    #: the largest ``Retry-After`` seen, for the worker's shared backoff
    retry_after_s: float | None


def retry_delay_s(attempts: int, rng: random.Random) -> float:
    """Backoff before an item's next call: ``min(2**attempts, 300)`` s with "equal jitter".

    The delay is uniform in ``[base/2, base]``: never 0, never above 300 s, and growing with
    ``attempts`` until the cap, while items that failed together spread out.
    """
    base = min(2.0 ** min(max(attempts, 0), 9), MAX_RETRY_DELAY_S)
    return base / 2 + rng.uniform(0.0, base / 2)


def retry_or_exhausted(item: BatchItem, error: str, *, now_ms: int, max_attempts: int,
                       max_age_s: float, rng: random.Random, ret_code: int | None = None,
                       err_msg: str | None = None, result_code: str | None = None) -> ItemOutcome:
    """``retry`` with a backoff, or ``failed`` with error ``exhausted`` when the item has been in
    ``max_attempts`` calls (``item.attempts`` counts the current one) or is ``max_age_s`` old."""
    age_s = (now_ms - item.created_at_ms) / 1000.0
    if item.attempts >= max_attempts or age_s >= max_age_s:
        return ItemOutcome(item.id, "failed", result_code, ret_code, err_msg, "exhausted")
    return ItemOutcome(item.id, "retry", result_code, ret_code, err_msg, error,
                       retry_delay_s(item.attempts, rng))


def judge_items(result: CallResult, items: Sequence[BatchItem], *, now_ms: int, max_attempts: int,
                max_age_s: float, rng: random.Random) -> list[ItemOutcome]:
    """Each item of an accepted call (ret_code 0/1008026/1008027) by its own ``result[i]``."""
    out: list[ItemOutcome] = []
    ret_code, err_msg = result.ret_code, result.err_msg
    for index, item in enumerate(items):
        if index >= len(result.result):
            if ret_code == 0:
                # the call was accepted as a whole; TPNS just listed fewer codes than items
                out.append(ItemOutcome(item.id, "succeeded", None, ret_code, err_msg))
            else:
                # 1008026/1008027 with a short result: the failed items are not named, so an
                # item without an entry may have failed; retry it rather than guess success
                out.append(retry_or_exhausted(item, "no_result", now_ms=now_ms,
                                              max_attempts=max_attempts, max_age_s=max_age_s,
                                              rng=rng, ret_code=ret_code, err_msg=err_msg))
            continue
        code = result.result[index]
        state, error = item_verdict(code)
        if state != "retry":
            out.append(ItemOutcome(item.id, state, code, ret_code, err_msg, error))
        else:
            out.append(retry_or_exhausted(item, error or code, now_ms=now_ms,
                                          max_attempts=max_attempts, max_age_s=max_age_s,
                                          rng=rng, ret_code=ret_code, err_msg=err_msg,
                                          result_code=code))
    return out


def run_batch(client_call: Callable[[int, Sequence[BatchItem]], CallResult], operator_type: int,
              items: Sequence[BatchItem], *, now_ms: int, max_attempts: int, max_age_s: float,
              rng: random.Random) -> BatchReport:
    """Send ``items`` with ``client_call`` and apply the outcome rules of SPEC §6.

    A rejected call (1008001/1008002/1008007) is split in halves, each sent on its own, down to
    single items, so one bad item cannot sink the others. A credentials/billing error stops all
    sending: every item not yet decided is requeued and ``pause`` is set. Exceptions that are not
    ``TpnsError`` (a bug, a ``ValueError`` from ``build_body``) propagate.
    """
    run = _BatchRun(client_call, operator_type, now_ms=now_ms, max_attempts=max_attempts,
                    max_age_s=max_age_s, rng=rng)
    run.send(list(items))
    return run.report(items)


class _BatchRun:
    """The steps of one ``run_batch``: each call (halving on a rejection) and what it decided."""

    def __init__(self, client_call: Callable[[int, Sequence[BatchItem]], CallResult],
                 operator_type: int, *, now_ms: int, max_attempts: int, max_age_s: float,
                 rng: random.Random) -> None:
        self.client_call = client_call
        self.operator_type = operator_type
        self.now_ms = now_ms
        self.max_attempts = max_attempts
        self.max_age_s = max_age_s
        self.rng = rng
        self.decided: dict[str, ItemOutcome] = {}
        self.calls: list[CallResult | TpnsError] = []
        self.pause: CredentialsError | None = None
        self.retry_after: float | None = None

    def again(self, item: BatchItem, error: str, ret_code: int | None,
              err_msg: str | None) -> ItemOutcome:
        return retry_or_exhausted(item, error, now_ms=self.now_ms, max_attempts=self.max_attempts,
                                  max_age_s=self.max_age_s, rng=self.rng, ret_code=ret_code,
                                  err_msg=err_msg)

    def send(self, group: Sequence[BatchItem]) -> None:
        """One call for ``group``, and the outcomes it decides (the halves' calls on a rejection)."""
        if self.pause is not None:
            return
        try:
            result = self.client_call(self.operator_type, group)
        except RejectedError as exc:
            self.calls.append(exc)
            if len(group) == 1:
                self.decided[group[0].id] = ItemOutcome(
                    group[0].id, "failed", None, exc.ret_code, exc.err_msg,
                    f"rejected:{exc.ret_code}")
                return
            middle = (len(group) + 1) // 2
            self.send(group[:middle])
            self.send(group[middle:])
            return
        except CredentialsError as exc:
            self.calls.append(exc)
            self.pause = exc
            return
        except TpnsError as exc:  # transient (already retried in-call) or an unnamed permanent one
            self.calls.append(exc)
            if isinstance(exc, RateLimitedError) and exc.retry_after_s is not None:
                self.retry_after = max(self.retry_after or 0.0, exc.retry_after_s)
            for item in group:
                self.decided[item.id] = self.again(item, exc.code, exc.ret_code, exc.err_msg)
            return
        self.calls.append(result)
        if result.ret_code not in ITEM_LEVEL_RET_CODES:  # a client returned what it should raise
            for item in group:
                self.decided[item.id] = self.again(item, f"ret_{result.ret_code}",
                                                   result.ret_code, result.err_msg)
            return
        for outcome in judge_items(result, group, now_ms=self.now_ms,
                                   max_attempts=self.max_attempts, max_age_s=self.max_age_s,
                                   rng=self.rng):
            self.decided[outcome.id] = outcome

    def report(self, items: Sequence[BatchItem]) -> BatchReport:
        """One outcome per item, in order: what a call decided, or requeued by the pause."""
        outcomes: list[ItemOutcome] = []
        pause = self.pause
        for item in items:
            outcome = self.decided.get(item.id)
            if outcome is None:
                assert pause is not None, "every item is decided unless sending paused"
                outcome = ItemOutcome(item.id, "requeue", None, pause.ret_code, pause.err_msg,
                                      pause.code)
            outcomes.append(outcome)
        return BatchReport(outcomes=outcomes, calls=self.calls, pause=pause,
                           retry_after_s=self.retry_after)


def call_class(call: CallResult | TpnsError) -> tuple[str, float]:
    """(result class, latency ms or -1) of one call, as the metrics hash counts them (the classes
    are ``worker.tpns_codes.CALL_CLASSES``)."""
    if isinstance(call, CallResult):
        return ACCEPTED_CLASSES.get(call.ret_code, "unexpected"), call.latency_ms
    if isinstance(call, RejectedError):
        return "rejected", -1.0
    if isinstance(call, CredentialsError):
        return "credentials", -1.0
    if isinstance(call, RateLimitedError):
        return "rate_limited", -1.0
    return "transient", -1.0
