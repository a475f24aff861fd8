"""What the sandbox reads and answers on the wire: paths, codes, and request validation.

Validation follows the service's codes (reference §3, SPEC §4): a body that is not a JSON object is
1008001, a missing ``operator_type`` or a missing (or empty) required list is 1008002, anything else
malformed is 1008007. A refusal is returned as a :class:`Refusal` value, never raised.

Nothing here comes from the batcher's own rules (``worker.intents``, ``worker.model``): the sandbox
is an independent check of what the client sends (see the package docstring).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BATCH_PATH = "/v3/device/account/batchoperate"
QUERY_PATH = "/v3/device/account/query"
#: tokens (ops 1–4) or accounts (op 5) per batchoperate call, and accounts per token_account
MAX_ITEMS_PER_CALL = 20
MAX_ACCOUNTS_PER_TOKEN = 20
MAX_TOKEN_BYTES = 64
MAX_ACCOUNT_CHARS = 100
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
AUTH_FAILURE = 1008003
INVALID_PARAMETER = 1008007
INVALID_TOKEN = "1008006"
NOTHING_BOUND = "10110008"
#: the err_msg of each ret_code the sandbox answers with a fixed message
ERR_MSG = {0: "NO_ERROR", 1008003: "auth failure", 1008004: "invoke service error",
           1008026: "batch op, partly error", 1008027: "batch op, total error",
           1008028: "request too fast"}

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
class Account:
    """One account and its type, as the service reads it (0 when the request names none)."""

    account: str
    account_type: int = 0


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


def batch_code(result: Sequence[str]) -> tuple[int, str]:
    """ret_code and err_msg of a call whose items answered ``result``: 0, or 1008026 (some failed)
    or 1008027 (all failed)."""
    failed = sum(code != "0" for code in result)
    ret_code = 0 if not failed else 1008027 if failed == len(result) else 1008026
    return ret_code, ERR_MSG[ret_code]


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
