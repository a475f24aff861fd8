"""Validation of intents (SPEC §4): a pure function with one clear message per rule.

``validate(obj, apps)`` returns an ``Intent`` or raises ``IntentError`` naming the field and the rule,
whatever ``obj`` is: a decoded JSON value (``worker.jsonin`` leaves markers for repeated keys and
for numbers that are not plain integers, refused here by field) or any Python object.
``parse_line`` and ``iter_lines`` read JSON Lines (``worker.jsonin``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from typing import Any

from .errors import IntentError
from .jsonin import BadNumber, Duplicated, iter_lines
from .jsonin import decode_line as parse_line
from .model import Account, Intent
from .tpns_codes import ACCOUNT_TYPES, ACCOUNT_TYPES_TEXT, PHONE_ACCOUNT_TYPE

__all__ = ["ACCOUNT_TYPES", "check_account", "check_account_type", "check_token", "is_id",
           "iter_lines", "parse_line", "validate"]

MAX_TOKEN_BYTES = 64
MAX_ACCOUNT_CHARS = 100
MAX_ACCOUNTS = 20
MAX_ID_CHARS = 64
#: longest field name or value quoted back in a message
_SHOWN_CHARS = 40

_E164 = re.compile(r"\+[0-9]{6,15}")
_ID = re.compile(r"[A-Za-z0-9._~:-]+")
_FIELDS = {
    1: {"operator_type", "token", "account_list", "app", "id"},
    2: {"operator_type", "token", "account_list", "app", "id"},
    3: {"operator_type", "token", "account_list", "app", "id"},
    4: {"operator_type", "token", "app", "id"},
    5: {"operator_type", "account", "account_type", "app", "id"},
}
_KNOWN = frozenset().union(*_FIELDS.values())
#: a field that is not there (a JSON null is there, and is refused like any other wrong type)
_ABSENT: Any = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_control(text: str) -> bool:
    if text.isascii():  # the common case, in C: ASCII's only such characters are Cc, unprintable
        return not text.isprintable()
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:  # lone surrogates are the only code points UTF-8 cannot encode; C is faster than a loop
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(text: str) -> str:
    """``text`` as it may be quoted in a message: short, and plain printable text (escaped
    otherwise, so a message can always be printed or sent as UTF-8)."""
    cut = text[:_SHOWN_CHARS]
    if cut.isprintable() and not _has_surrogate(cut):
        return cut + ("..." if len(text) > _SHOWN_CHARS else "")
    return repr(cut)[1:-1] + ("..." if len(text) > _SHOWN_CHARS else "")


def _not_int(value: Any) -> str:
    """What a value that should be an integer was instead, for the message."""
    if isinstance(value, BadNumber):
        return f", not {value.kind}"
    if isinstance(value, float):
        return ", not a float"
    return ""


def _text(value: Any, field: str) -> str:
    """A string field's value: a str of valid Unicode, else refused."""
    if not isinstance(value, str):
        raise IntentError(field, "must be a string")
    text: str = str.__str__(value)  # a plain str, whatever a subclass overrides
    if not text:
        raise IntentError(field, "must not be empty")
    if _has_surrogate(text):
        raise IntentError(field, "must be valid Unicode (it holds a lone surrogate)")
    return text


def _object(value: Any, field: str, rule: str) -> dict[Any, Any]:
    """A JSON object's fields: a dict with string keys, none repeated, else refused."""
    if not isinstance(value, dict):
        raise IntentError(field, rule)
    for key in value:
        if not isinstance(key, str):
            raise IntentError(field, "field names must be strings")
    if isinstance(value, Duplicated):
        where = shown(value.key) if field == "intent" else f"{field}.{shown(value.key)}"
        raise IntentError(where, f'duplicate key "{shown(value.key)}"')
    return value


def check_token(value: Any, field: str = "token") -> str:
    token = _text(value, field)
    if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise IntentError(field, f"must be at most {MAX_TOKEN_BYTES} bytes")
    # ASCII's whitespace is the space plus unprintable characters: two C calls, not a loop
    spaced = (" " in token or not token.isprintable()) if token.isascii() else (
        any(ch.isspace() for ch in token) or _has_control(token))
    if spaced:
        raise IntentError(field, "must not contain whitespace or control characters")
    return token


def check_account(value: Any, field: str) -> str:
    account = _text(value, field)
    if len(account) > MAX_ACCOUNT_CHARS:
        raise IntentError(field, f"must be at most {MAX_ACCOUNT_CHARS} characters")
    if _has_control(account):
        raise IntentError(field, "must not contain control characters")
    return account


def check_account_type(value: Any, field: str) -> int:
    if not _is_int(value):
        raise IntentError(field, f"must be an integer{_not_int(value)}")
    if value not in ACCOUNT_TYPES:
        # never str() a huge int: past 4300 digits that raises ValueError
        said = str(int(value)) if -10**9 < value < 10**9 else "it"
        raise IntentError(field, f"{said} is not a TPNS account type ({ACCOUNT_TYPES_TEXT})")
    return int(value)


