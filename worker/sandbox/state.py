"""The sandbox's model of TPNS, without HTTP: request validation, binding state, counters.

Validation follows the service's codes (reference §3, SPEC §4): a body that is not a JSON object is
1008001, a missing ``operator_type`` or a missing (or empty) required list is 1008002, anything else
malformed is 1008007. A refusal is returned as a :class:`Refusal` value, never raised.

The state is two indexes kept consistent under one lock: token → {account_type → account} (one
account per type per token) and (account, account_type) → set of tokens. A whole call is applied
under the lock, so concurrent calls never interleave item by item.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..model import Account

#: tokens (ops 1–4) or accounts (op 5) per batchoperate call, and accounts per token_account
MAX_ITEMS_PER_CALL = 20
MAX_ACCOUNTS_PER_TOKEN = 20
MAX_TOKEN_BYTES = 64
MAX_ACCOUNT_CHARS = 100
#: how many recent call sizes ``Stats.snapshot()["items_per_call"]`` keeps
ITEMS_PER_CALL_KEPT = 10_000
#: how many recently applied items ``Bindings.applied()`` keeps
APPLIED_KEPT = 100_000
#: the service's account type table (SPEC §4): the current table plus the types some revisions
#: list (989, 990, 993-996, 1000, 1001). Kept apart from worker.intents on purpose: the sandbox
#: checks what the batcher sends independently of the batcher's own validation.
ACCOUNT_TYPES = frozenset({0, *range(1, 17), *range(989, 1016)})
PHONE_ACCOUNT_TYPE = 1002
_E164 = re.compile(r"\+[0-9]{6,15}")
#: control characters (Unicode category Cc), and with them whitespace for tokens
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")

PARSE_ERROR = 1008001
MISSING_PARAMETER = 1008002
INVALID_PARAMETER = 1008007
INVALID_TOKEN = "1008006"
NOTHING_BOUND = "10110008"

#: the list each batchoperate operator_type requires
BATCH_FIELDS = {1: "token_accounts", 2: "token_accounts", 3: "token_accounts",
                4: "token_list", 5: "account_list"}
#: the list each query operator_type requires
QUERY_FIELDS = {1: "account_list", 2: "token_list"}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call refused as a whole: the service's ``ret_code`` and a message naming the field."""

    ret_code: int
    err_msg: str


