"""The verification loop (SPEC §6.1), free of Celery: claim the verifying items that are due,
query TPNS for their bindings, and record for each whether it was seen applied.

``Verifier.verify(app)`` is what the ``tpns.verify`` task calls. A round claims up to
``CLAIM_ITEMS`` due items of one app under a lease (the same leases as batches, so a worker
killed mid-check loses nothing: the reaper hands the items back for another check), makes the
fewest query calls that read what their postconditions need (``worker.verify.plan``), and ends
in one store call. Query calls go through ``TpnsClient`` like batchoperate: the same auth,
in-call retries, rate limit (the app's shared GCRA slot), shared backoff and pause.

For each item: shown -> ``verified`` (succeeded); not shown and its deadline (the call's time +
``TPNS_VERIFY_TIMEOUT_S``) not reached -> checked again after a backoff that doubles from
``TPNS_VERIFY_DELAY_MS``, never past the deadline; not shown at the deadline -> sent again as a
``retrying`` item (one attempt spent, the usual backoff), or ``failed`` with ``not_applied`` once
the retry budget is spent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .client import TpnsClient
from .errors import (
    CredentialsError,
    LeaseSpentError,
    LeaseUnconfirmedError,
    RateLimitedError,
    TpnsError,
)
from .keys import WAKE_FLAG_MS
from .model import BatchItem
from .outcomes import retry_or_exhausted
from .settings import Settings
from .store import Store, Wake, unavailable
from .tpns_codes import RETRY_AFTER_CAP_S
from .verify import Observed, Subject, needs, plan, read_answer, shown
from .verifying import VerifyClaim, VerifyItem, claim_verify, due_apps, verify_done

logger = logging.getLogger(__name__)

#: items one check round claims: 20 items of ops 2-5 read in 1-2 query calls
CLAIM_ITEMS = 20
#: rounds one task makes before handing over to a fresh wake (keeps tasks short)
ROUNDS_PER_TASK = 8
#: the error a verifying item gets when its call was not seen applied in time
NOT_APPLIED = "not_applied"

WakeSender = Callable[[Sequence[Wake]], None]


@dataclass
class VerifyResult:
    """What one verify task did."""

    rounds: int = 0
    items: int = 0
    verified: int = 0
    query_calls: int = 0
    stopped: str = ""


class Verifier:
    """One worker process's verification machinery (one ``TpnsClient`` per app, made lazily)."""

    def __init__(self, settings: Settings, store: Store, wake: WakeSender, *,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 now_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.settings = settings
        self.store = store
        self.wake = wake
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.monotonic = monotonic
        self.now_ms = now_ms
        self._clients: dict[str, TpnsClient] = {}
        self._clients_lock = threading.Lock()  # a threads pool shares one Verifier
        #: per thread: the round's lease id and the monotonic time no query may start after
        self._round = threading.local()

    def client(self, app: str) -> TpnsClient:
        with self._clients_lock:
            if app not in self._clients:
                self._clients[app] = self._make_client(app)
            return self._clients[app]

    def _make_client(self, app: str) -> TpnsClient:
        s = self.settings

        def before_call() -> None:
            # like a batch's attempts: no query unless Redis confirms the round's lease, in the
            # round trip that also takes a slot of the app's rate limit
            batch_id = getattr(self._round, "batch_id", None)
            try:
                wait_s = self.store.before_attempt(app, s.max_calls_per_s, batch_id)
            except Exception as exc:
                if not unavailable(exc):
                    raise
                raise LeaseUnconfirmedError("no query: Redis is unreachable") from None
            if wait_s is None:
                raise LeaseUnconfirmedError("no query: the check's lease is no longer held")
            if wait_s > 0:
                self.sleep(min(wait_s, max(0.0, self._time_left())))
            if self._time_left() <= 0:
                raise LeaseSpentError("no query: the check's lease would end first")

        return TpnsClient(s.apps[app], timeout_s=s.http_timeout_s, budget_s=s.lease_s / 2,
                          sleep=self.sleep, before_call=before_call)

    def _time_left(self) -> float:
        send_by = getattr(self._round, "send_by", None)
        return float("inf") if send_by is None else send_by - self.monotonic()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def sweep(self) -> int:
        """Wake the verify task of every app with a check due (the sweep runs each second);
        the number of wakes sent."""
        apps = sorted(set(self.settings.apps) | self.store.known_apps())
        wakes = [Wake(app, 0, "verify", 0.0) for app in due_apps(self.store, apps)
                 if self.store.claim_verify_wake(app)]
        if wakes:
            self.wake(wakes)
        return len(wakes)

    def verify(self, app: str) -> VerifyResult:
        """Check up to ``ROUNDS_PER_TASK`` rounds of ``app``'s due verifying items."""
        result = VerifyResult()
        self.store.clear_verify_wake(app)  # started: the next wake may be sent
        for _ in range(ROUNDS_PER_TASK):
            claim = claim_verify(self.store, app, CLAIM_ITEMS)
            if claim.kind != "batch":
                result.stopped = claim.kind
                if claim.kind == "empty":
                    self._come_back(app, claim.left)
                break
            verified, calls = self.check(app, claim)
            result.rounds += 1
            result.items += len(claim.items)
            result.verified += verified
            result.query_calls += calls
            if not claim.left:
                result.stopped = "empty"
                self._come_back(app, claim.next_ms)
                break
        else:
            self.wake([Wake(app, 0, "verify", 0.0)])  # more are due: a fresh task goes on
        return result

    def _come_back(self, app: str, next_ms: int) -> None:
        """A check comes due within the sweep's reach: one wake for then (the completions'
        wakes are one per app and delay window, so later items would wait for the sweep)."""
        if 0 <= next_ms <= WAKE_FLAG_MS and self.store.claim_verify_wake(app, next_ms):
            self.wake([Wake(app, 0, "verify", next_ms / 1000)])

    def check(self, app: str, claim: VerifyClaim) -> tuple[int, int]:
        """Query for one claimed round and record every item's outcome; (verified, calls)."""
        s = self.settings
        subjects = [Subject(it.operator_type, it.token, it.accounts) for it in claim.items]
        seen = Observed()
        calls = 0
        paused: CredentialsError | None = None
        self._round.batch_id = claim.batch_id
        # a check must end within its lease, like a batch: keep time for one last attempt
        self._round.send_by = self.monotonic() + s.lease_s - (2 * s.http_timeout_s + 1)
        try:
            for call in plan([needs(subject) for subject in subjects]):
                try:
                    answer = self.client(app).query(call.body())
                except (LeaseUnconfirmedError, LeaseSpentError):
                    break
                except CredentialsError as exc:
                    calls += 1
                    paused = exc
                    break
                except RateLimitedError as exc:
                    calls += 1
                    if exc.retry_after_s:
                        self.store.set_backoff(app, min(exc.retry_after_s, RETRY_AFTER_CAP_S))
                    break
                except TpnsError:  # transient, already retried in-call: those keys stay unseen
                    calls += 1
                    continue
                calls += 1
                read_answer(call, answer.data or {}, seen)
        finally:
            self._round.batch_id = self._round.send_by = None
        if paused is not None:
            logger.error("app %s paused for %gs: TPNS refused a query (ret_code=%s)", app,
                         s.pause_s, paused.ret_code)
            self.store.pause(app, s.pause_s, paused.code)
        now = self.now_ms()
        outcomes = [self.decide(item, shown(subject, seen), now, paused is not None)
                    for item, subject in zip(claim.items, subjects, strict=True)]
        done = verify_done(self.store, claim.batch_id, outcomes, query_calls=calls)
        verified = sum(o["state"] == "verified" for o in outcomes)
        logger.info("verify %s app=%s items=%d verified=%d query_calls=%d", claim.batch_id, app,
                    len(outcomes), verified, calls,
                    extra={"batch_id": claim.batch_id, "app": app, "items": len(outcomes),
                           "verified": verified, "query_calls": calls})
        if done.wakes:
            self.wake(done.wakes)
        return verified, calls

    def decide(self, item: VerifyItem, seen: bool, now_ms: int, paused: bool) -> dict[str, Any]:
        """One item's outcome (see the module docstring); a plain mapping for the store."""
        s = self.settings
        if seen:
            return {"id": item.id, "state": "verified"}
        if paused:  # the check could not be made: ask again after the pause, spending nothing
            return {"id": item.id, "state": "keep", "delay_ms": int(s.pause_s * 1000)}
        if now_ms < item.deadline_ms:
            backoff = s.verify_delay_ms * 2 ** min(item.checks + 1, 20)
            return {"id": item.id, "state": "check",
                    "delay_ms": max(1, min(backoff, item.deadline_ms - now_ms))}
        batch_item = BatchItem(item.id, item.token, item.accounts, item.attempts,
                               item.created_at_ms)
        again = retry_or_exhausted(batch_item, NOT_APPLIED, now_ms=now_ms,
                                   max_attempts=s.max_attempts, max_age_s=s.max_age_s,
                                   rng=self.rng)
        if again.state == "retry":
            return {"id": item.id, "state": "retry", "delay_ms": int(again.delay_s * 1000),
                    "error": NOT_APPLIED}
        return {"id": item.id, "state": "failed", "error": NOT_APPLIED}
