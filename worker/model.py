"""The plain data every part shares: an intent, its accounts, its status (SPEC §4, §5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: states of an intent; ``succeeded`` and ``failed`` are terminal
#: ``verifying`` only with TPNS_VERIFY=on: accepted by TPNS, keys held until seen applied
STATES = ("queued", "sending", "verifying", "retrying", "succeeded", "failed")
TERMINAL_STATES = frozenset({"succeeded", "failed"})
#: states of an intent still to be decided (what ``TPNS_MAX_PENDING`` counts)
PENDING_STATES = tuple(s for s in STATES if s not in TERMINAL_STATES)
OPERATOR_TYPES = (1, 2, 3, 4, 5)


@dataclass(frozen=True, slots=True)
class Account:
    """One account and its type (0, the default type, when absent)."""

    account: str
    account_type: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "account_type": self.account_type}


@dataclass(frozen=True, slots=True)
class Intent:
    """A validated intent. ``token`` is None for op 5; ``accounts`` has exactly one entry for op 5
    and none for op 4."""

    operator_type: int
    token: str | None
    accounts: tuple[Account, ...]
    app: str = "default"
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The intent in the input format of SPEC §4 (round-trips through validation)."""
        out: dict[str, Any] = {"operator_type": self.operator_type}
        if self.operator_type == 5:
            out["account"] = self.accounts[0].account
            out["account_type"] = self.accounts[0].account_type
        else:
            out["token"] = self.token
            if self.operator_type != 4:
                out["account_list"] = [a.to_json() for a in self.accounts]
        if self.app != "default":
            out["app"] = self.app
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True, slots=True)
class BatchItem:
    """What one claimed intent contributes to a call, plus what the outcome rules need."""

    id: str
    token: str | None
    accounts: tuple[Account, ...]
    #: calls this intent has been in, this one included
    attempts: int = 1
    #: enqueue time, epoch milliseconds
    created_at_ms: int = 0


@dataclass(frozen=True)
class Status:
    """The status record of one intent, as ``tpns-batcher status`` prints it."""

    id: str
    operator_type: int
    state: str
    attempts: int
    created_at: str
    updated_at: str
    app: str = "default"
    token: str | None = None
    account_list: list[dict[str, Any]] = field(default_factory=list)
    result_code: str | None = None
    ret_code: int | None = None
    err_msg: str | None = None
    error: str | None = None
    batch_id: str | None = None
    #: True once seen applied, False while verifying (or not seen), None without verification
    verified: bool | None = None
    #: "compacted" once only the summary of a succeeded intent is left (TPNS_STATUS_DETAIL_S):
    #: every field but the payload (token, accounts), which is no longer known; None otherwise
    detail: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "operator_type": self.operator_type}
        if self.app != "default":
            out["app"] = self.app
        if self.detail is not None:
            pass  # compacted: the payload is gone, and its fields are left out rather than null
        elif self.operator_type == 5:
            acct = self.account_list[0]
            out["account"] = acct["account"]
            out["account_type"] = acct["account_type"]
        else:
            out["token"] = self.token
            if self.operator_type != 4:
                out["account_list"] = self.account_list
        out.update(state=self.state, attempts=self.attempts, result_code=self.result_code,
                   ret_code=self.ret_code, err_msg=self.err_msg, error=self.error,
                   batch_id=self.batch_id, verified=self.verified, created_at=self.created_at,
                   updated_at=self.updated_at)
        if self.detail is not None:
            out["detail"] = self.detail
        return out
