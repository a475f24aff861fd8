"""Injected faults: which call gets one (a seeded draw) and what it is answered.

Faults apply to batchoperate only. Every kind but ``timeout`` replaces the answer and changes no
state; ``timeout`` is answered normally but ``slow_ms`` late (the server adds that delay).
"""

from __future__ import annotations

import random
import threading

from .config import SandboxConfig
from .protocol import ERR_MSG
from .transport import Reply, json_reply


class FaultDraw:
    """The fault sequence: ``random.Random(seed)``, so a seed gives a reproducible sequence."""

    def __init__(self, seed: int | None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the sequence."""
        with self._lock:
            self._rng = random.Random(seed)

    def draw(self, config: SandboxConfig) -> str | None:
        """The fault for this call, or None (probability ``1 - fault_rate``)."""
        if config.fault_rate <= 0 or not config.faults:
            return None
        with self._lock:
            if self._rng.random() >= config.fault_rate:
                return None
            return self._rng.choice(config.faults)


def fault_ret_code(fault: str) -> int | None:
    """The ret_code a fault answers with (``"1008004"`` -> 1008004), None for the others."""
    return int(fault) if fault.isdigit() else None


def fault_reply(fault: str, retry_after_s: float) -> Reply:
    """The answer of a fault other than ``timeout``."""
    retry_after = f"{retry_after_s:g}"
    if fault == "drop":
        return Reply(drop=True)
    if fault in ("http_500", "http_503", "http_429"):
        status = int(fault.removeprefix("http_"))
        headers = {"Retry-After": retry_after} if status == 429 else {}
        text = f"sandbox: injected HTTP {status}\n".encode()
        return Reply(status, text, "text/plain; charset=utf-8", headers)
    ret_code = int(fault)
    reply = json_reply({"ret_code": ret_code, "err_msg": ERR_MSG[ret_code], "result": []})
    if ret_code == 1008028:
        reply.headers["Retry-After"] = retry_after
    return reply