def _account(account: Any, account_type: Any, field: str, type_field: str) -> Account:
    name = check_account(account, field)
    kind = 0 if account_type is _ABSENT else check_account_type(account_type, type_field)
    if kind == PHONE_ACCOUNT_TYPE and not _E164.fullmatch(name):
        raise IntentError(field, "a phone number (account_type 1002) must be in E.164 form: "
                                 "+ then 6-15 digits")
    return Account(name, kind)


def _account_list(value: Any) -> tuple[Account, ...]:
    """The accounts in order; an exact repeat of an (account, account_type) is collapsed."""
    if not isinstance(value, list):
        raise IntentError("account_list", "must be a list of accounts")
    if not value:
        raise IntentError("account_list", "must not be empty")
    accounts: list[Account] = []
    for k, entry in enumerate(value):
        where = f"account_list[{k}]"
        fields = _object(entry, where, 'must be an object like {"account": "...", "account_type": 0}')
        extra = sorted(set(fields) - {"account", "account_type"})
        if extra:
            raise IntentError(f"{where}.{shown(extra[0])}", "is not an allowed field of an account")
        if "account" not in fields:
            raise IntentError(f"{where}.account", "is required")
        acc = _account(fields["account"], fields.get("account_type", _ABSENT), f"{where}.account",
                       f"{where}.account_type")
        if acc in accounts:
            continue
        if len(accounts) == MAX_ACCOUNTS:
            raise IntentError("account_list", f"must have at most {MAX_ACCOUNTS} accounts")
        accounts.append(acc)
    return tuple(accounts)


def is_id(text: str) -> bool:
    """Whether ``text`` could be an intent's id (given or generated)."""
    return len(text) <= MAX_ID_CHARS and _ID.fullmatch(text) is not None


def _check_id(intent_id: Any) -> str | None:
    if intent_id is _ABSENT:
        return None
    if not isinstance(intent_id, str) or not intent_id:
        raise IntentError("id", "must be a non-empty string")
    text: str = str.__str__(intent_id)
    if not is_id(text):
        raise IntentError("id", f"must be at most {MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ ~ : -")
    return text


def _check_app(app: Any, apps: Collection[str] | None) -> str:
    if not isinstance(app, str) or not app:
        raise IntentError("app", "must be a non-empty string")
    name = _text(app, "app")
    if _has_control(name):
        raise IntentError("app", "must not contain control characters")
    if apps is not None and name not in apps:
        raise IntentError("app", f"'{shown(name)}' is not a configured app ({', '.join(sorted(apps))})")
    return name


def _validate(obj: Any, apps: Collection[str] | None, default_app: str) -> Intent:
    fields = _object(obj, "intent", "must be a JSON object")
    if "operator_type" not in fields:
        raise IntentError("operator_type", "is required")
    op = fields["operator_type"]
    if not _is_int(op) or not 1 <= op <= 5:
        raise IntentError("operator_type", f"must be an integer from 1 to 5{_not_int(op)}")
    op = int(op)
    for name in fields:
        if name not in _FIELDS[op]:
            rule = (f"is not allowed with operator_type {op}" if name in _KNOWN
                    else "is not a known field")
            raise IntentError(shown(name), rule)
    app = _check_app(fields.get("app", default_app), apps)
    intent_id = _check_id(fields.get("id", _ABSENT))
    if op == 5:
        if "account" not in fields:
            raise IntentError("account", "is required with operator_type 5")
        accounts: tuple[Account, ...] = (
            _account(fields["account"], fields.get("account_type", _ABSENT), "account",
                     "account_type"),)
        token = None
    else:
        if "token" not in fields:
            raise IntentError("token", f"is required with operator_type {op}")
        token = check_token(fields["token"])
        if op == 4:
            accounts = ()
        else:
            if "account_list" not in fields:
                raise IntentError("account_list", f"is required with operator_type {op}")
            accounts = _account_list(fields["account_list"])
    return Intent(operator_type=op, token=token, accounts=accounts, app=app, id=intent_id)


def validate(obj: Any, apps: Collection[str] | None = None, default_app: str = "default") -> Intent:
    """Check one intent against SPEC §4; ``apps`` are the known app names (None: any name).

    Raises only ``IntentError``, whatever ``obj`` is.
    """
    try:
        return _validate(obj, apps, default_app)
    except IntentError:
        raise
    except Exception as exc:
        # Python callers may pass objects whose own methods raise (a dict subclass whose
        # __iter__ fails, a str subclass whose __eq__ does): the promise is one error type.
        raise IntentError("intent", f"cannot be read as an intent ({type(exc).__name__})") from None
