"""The TPNS protocol's codes and the rules of SPEC §6 on them, written once, as plain data.

Pure on purpose: this module imports nothing but the standard library and nothing of ``worker``,
so the outcome rules (``worker.outcomes``), the HTTP adapter (``worker.client``) and the sandbox
(an independent check of the client, allowed this module only) share one table of each code.

A call's answer is classified in two steps: ``classify_call`` says what kind of answer came back
(from its HTTP status and ``ret_code``), and for an accepted call ``item_verdict`` says what
happens to each item from its own ``result[i]``. The tests parametrize over these tables, so a
code added here is tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# -- the request ---------------------------------------------------------------------------------

#: the endpoints, relative to an app's service URL
BATCHOPERATE_PATH = "/v3/device/account/batchoperate"
QUERY_PATH = "/v3/device/account/query"
#: the service's hard limit of tokens (ops 1-4) or accounts (op 5) per call
MAX_ITEMS_PER_CALL = 20
#: the service's account type table (SPEC §4): the current table (0, 1-16, 991, 992, 997-999,
#: 1002-1015) plus the types some revisions list (989, 990, 993-996, 1000, 1001)
ACCOUNT_TYPES = frozenset({0, *range(1, 17), *range(989, 1016)})
ACCOUNT_TYPES_TEXT = "0, 1-16, 989-1015"
#: the account type whose accounts are phone numbers in E.164 form
PHONE_ACCOUNT_TYPE = 1002

# -- call-level ret_codes (SPEC §6) --------------------------------------------------------------

OK = 0
PARTLY_FAILED = 1008026
ALL_FAILED = 1008027
#: ret_codes after which the items are judged one by one from ``result``
ITEM_LEVEL_RET_CODES = frozenset({OK, PARTLY_FAILED, ALL_FAILED})

PARSE_ERROR = 1008001
MISSING_PARAMETER = 1008002
INVALID_PARAMETER = 1008007
#: the call was malformed: split it in halves, down to single items (SPEC §6)
REJECTED_RET_CODES = frozenset({PARSE_ERROR, MISSING_PARAMETER, INVALID_PARAMETER})

AUTH_FAILURE = 1008003
#: credentials, billing, app gone: fail nothing, pause sending for the app (SPEC §6)
CREDENTIALS_RET_CODES = frozenset({AUTH_FAILURE, 10030002, 1008030, 1008031, 1010001})

#: too fast: retry, honouring ``Retry-After``
RATE_LIMITED_RET_CODE = 1008028
RATE_LIMITED_HTTP_STATUS = 429
#: the service's internal call failed: retry
SERVICE_ERROR_RET_CODE = 1008004

#: the ``err_msg`` the service sends with its codes (the sandbox answers with these)
ERR_MSG = {OK: "NO_ERROR", AUTH_FAILURE: "auth failure",
           SERVICE_ERROR_RET_CODE: "invoke service error", PARTLY_FAILED: "batch op, partly error",
           ALL_FAILED: "batch op, total error", RATE_LIMITED_RET_CODE: "request too fast"}

# -- item-level codes (an accepted call's ``result[i]``) -----------------------------------------

#: the per-item result codes that mean success
SUCCESS_ITEM_CODES = frozenset({"0", "ok"})
INVALID_TOKEN = "1008006"
NOTHING_BOUND = "10110008"
#: per-item codes that fail the item for good, and the ``error`` they write; any other code retries
FAILED_ITEM_CODES: dict[str, str] = {
    INVALID_TOKEN: "invalid_token",
    "1008029": "invalid_token",
    NOTHING_BOUND: "no_token_or_account",
}

# -- retry rules ---------------------------------------------------------------------------------

#: cap of the between-calls backoff, seconds: ``min(2**attempts, 300)`` with jitter (SPEC §6)
MAX_RETRY_DELAY_S = 300.0
#: the longest ``Retry-After`` honoured, in a call and as the app's shared backoff (SPEC §6)
RETRY_AFTER_CAP_S = 30.0

# -- classification ------------------------------------------------------------------------------

#: what kind of answer one HTTP request got (see ``classify_call``)
CallKind = Literal["accepted", "rejected", "credentials", "rate_limited", "service_error",
                   "http_status", "bad_response", "unexpected"]
#: the metric class of an accepted call, by ret_code (``worker.outcomes.call_class``)
ACCEPTED_CLASSES = {OK: "ok", PARTLY_FAILED: "partly_failed", ALL_FAILED: "all_failed"}
#: every call result class the metrics hash counts, in the order /metrics lists them
CALL_CLASSES = ("ok", "partly_failed", "all_failed", "unexpected", "rejected", "credentials",
                "rate_limited", "transient")


def classify_call(http_status: int, ret_code: int | None) -> CallKind:
    """The kind of one answer from its HTTP status and ``ret_code`` (None: the body is not TPNS
    JSON with an integer ``ret_code``).

    HTTP 429 or 1008028 is ``rate_limited`` whatever else came; another non-2xx is
    ``http_status`` unless it is a 4xx naming a permanent ret_code (then that error: retrying the
    same call cannot help).
    """
    if http_status == RATE_LIMITED_HTTP_STATUS or ret_code == RATE_LIMITED_RET_CODE:
        return "rate_limited"
    if not 200 <= http_status < 300:
        if ret_code is not None and http_status < 500:
            if ret_code in REJECTED_RET_CODES:
                return "rejected"
            if ret_code in CREDENTIALS_RET_CODES:
                return "credentials"
        return "http_status"
    if ret_code is None:
        return "bad_response"
    return ret_code_kind(ret_code)


def ret_code_kind(ret_code: int) -> CallKind:
    """The kind of a 2xx answer by its ``ret_code`` alone."""
    if ret_code in ITEM_LEVEL_RET_CODES:
        return "accepted"
    if ret_code in REJECTED_RET_CODES:
        return "rejected"
    if ret_code in CREDENTIALS_RET_CODES:
        return "credentials"
    if ret_code == RATE_LIMITED_RET_CODE:
        return "rate_limited"
    if ret_code == SERVICE_ERROR_RET_CODE:
        return "service_error"
    return "unexpected"


ItemState = Literal["succeeded", "failed", "retry"]


def item_verdict(code: str) -> tuple[ItemState, str | None]:
    """What one item's ``result[i]`` of an accepted call does: ``(state, error)``."""
    if code in SUCCESS_ITEM_CODES:
        return "succeeded", None
    if code in FAILED_ITEM_CODES:
        return "failed", FAILED_ITEM_CODES[code]
    return "retry", f"item_{code}"


@dataclass(frozen=True)
class CallResult:
    """What one accepted ``batchoperate`` call returned.

    ``result`` holds one status string per token (ops 1-4) or account (op 5), index-matched with
    the items sent; it may be shorter than the call. ``attempts`` counts the HTTP requests made
    (in-call retries included) and ``latency_ms`` is the round trip of the last one.
    """

    ret_code: int
    err_msg: str
    result: tuple[str, ...]
    http_status: int
    attempts: int
    latency_ms: float
    #: the whole answer, for a query call (its ``account_tokens`` / ``token_accounts``)
    data: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
