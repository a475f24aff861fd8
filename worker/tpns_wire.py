"""What goes on the wire to TPNS and what comes back, without the HTTP: the request body of a
``batchoperate`` call and its exact bytes, the parse of an answer's body, ``Retry-After``, and the
error a refused ``ret_code`` raises. Pure functions; ``worker.client`` sends and classifies."""

from __future__ import annotations

import datetime
import email.utils
import json
import math
from collections.abc import Sequence
from typing import Any

from .errors import (
    CredentialsError,
    RejectedError,
    ServiceError,
    TpnsError,
    UnexpectedRetCodeError,
)
from .model import BatchItem
from .tpns_codes import MAX_ITEMS_PER_CALL


def build_body(operator_type: int, items: Sequence[BatchItem]) -> dict[str, Any]:
    """The JSON body of one ``batchoperate`` call for ``items`` (SPEC §1, reference §1.2).

    Ops 1-3 send ``token_accounts``, op 4 ``token_list``, op 5 ``account_list`` (each op-5 item
    carries exactly one account and no token). Raises ``ValueError`` on a programming error
    upstream: no items, more than 20, a repeated token (or account for op 5), an item that does not
    fit the operator_type.
    """
    if operator_type not in (1, 2, 3, 4, 5) or isinstance(operator_type, bool):
        raise ValueError(f"operator_type must be 1-5, got {operator_type!r}")
    if not items:
        raise ValueError("a call needs at least one item")
    if len(items) > MAX_ITEMS_PER_CALL:
        raise ValueError(f"a call carries at most {MAX_ITEMS_PER_CALL} items, got {len(items)}")
    seen: set[object] = set()
    body: dict[str, Any] = {"operator_type": operator_type}
    if operator_type == 5:
        accounts: list[dict[str, Any]] = []
        for item in items:
            if item.token is not None or len(item.accounts) != 1:
                raise ValueError(f"item {item.id!r}: op 5 takes one account and no token")
            account = item.accounts[0]
            key = (account.account, account.account_type)
            if key in seen:
                raise ValueError(f"item {item.id!r}: account {key!r} repeated in one call")
            seen.add(key)
            accounts.append(account.to_json())
        body["account_list"] = accounts
        return body
    for item in items:
        if not item.token:
            raise ValueError(f"item {item.id!r}: op {operator_type} needs a token")
        if item.token in seen:
            raise ValueError(f"item {item.id!r}: token repeated in one call")
        seen.add(item.token)
        if operator_type != 4 and not item.accounts:
            raise ValueError(f"item {item.id!r}: op {operator_type} needs at least one account")
    if operator_type == 4:
        body["token_list"] = [item.token for item in items]
    else:
        body["token_accounts"] = [
            {"token": item.token, "account_list": [a.to_json() for a in item.accounts]}
            for item in items
        ]
    return body


def encode_body(body: dict[str, Any]) -> bytes:
    """The exact bytes sent and signed: compact JSON, UTF-8, non-ASCII kept as is."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def ret_code_error(kind: str, ret_code: int, err_msg: str, status: int) -> TpnsError:
    """The error of a ``ret_code`` that ``classify_call`` found to be of ``kind``."""
    message = f"TPNS answered ret_code {ret_code} ({err_msg!r})"
    kw: dict[str, Any] = {"ret_code": ret_code, "http_status": status, "err_msg": err_msg}
    if kind == "rejected":
        return RejectedError(message, code=f"rejected:{ret_code}", **kw)
    if kind == "credentials":
        return CredentialsError(message, code=f"credentials:{ret_code}", **kw)
    if kind == "service_error":
        return ServiceError(message, **kw)
    return UnexpectedRetCodeError(message, code=f"ret_{ret_code}", **kw)


def parse_body(content: bytes) -> tuple[int, str, tuple[str, ...] | None, dict[str, Any]] | None:
    """``(ret_code, err_msg, result, the whole object)`` from a response body, or None when it
    is not TPNS JSON.

    ``retCode``/``errMsg`` (the query API's spelling) are accepted too. ``result`` is None when
    present but not a list, ``()`` when absent.
    """
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    ret_code = data.get("ret_code", data.get("retCode"))
    if not isinstance(ret_code, int) or isinstance(ret_code, bool):
        return None
    err_msg = data.get("err_msg", data.get("errMsg"))
    err_msg = "" if err_msg is None else str(err_msg)
    raw = data.get("result", [])
    if raw is None:
        raw = []
    result = tuple(str(code) for code in raw) if isinstance(raw, list) else None
    return ret_code, err_msg, result, data


def retry_after_s(value: str | None, now: float) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None when unusable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - now
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(seconds, 0.0)
