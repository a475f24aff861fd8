"""Wake-ups: the only Celery messages tpns-batcher sends (SPEC §2).

A wake names one ``(app, operator_type)`` and asks a worker to run the flush task for it, at once
(a full batch is waiting) or after the linger (a partial batch). Intents themselves never travel
through the broker; the store's flags keep wakes to about one per batch. A ``verify`` wake
(TPNS_VERIFY=on) asks for the verify task of one app instead, after the verify delay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .celery_app import make_celery
from .keys import FLUSH_TASK, SWEEP_TASK, VERIFY_TASK
from .settings import Settings
from .store import Wake

__all__ = ["FLUSH_TASK", "SWEEP_TASK", "VERIFY_TASK", "CeleryWaker"]


class CeleryWaker:
    """Sends flush wake-ups through a Celery app (made lazily, without the worker's tasks)."""

    def __init__(self, settings: Settings, redis_url: str, prefix: str | None = None,
                 celery_app: Any = None) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.prefix = prefix or settings.prefix
        self._app = celery_app
        self._own_app = celery_app is None

    @property
    def app(self) -> Any:
        if self._app is None:
            self._app = make_celery(self.settings, self.redis_url, self.prefix)
        return self._app

    def __call__(self, wakes: Sequence[Wake], delay_s: float | None = None) -> None:
        for wake in wakes:
            wait_s = delay_s if delay_s is not None else wake.delay_s
            if wake.kind == "verify":
                countdown = self.settings.verify_delay_ms / 1000 if wait_s is None else wait_s
                self.app.send_task(VERIFY_TASK, args=[wake.app], countdown=countdown or None)
                continue
            countdown = wait_s if wait_s is not None else (
                0.0 if wake.kind == "now" else self.settings.linger_ms / 1000)
            self.app.send_task(FLUSH_TASK, args=[wake.app, wake.operator_type],
                               countdown=countdown or None)

    def close(self) -> None:
        """Release the broker connections this waker opened (if it made its own app)."""
        if self._app is not None and self._own_app:
            self._app.close()