@dataclass(frozen=True, slots=True)
class Item:
    """One entry of a call: token and accounts (ops 1–3), a token (op 4), an account (op 5)."""

    token: str | None
    accounts: tuple[Account, ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    """A validated batchoperate or query request; ``items`` matches the request list by index."""

    operator_type: int
    items: tuple[Item, ...]

    @property
    def tokens(self) -> list[str]:
        return [item.token for item in self.items if item.token is not None]


class _Invalid(Exception):
    def __init__(self, ret_code: int, message: str) -> None:
        super().__init__(message)
        self.ret_code = ret_code


def parse_body(body: bytes) -> dict[str, Any] | Refusal:
    """The JSON object in ``body``, or a 1008001 refusal."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return Refusal(PARSE_ERROR, "parameter parse error: the body is not JSON")
    if not isinstance(payload, dict):
        return Refusal(PARSE_ERROR, "parameter parse error: the body is not a JSON object")
    return payload


def parse_batch(payload: dict[str, Any]) -> Request | Refusal:
    """Validate a batchoperate body. ``platform`` and a top-level ``account_type`` are ignored."""
    try:
        op = _operator_type(payload, BATCH_FIELDS)
        field = BATCH_FIELDS[op]
        entries = _required_list(payload, field, MAX_ITEMS_PER_CALL)
        if op == 4:
            items = tuple(Item(_token(e, f"token_list[{i}]")) for i, e in enumerate(entries))
        elif op == 5:
            items = tuple(Item(None, (_account(e, f"account_list[{i}]", 0),))
                          for i, e in enumerate(entries))
        else:
            items = tuple(_token_account(e, f"token_accounts[{i}]") for i, e in enumerate(entries))
    except _Invalid as exc:
        return Refusal(exc.ret_code, _describe(exc))
    return Request(op, items)


def parse_query(payload: dict[str, Any]) -> Request | Refusal:
    """Validate a query body; a top-level ``account_type`` is the default type of op-1 accounts."""
    try:
        op = _operator_type(payload, QUERY_FIELDS)
        entries = _required_list(payload, QUERY_FIELDS[op], None)
        if op == 1:
            default = payload.get("account_type", 0)
            _account_type(default, "account_type", "")
            items = tuple(Item(None, (_account(e, f"account_list[{i}]", default),))
                          for i, e in enumerate(entries))
        else:
            items = tuple(Item(_token(e, f"token_list[{i}]")) for i, e in enumerate(entries))
    except _Invalid as exc:
        return Refusal(exc.ret_code, _describe(exc))
    return Request(op, items)


def _describe(exc: _Invalid) -> str:
    name = {MISSING_PARAMETER: "missing parameter"}.get(exc.ret_code, "invalid parameter")
    return f"{name}: {exc}"


def _operator_type(payload: dict[str, Any], fields: dict[int, str]) -> int:
    if payload.get("operator_type") is None:
        raise _Invalid(MISSING_PARAMETER, "operator_type is required")
    op = payload["operator_type"]
    if type(op) is not int or op not in fields:
        raise _Invalid(INVALID_PARAMETER, f"operator_type must be an integer in {sorted(fields)}")
    return op


def _required_list(payload: dict[str, Any], field: str, limit: int | None) -> list[Any]:
    value = payload.get(field)
    if value is None or value == []:
        raise _Invalid(MISSING_PARAMETER, f"{field} is required")
    if not isinstance(value, list):
        raise _Invalid(INVALID_PARAMETER, f"{field} must be an array")
    if limit is not None and len(value) > limit:
        raise _Invalid(INVALID_PARAMETER, f"{field} has {len(value)} entries, at most {limit}")
    return value


def _token_account(entry: Any, where: str) -> Item:
    if not isinstance(entry, dict):
        raise _Invalid(INVALID_PARAMETER, f"{where} must be an object")
    token = _token(entry.get("token"), f"{where}.token")
    accounts = entry.get("account_list")
    if not isinstance(accounts, list) or not accounts:
        raise _Invalid(INVALID_PARAMETER, f"{where}.account_list must be a non-empty array")
    if len(accounts) > MAX_ACCOUNTS_PER_TOKEN:
        raise _Invalid(INVALID_PARAMETER,
                       f"{where}.account_list has {len(accounts)} entries, "
                       f"at most {MAX_ACCOUNTS_PER_TOKEN}")
    return Item(token, tuple(_account(a, f"{where}.account_list[{i}]", 0)
                             for i, a in enumerate(accounts)))


def _token(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(INVALID_PARAMETER, f"{where} must be a non-empty string")
    if len(value.encode()) > MAX_TOKEN_BYTES:
        raise _Invalid(INVALID_PARAMETER, f"{where} is longer than {MAX_TOKEN_BYTES} bytes")
    if _CONTROL_OR_SPACE.search(value):
        raise _Invalid(INVALID_PARAMETER,
                       f"{where} must not contain whitespace or control characters")
    return value


def _account(entry: Any, where: str, default_type: int) -> Account:
    if not isinstance(entry, dict):
        raise _Invalid(INVALID_PARAMETER, f"{where} must be an object")
    account = entry.get("account")
    if not isinstance(account, str) or not account:
        raise _Invalid(INVALID_PARAMETER, f"{where}.account must be a non-empty string")
    if len(account) > MAX_ACCOUNT_CHARS:
        raise _Invalid(INVALID_PARAMETER, f"{where}.account is longer than {MAX_ACCOUNT_CHARS}")
    if _CONTROL.search(account):
        raise _Invalid(INVALID_PARAMETER, f"{where}.account must not contain control characters")
    account_type = entry.get("account_type", default_type)
    _account_type(account_type, where, ".account_type")
    if account_type == PHONE_ACCOUNT_TYPE and not _E164.fullmatch(account):
        raise _Invalid(INVALID_PARAMETER, f"{where}.account must be E.164 (+ then 6-15 digits)")
    return Account(account, account_type)


def _account_type(value: Any, where: str, suffix: str) -> None:
    if type(value) is not int or value not in ACCOUNT_TYPES:
        raise _Invalid(INVALID_PARAMETER, f"{where}{suffix} is not a known account type")


class Bindings:
    """Token ↔ account bindings, thread-safe. Reads return copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_token: dict[str, dict[int, str]] = {}
        self._by_account: dict[tuple[str, int], set[str]] = {}
        #: the items that changed (or were applied to) the state, in the order applied
        self._applied: deque[tuple[int, Item]] = deque(maxlen=APPLIED_KEPT)

    def apply(self, request: Request, invalid_token_prefix: str) -> list[str]:
        """Apply a validated batchoperate call atomically; the per-item result codes."""
        results: list[str] = []
        with self._lock:
            for item in request.items:
                if item.token is not None and invalid_token_prefix and \
                        item.token.startswith(invalid_token_prefix):
                    results.append(INVALID_TOKEN)
                    continue
                self._apply_item(request.operator_type, item)
                self._applied.append((request.operator_type, item))
                results.append("0")
        return results

    def _apply_item(self, op: int, item: Item) -> None:
        if op == 5:
            key = (item.accounts[0].account, item.accounts[0].account_type)
            for token in self._by_account.pop(key, set()):
                self._forget(token, key[1])
            return
        assert item.token is not None
        token = item.token
        if op == 4:
            for account_type in list(self._by_token.get(token, {})):
                self._unbind(token, account_type)
            return
        for acct in item.accounts:
            bound = self._by_token.get(token, {}).get(acct.account_type)
            if op == 3:
                if bound == acct.account:
                    self._unbind(token, acct.account_type)
            elif bound != acct.account:
                if bound is not None:
                    self._unbind(token, acct.account_type)
                self._by_token.setdefault(token, {})[acct.account_type] = acct.account
                self._by_account.setdefault((acct.account, acct.account_type), set()).add(token)

    def _unbind(self, token: str, account_type: int) -> None:
        account = self._forget(token, account_type)
        tokens = self._by_account.get((account, account_type))
        if tokens is not None:
            tokens.discard(token)
            if not tokens:
                del self._by_account[(account, account_type)]

    def _forget(self, token: str, account_type: int) -> str:
        accounts = self._by_token[token]
        account = accounts.pop(account_type)
        if not accounts:
            del self._by_token[token]
        return account

    def accounts_of(self, token: str) -> dict[int, str]:
        """account_type → account bound to ``token`` (empty when none)."""
        with self._lock:
            return dict(self._by_token.get(token, {}))

    def tokens_of(self, account: str, account_type: int = 0) -> set[str]:
        """The tokens bound to ``account`` of ``account_type``."""
        with self._lock:
            return set(self._by_account.get((account, account_type), set()))

    def snapshot(self, tokens: Iterable[str]) -> dict[str, dict[int, str]]:
        """The accounts of several tokens, read at one instant."""
        with self._lock:
            return {t: dict(self._by_token.get(t, {})) for t in tokens}

    def applied(self) -> list[tuple[int, Item]]:
        """``(operator_type, item)`` of every item applied (answered ``"0"``), oldest first (the
        last ``APPLIED_KEPT``): the order in which the service saw each key change."""
        with self._lock:
            return list(self._applied)

    def clear(self) -> None:
        """Forget every binding."""
        with self._lock:
            self._by_token.clear()
            self._by_account.clear()
            self._applied.clear()

    def __len__(self) -> int:
        """The number of (token, account_type) bindings."""
        with self._lock:
            return sum(len(accounts) for accounts in self._by_token.values())


class Stats:
    """The sandbox's counters (see ``SandboxServer.stats``), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = self.queries = self.items = self.max_items = 0
            self.by_op: Counter[str] = Counter()
            self.ret_codes: Counter[str] = Counter()
            self.faults: Counter[str] = Counter()
            self.per_call: deque[int] = deque(maxlen=ITEMS_PER_CALL_KEPT)
            #: the operator_type of each call in ``per_call`` (None when the body had none)
            self.per_call_op: deque[int | None] = deque(maxlen=ITEMS_PER_CALL_KEPT)

    def call(self, payload: dict[str, Any] | Refusal) -> None:
        op = payload.get("operator_type") if isinstance(payload, dict) else None
        entries = payload.get(BATCH_FIELDS[op]) if type(op) is int and op in BATCH_FIELDS \
            and isinstance(payload, dict) else None
        with self._lock:
            self.calls += 1
            if type(op) is int and op in BATCH_FIELDS:
                self.by_op[str(op)] += 1
            if isinstance(entries, list):
                self.items += len(entries)
                self.max_items = max(self.max_items, len(entries))
                self.per_call.append(len(entries))
                self.per_call_op.append(op)

    def count(self, *, ret_code: int | None = None, fault: str | None = None,
              query: bool = False) -> None:
        with self._lock:
            if ret_code is not None:
                self.ret_codes[str(ret_code)] += 1
            if fault is not None:
                self.faults[fault] += 1
            self.queries += query

    def call_sizes(self) -> list[tuple[int | None, int]]:
        """``(operator_type, items)`` of each call counted in ``items_per_call``, oldest first."""
        with self._lock:
            return list(zip(self.per_call_op, self.per_call, strict=True))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "queries": self.queries, "items": self.items,
                    "calls_by_op": dict(self.by_op), "ret_codes": dict(self.ret_codes),
                    "faults": dict(self.faults), "max_items_per_call": self.max_items,
                    "items_per_call": list(self.per_call)}
