"""The sandbox's settings: one immutable snapshot, checked whole before it replaces the last."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DEFAULT_FAULTS = ("http_500", "http_503", "1008004", "1008028", "http_429", "timeout", "drop")
#: ``lost`` (answered as a success, never applied) is only drawn when asked for: a call the
#: service accepts and drops is what verification (SPEC §6.1) exists to catch, and without it
#: a client has no way to notice
FAULT_KINDS = frozenset((*DEFAULT_FAULTS, "lost"))


class SandboxConfigError(ValueError):
    """Raised when a sandbox setting is unknown or invalid; ``str()`` names the setting."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


@dataclass(frozen=True)
class SandboxConfig:
    """What :meth:`SandboxServer.configure` may change at runtime (one immutable snapshot)."""

    access_id: str
    secret_key: str = field(repr=False)
    latency_ms: float
    fault_rate: float
    faults: tuple[str, ...]
    seed: int | None
    invalid_token_prefix: str
    reject_token_prefix: str
    slow_ms: float
    retry_after_s: float
    max_skew_s: float
    #: accepted batchoperate calls are applied this much later (queries see the old state)
    apply_delay_ms: float = 0.0

    def public(self) -> dict[str, Any]:
        """The settings without the secret key."""
        out = asdict(self)
        del out["secret_key"]
        out["faults"] = list(self.faults)
        return out


def checked(config: SandboxConfig) -> SandboxConfig:
    """``config`` with its faults as a tuple and its numbers as floats; raises
    ``SandboxConfigError`` naming the first bad setting."""
    faults = config.faults
    if isinstance(faults, str):
        faults = tuple(f.strip() for f in faults.split(",") if f.strip())
    if not isinstance(faults, Sequence) or not all(isinstance(f, str) for f in faults):
        raise SandboxConfigError("faults", "must be a list of fault names")
    unknown = sorted(set(faults) - FAULT_KINDS)
    if unknown:
        raise SandboxConfigError("faults", f"unknown {', '.join(unknown)} "
                                           f"(known: {', '.join(sorted(FAULT_KINDS))})")
    for name in ("access_id", "secret_key"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise SandboxConfigError(name, "must be a non-empty string")
    for name in ("invalid_token_prefix", "reject_token_prefix"):
        if not isinstance(getattr(config, name), str):
            raise SandboxConfigError(name, "must be a string (empty disables it)")
    numbers: dict[str, Any] = {}
    for name in ("latency_ms", "fault_rate", "slow_ms", "retry_after_s", "max_skew_s",
                 "apply_delay_ms"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise SandboxConfigError(name, "must be a finite number >= 0")
        numbers[name] = float(value)
    if numbers["fault_rate"] > 1:
        raise SandboxConfigError("fault_rate", "must be from 0 to 1")
    if config.seed is not None and type(config.seed) is not int:
        raise SandboxConfigError("seed", "must be an integer or null")
    return replace(config, faults=tuple(faults), **numbers)


def changed(config: SandboxConfig, changes: dict[str, Any]) -> SandboxConfig:
    """``config`` with ``changes`` applied and checked; raises ``SandboxConfigError``."""
    unknown = sorted(set(changes) - set(SandboxConfig.__dataclass_fields__))
    if unknown:
        raise SandboxConfigError(unknown[0], "is not a sandbox setting")
    if isinstance(changes.get("faults"), list):
        changes = {**changes, "faults": tuple(changes["faults"])}
    return checked(replace(config, **changes))
