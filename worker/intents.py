"""Validation of intents (SPEC §4): a pure function with one clear message per rule.

``validate(obj, apps)`` returns an ``Intent`` or raises ``IntentError`` naming the field and the rule.
``parse_lines(text)`` reads JSON Lines, skipping blank lines and counting physical lines from 1.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from .errors import IntentError
from .model import Account, Intent

#: the service's account type table (reference §2)
ACCOUNT_TYPES = frozenset({0, *range(1, 17), 991, 992, 997, 998, 999, *range(1002, 1016)})
PHONE_TYPE = 1002
MAX_TOKEN_BYTES = 64
MAX_ACCOUNT_CHARS = 100
MAX_ACCOUNTS = 20
MAX_ID_CHARS = 64

_E164 = re.compile(r"^\+[0-9]{6,15}$")
_ID = re.compile(r"^[A-Za-z0-9._~:-]+$")
_FIELDS = {
    1: {"operator_type", "token", "account_list", "app", "id"},
    2: {"operator_type", "token", "account_list", "app", "id"},
    3: {"operator_type", "token", "account_list", "app", "id"},
    4: {"operator_type", "token", "app", "id"},
    5: {"operator_type", "account", "account_type", "app", "id"},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def check_token(value: Any, field: str = "token") -> str:
    if not isinstance(value, str):
        raise IntentError(field, "must be a string")
    if not value:
        raise IntentError(field, "must not be empty")
    if len(value.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise IntentError(field, f"must be at most {MAX_TOKEN_BYTES} bytes")
    if any(ch.isspace() for ch in value) or _has_control(value):
        raise IntentError(field, "must not contain whitespace or control characters")
    return value


def check_account(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise IntentError(field, "must be a string")
    if not value:
        raise IntentError(field, "must not be empty")
    if len(value) > MAX_ACCOUNT_CHARS:
        raise IntentError(field, f"must be at most {MAX_ACCOUNT_CHARS} characters")
    if _has_control(value):
        raise IntentError(field, "must not contain control characters")
    return value


def check_account_type(value: Any, field: str) -> int:
    if not _is_int(value):
        raise IntentError(field, "must be an integer")
    if value not in ACCOUNT_TYPES:
        raise IntentError(field, f"{value} is not a TPNS account type "
                                 "(0, 1-16, 991, 992, 997, 998, 999, 1002-1015)")
    return int(value)


def _account(account: Any, account_type: Any, field: str, type_field: str) -> Account:
    name = check_account(account, field)
    kind = 0 if account_type is None else check_account_type(account_type, type_field)
    if kind == PHONE_TYPE and not _E164.match(name):
        raise IntentError(field, "a phone number (account_type 1002) must be in E.164 form: "
                                 "+ then 6-15 digits")
    return Account(name, kind)


def _account_list(value: Any) -> tuple[Account, ...]:
    if not isinstance(value, list):
        raise IntentError("account_list", "must be a list of accounts")
    if not value:
        raise IntentError("account_list", "must not be empty")
    if len(value) > MAX_ACCOUNTS:
        raise IntentError("account_list", f"must have at most {MAX_ACCOUNTS} accounts")
    accounts: list[Account] = []
    for k, entry in enumerate(value):
        where = f"account_list[{k}]"
        if not isinstance(entry, dict):
            raise IntentError(where, 'must be an object like {"account": "...", "account_type": 0}')
        extra = sorted(set(entry) - {"account", "account_type"})
        if extra:
            raise IntentError(f"{where}.{extra[0]}", "is not an allowed field of an account")
        if "account" not in entry:
            raise IntentError(f"{where}.account", "is required")
        acc = _account(entry["account"], entry.get("account_type"), f"{where}.account",
                       f"{where}.account_type")
        if acc in accounts:
            raise IntentError(where, f"repeats account_list[{accounts.index(acc)}]")
        accounts.append(acc)
    return tuple(accounts)


def _check_id(intent_id: Any) -> str | None:
    if intent_id is None:
        return None
    if not isinstance(intent_id, str) or not intent_id:
        raise IntentError("id", "must be a non-empty string")
    if len(intent_id) > MAX_ID_CHARS or not _ID.match(intent_id):
        raise IntentError("id", f"must be at most {MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ ~ : -")
    return intent_id


def validate(obj: Any, apps: Collection[str] | None = None, default_app: str = "default") -> Intent:
    """Check one intent against SPEC §4; ``apps`` are the known app names (None: any name)."""
    if not isinstance(obj, dict):
        raise IntentError("intent", "must be a JSON object")
    if "operator_type" not in obj:
        raise IntentError("operator_type", "is required")
    op = obj["operator_type"]
    if not _is_int(op) or not 1 <= op <= 5:
        raise IntentError("operator_type", "must be an integer from 1 to 5")
    for name in obj:
        if name not in _FIELDS[op]:
            known = set().union(*_FIELDS.values())
            rule = (f"is not allowed with operator_type {op}" if name in known
                    else "is not a known field")
            raise IntentError(str(name), rule)
    app = obj.get("app", default_app)
    if not isinstance(app, str) or not app:
        raise IntentError("app", "must be a non-empty string")
    if apps is not None and app not in apps:
        raise IntentError("app", f"{app!r} is not a configured app ({', '.join(sorted(apps))})")
    intent_id = _check_id(obj.get("id"))
    if op == 5:
        if "account" not in obj:
            raise IntentError("account", "is required with operator_type 5")
        accounts: tuple[Account, ...] = (
            _account(obj["account"], obj.get("account_type"), "account", "account_type"),)
        token = None
    else:
        if "token" not in obj:
            raise IntentError("token", f"is required with operator_type {op}")
        token = check_token(obj["token"])
        if op == 4:
            accounts = ()
        else:
            if "account_list" not in obj:
                raise IntentError("account_list", f"is required with operator_type {op}")
            accounts = _account_list(obj["account_list"])
    return Intent(operator_type=op, token=token, accounts=accounts, app=app, id=intent_id)


def parse_line(line: str, number: int) -> Any:
    """Decode one JSON Lines line; refusals name the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise IntentError("json", f"not valid JSON ({exc.msg} at column {exc.colno})",
                          number) from None


def iter_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(physical line number from 1, text) for every non-blank line."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, line
