"""Waiting for a condition: poll it with a deadline, never sleep a fixed time and hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float = 60.0, *, interval_s: float = 0.05,
               message: str | Callable[[], str] = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy (and return that); raise
    ``AssertionError`` naming ``message`` once ``timeout_s`` has passed.

    The deadline is generous on purpose: it only bounds how long a failing test takes to say so,
    so a loaded machine never turns a slow pass into a failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for: {text}")
        time.sleep(interval_s)
