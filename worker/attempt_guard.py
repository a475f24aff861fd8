"""No HTTP attempt of a claimed batch without a live lease (SPEC §3.7), nor one that could not
end before the lease does.

``AttemptGuard.before_call(app)`` is what a flush's ``TpnsClient`` runs before every attempt. It
reads, per sender thread, what the flush put in ``batch`` about the batch being sent:
``backoff_read``, the app's shared backoff was read with the claim, so the first attempt need not
read it again (``waited``: the thread then slept for it); ``send_by``, the monotonic time after
which no HTTP attempt may start; ``batch_id``, whose lease every attempt confirms first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import LeaseSpentError, LeaseUnconfirmedError
from .settings import Settings
from .store import Store, unavailable


class AttemptGuard:
    """The lease check and deadline of every HTTP attempt of one worker process's flushes."""

    def __init__(self, settings: Settings, store: Store, *, sleep: Callable[[float], None],
                 monotonic: Callable[[], float]) -> None:
        self.settings = settings
        self.store = store
        self.sleep = sleep
        self.monotonic = monotonic
        #: per thread (for a threads pool), about the batch being sent (see the module's doc)
        self.batch = threading.local()
        #: an attempt takes at most a connect and a read timeout, plus some slack (Settings keeps
        #: the lease at least 4 timeouts long, so a fresh batch always has time for one attempt)
        self.attempt_s = 2 * settings.http_timeout_s + min(1.0, settings.lease_s / 10)

    def before_call(self, app: str) -> Callable[[], None]:
        """The hook a client of ``app`` runs before each HTTP attempt."""
        def before_call() -> None:
            # No HTTP attempt without a live lease (SPEC §3.7): the claim itself confirmed it
            # for the first attempt (one round trip ago, with the backoff read); every other
            # attempt (tenacity's retries, the halves of a rejected call) asks Redis again, in
            # the throttle's round trip, and once more after any wait.
            batch = self.batch
            if getattr(batch, "backoff_read", False):
                batch.backoff_read = False
                if getattr(batch, "waited", False):  # held for the backoff: ask again
                    batch.waited = False
                    self.confirm(lambda: 0.0 if self.store.lease_held(batch.batch_id) else None)
            else:
                batch_id = getattr(batch, "batch_id", None)
                wait_s = self.confirm(lambda: self.store.before_attempt(
                    app, self.settings.max_calls_per_s, batch_id))
                if wait_s is not None and wait_s > 0:
                    self.sleep(min(wait_s, self.time_left()))
                    if batch_id:
                        self.confirm(lambda: 0.0 if self.store.lease_held(batch_id) else None)
            if self.time_left() <= 0:
                raise LeaseSpentError("not sent: the batch's lease would end before the call could")

        return before_call

    def confirm(self, ask: Callable[[], float | None]) -> float:
        """``ask()`` Redis about the current batch's lease; no attempt unless it answers yes."""
        try:
            answer = ask()
        except Exception as exc:
            if not unavailable(exc):
                raise
            raise LeaseUnconfirmedError("not sent: Redis is unreachable, so the batch's lease "
                                        "cannot be confirmed") from None
        if answer is None:
            raise LeaseUnconfirmedError("not sent: the batch's lease is no longer held (lost in "
                                        "a Redis restart or failover, or expired)")
        return answer

    def time_left(self) -> float:
        """Seconds until no HTTP attempt of the current batch may start (inf outside a batch)."""
        send_by = getattr(self.batch, "send_by", None)
        return float("inf") if send_by is None else send_by - self.monotonic()
