"""The flush loop, free of Celery: claim a batch, call TPNS, record every outcome.

``Flusher`` holds what one worker process needs (the store, one ``TpnsClient`` per app, a waker)
and is what the Celery tasks call. Tests drive it directly as well.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .attempt_guard import AttemptGuard
from .client import TpnsClient
from .groupcommit import GroupCommit
from .model import BatchItem
from .outcomes import BatchReport, call_class, run_batch
from .settings import Settings
from .store import Claim, Completion, Store, Wake, unavailable
from .sweep import sweep as run_sweep
from .tpns_codes import RETRY_AFTER_CAP_S

logger = logging.getLogger(__name__)

#: how long one flush task keeps claiming before it hands over to a fresh wake (its calls still
#: end first): tasks stay short, so (app, op) pairs take turns on the worker's task threads
CLAIM_WINDOW_S = 1.0
#: and at most this many claims per call slot of the process, whatever the clock says
BATCHES_PER_SLOT = 2
#: claims one round trip makes at most (as many as free slots and eligible batches allow)
CLAIMS_PER_TRIP = 16
#: while a flush claims on, how often it asks for a successor (other processes and hosts join)
SUCCESSOR_EVERY_S = 0.05
#: how often a flush waiting for a free call slot looks whether the worker is shutting down
SLOT_POLL_S = 0.25
#: while Redis is unreachable after a call, how often recording its outcome is tried again
RECORD_RETRY_S = 0.25
#: completions one round trip carries at most
COMPLETIONS_PER_TRIP = 16

WakeSender = Callable[[Sequence[Wake]], None]


@dataclass
class FlushResult:
    """What one flush task did (``stopped``: why it claimed no more)."""

    batches: int = 0
    items: int = 0
    calls: int = 0
    stopped: str = ""


class Flusher:
    """One worker process's flushing machinery."""

    def __init__(self, settings: Settings, store: Store, wake: WakeSender,
                 clients: dict[str, TpnsClient] | None = None, *,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None,
                 should_stop: Callable[[], bool] = lambda: False,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_claim: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.store = store
        self.wake = wake
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.should_stop = should_stop
        self.monotonic = monotonic
        #: called after every claim (the watchdog's proof of progress)
        self.on_claim = on_claim
        #: the lease check and deadline of every HTTP attempt (its ``batch``: per sender thread)
        self._guard = AttemptGuard(settings, store, sleep=sleep, monotonic=monotonic)
        self._batch = self._guard.batch
        self._time_left = self._guard.time_left
        #: calls in flight at most in this process, over all its flushes (SPEC §2)
        self.max_in_flight = settings.max_in_flight
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        #: a slot is freed when its calls are answered, before the outcomes are recorded, so
        #: that the next claim need not wait for the recording: twice as many threads as slots
        #: (started as needed) let a new call start while the last ones are being recorded
        self._senders = ThreadPoolExecutor(2 * self.max_in_flight, thread_name_prefix="tpns-call")
        #: completions of calls answered about together share a round trip (each its own atomic
        #: script); no window is waited: a lone one goes at once, later ones go together next
        self._completions: GroupCommit[tuple[list[Any], list[Any]], Completion] = GroupCommit(
            store.complete_many, max_batch=COMPLETIONS_PER_TRIP, window_s=0.0)
        self.clients = clients if clients is not None else {
            name: self._make_client(name) for name in settings.apps}

    def _make_client(self, app: str) -> TpnsClient:
        s = self.settings
        # an answered attempt's line is DEBUG: the batch's line (send) carries its fields, and a
        # second line per call was a visible share of a call's CPU; failed attempts stay INFO
        return TpnsClient(s.apps[app], timeout_s=s.http_timeout_s, budget_s=s.lease_s / 2,
                          pool_size=s.max_in_flight, sleep=self.sleep,
                          before_call=self._guard.before_call(app),
                          call_log_level=logging.DEBUG)

    def close(self) -> None:
        """Wait for the calls in flight, then close the HTTP sessions."""
        self._senders.shutdown(wait=True)
        for client in self.clients.values():
            client.close()

    def flush(self, app: str, operator_type: int) -> FlushResult:
        """Claim and send batches of ``(app, operator_type)`` with up to ``max_in_flight`` calls
        in flight in this process, until none is eligible, the claim window closes, sending
        pauses or the worker shuts down; then wait for this flush's calls to end.

        One thread claims (a claim only after a call slot is free, so no lease ticks while a
        batch waits for one); each call runs on the process's sender pool, whose slots every
        flush of the process shares. Waiting for its own calls keeps a warm shutdown honest:
        Celery waits for the task, the task for its calls. While eligible work remains a
        successor is woken (once per wake flag), so other processes and hosts join in.
        """
        result = FlushResult()
        sending: list[Future[BatchReport]] = []
        trouble = threading.Event()  # a call paused the app or raised: claim no more
        try:
            result.stopped = self._claim_loop(app, operator_type, sending, trouble)
        finally:
            wait(sending)
        error: BaseException | None = None
        for future in sending:
            exc = future.exception()
            if exc is not None:
                error = error or exc
                continue
            report = future.result()
            result.batches += 1
            result.items += len(report.outcomes)
            result.calls += len(report.calls)
            if report.pause is not None:
                result.stopped = "paused"
        if error is not None:
            raise error
        return result

    def _claim_loop(self, app: str, op: int, sending: list[Future[BatchReport]],
                    trouble: threading.Event) -> str:
        """Claim batches and hand them to the sender pool; returns why it stopped."""
        # without a rate limit the throttle only reads the shared backoff: that read rides
        # along with the claim (as does clearing the wake flag), one round trip for all three
        unlimited = self.settings.max_calls_per_s <= 0
        window_ends = self.monotonic() + CLAIM_WINDOW_S
        successor_due = 0.0
        claims_left = BATCHES_PER_SLOT * self.max_in_flight
        want = 1  # claims of the next round trip: one until a claim tells how many are eligible
        first = True
        while claims_left > 0:
            slots = self._take_slots(min(want, claims_left))
            if not slots:
                return "shutdown"
            try:
                claims = self.store.claim_many(app, op, slots, clear_wake=first,
                                               read_backoff=unlimited)
            except BaseException:
                self._slots.release(slots)
                raise
            first = False
            claims_left -= slots
            self.on_claim()
            now = self.monotonic()
            batches = [claim for claim in claims if claim.kind == "batch"]
            if slots > len(batches):
                self._slots.release(slots - len(batches))
            send_by = now + self.settings.lease_s - self._guard.attempt_s
            for claim in batches:  # every batch claimed is leased: all of them go
                sending.append(self._senders.submit(self._send_claimed, app, op, claim, send_by,
                                                    unlimited, trouble))
            last = claims[-1]
            if last.kind != "batch":
                if last.kind == "wait":
                    self._linger_wake(app, op, last.wait_ms)
                return last.kind
            if not last.eligible_left:
                return "empty"
            # a successor wake at most every SUCCESSOR_EVERY_S: while this loop claims on,
            # asking after every claim would cost a round trip per batch for nothing (the flag
            # stays set until the woken flush's first claim)
            if now >= successor_due:
                self._successor(app, op, last.eligible_left, last.wait_ms)
                successor_due = now + SUCCESSOR_EVERY_S
            if trouble.is_set() or self.should_stop():
                return "paused" if trouble.is_set() else "shutdown"
            if now >= window_ends:
                break
            want = min(CLAIMS_PER_TRIP, -(-last.eligible_left // self.settings.max_items_per_call))
        # claims left over for a fresh flush: make sure one is woken
        self._successor(app, op, last.eligible_left, last.wait_ms)
        return "handed_over"

    def _take_slots(self, wanted: int) -> int:
        """Wait for a free call slot, then take up to ``wanted`` that are free; how many were
        taken (0 once the worker shuts down)."""
        while not self._slots.acquire(timeout=SLOT_POLL_S):
            if self.should_stop():
                return 0
        if self.should_stop():  # the shutdown came while this flush waited for the slot
            self._slots.release()
            return 0
        taken = 1
        while taken < wanted and self._slots.acquire(blocking=False):
            taken += 1
        return taken

    def _send_claimed(self, app: str, op: int, claim: Claim, send_by: float, unlimited: bool,
                      trouble: threading.Event) -> BatchReport:
        """One claimed batch on a sender thread: its call and its outcomes; frees the slot."""
        batch = self._batch
        batch.send_by = send_by
        batch.batch_id = claim.batch_id
        held = [True]

        def free_slot() -> None:
            if held[0]:
                held[0] = False
                self._slots.release()

        try:
            if unlimited:
                if claim.backoff_ms > 0:  # then the first attempt confirms the lease again
                    self.sleep(min(claim.backoff_ms / 1000, self._time_left()))
                    batch.waited = True
                batch.backoff_read = True
            report = self.send(app, op, claim.batch_id or "", claim.items, claim=claim,
                               after_calls=free_slot)
            if report.pause is not None:
                trouble.set()
            return report
        except BaseException:
            trouble.set()
            raise
        finally:
            batch.backoff_read = batch.waited = False
            batch.send_by = None
            batch.batch_id = None
            free_slot()

    def send(self, app: str, operator_type: int, batch_id: str,
             items: Sequence[BatchItem], *, claim: Claim | None = None,
             after_calls: Callable[[], None] = lambda: None) -> BatchReport:
        """Call TPNS for one claimed batch and record the outcome of every item.

        ``claim``, when given, is what the claim saw; the batch's log line carries it (why the
        batch went: ``full`` or ``linger``, how many items were eligible, the oldest one's age),
        so the flush rule of SPEC §3.2 can be checked batch by batch from the log.
        ``after_calls`` runs once the HTTP calls are over, before the outcomes are recorded.
        """
        client = self.clients[app]
        now_ms = int(time.time() * 1000)
        report = run_batch(client.batchoperate, operator_type, items, now_ms=now_ms,
                           max_attempts=self.settings.max_attempts,
                           max_age_s=self.settings.max_age_s, rng=self.rng)
        after_calls()
        if report.pause is not None:
            logger.error("sending for app %s paused for %gs: TPNS refused the credentials or the "
                         "app (ret_code=%s, %s); nothing was failed, the items wait in the queue",
                         app, self.settings.pause_s, report.pause.ret_code, report.pause.code)
            self.store.pause(app, self.settings.pause_s, report.pause.code)
        if report.retry_after_s:
            self.store.set_backoff(app, min(report.retry_after_s, RETRY_AFTER_CAP_S))
        # items_sent counts each item once per batch; halving shows up as extra calls
        sent = len(items) if report.calls else 0
        # vars(), not dataclasses.asdict(): the fields are flat, and asdict's deep copy of every
        # field of every outcome was a visible share of a batch's CPU
        call = self.store.complete_call(
            batch_id, [vars(o) for o in report.outcomes],
            calls=len(report.calls), items_sent=sent, operator_type=operator_type,
            call_metrics=[call_class(c) for c in report.calls])
        completion = self._record(lambda: self._completions.run(lambda: call))
        if completion.stale:
            logger.warning("batch %s: %d outcomes arrived after the lease was lost and were "
                           "dropped (the items were or will be sent again)", batch_id,
                           completion.stale)
        states: dict[str, int] = {}
        for o in report.outcomes:
            states[o.state] = states.get(o.state, 0) + 1
        last = report.calls[-1] if report.calls else None
        # why the batch went, as the claim saw it (SPEC §3.2): operators see why a call was
        # partial, and tests check the rule batch by batch from the log
        why = "" if claim is None else (f" ({claim.reason}: {claim.eligible} eligible, "
                                        f"oldest {claim.oldest_eligible_ms} ms)")
        logger.info("batch %s op=%s app=%s items=%d calls=%d outcomes=%s%s", batch_id,
                    operator_type, app, len(items), len(report.calls), states, why,
                    extra={"batch_id": batch_id, "operator_type": operator_type, "app": app,
                           "items": len(items), "calls": len(report.calls), "outcomes": states,
                           "reason": claim and claim.reason,
                           "eligible": claim and claim.eligible,
                           "oldest_eligible_ms": claim and claim.oldest_eligible_ms,
                           "ret_code": getattr(last, "ret_code", None),
                           "http_status": getattr(last, "http_status", None),
                           "latency_ms": round(getattr(last, "latency_ms", 0.0), 1) or None,
                           "attempt": max((getattr(c, "attempts", 1) for c in report.calls),
                                          default=0)})
        if completion.wakes:
            self.wake(completion.wakes)
        return report

    def _record(self, complete: Callable[[], Completion]) -> Completion:
        """Record a batch's outcomes, waiting for Redis if it went away after the call.

        Tried every ``RECORD_RETRY_S`` while the lease could still be held (a short outage then
        costs no resend); past that, the error goes up and the items come back when the lease
        is reaped. A retry after a lost reply finds the batch done and counts nothing twice
        but the call counters.
        """
        give_up = self.monotonic() + self.settings.lease_s
        while True:
            try:
                return complete()
            except Exception as exc:
                if not unavailable(exc) or self.monotonic() + RECORD_RETRY_S >= give_up \
                        or self.should_stop():
                    raise
                self.sleep(RECORD_RETRY_S)

    def _successor(self, app: str, op: int, left: int, wait_ms: int) -> None:
        if left >= self.settings.max_items_per_call or wait_ms <= 0:
            if self.store.claim_wake(app, op):
                self.wake([Wake(app, op, "now")])
        else:
            self._linger_wake(app, op, wait_ms)

    def _linger_wake(self, app: str, op: int, wait_ms: int) -> None:
        if self.store.claim_linger_wake(app, op, wait_ms):
            self.wake_after(app, op, wait_ms / 1000)

    def wake_after(self, app: str, op: int, delay_s: float) -> None:
        """Send one wake for ``(app, op)`` after ``delay_s`` (the waker decides how)."""
        self.wake([Wake(app, op, "now") if delay_s <= 0 else Wake(app, op, "linger", delay_s)])

    def sweep(self) -> dict[str, int]:
        """Reap expired leases and wake every (app, op) with work (``worker.sweep``); runs every
        second from beat."""
        return run_sweep(self.settings, self.store, self.wake)
