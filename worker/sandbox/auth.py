"""How the sandbox checks a caller: TPNS's signature headers or HTTP Basic (reference §4).

Written for the sandbox rather than imported from ``worker.auth``: a check that shares the client's
code would agree with the client's mistakes. Tested against the published vector
(tests/sandbox/test_auth.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping

#: the sandbox's default credentials. Public on purpose, like a payment provider's test keys: the
#: README prints them, and ``worker.settings`` signs with the same pair when ``TPNS_BASE_URL`` is
#: set without credentials (tests/sandbox/test_auth.py pins that the two agree).
SANDBOX_ACCESS_ID = "1500000001"
SANDBOX_SECRET_KEY = "sandbox-secret-0123456789abcdef"

_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def expected_sign(secret_key: str, access_id: str, timestamp: str, body: bytes) -> str:
    """The ``Sign`` TPNS expects: base64 of the *hex* HMAC-SHA256 of TimeStamp + AccessId + body."""
    mac = hmac.new(secret_key.encode(), timestamp.encode() + access_id.encode() + body,
                   hashlib.sha256)
    return base64.b64encode(mac.hexdigest().encode("ascii")).decode("ascii")


def expected_basic(access_id: str, secret_key: str) -> str:
    """The ``Authorization`` value of HTTP Basic with these credentials."""
    pair = base64.b64encode(f"{access_id}:{secret_key}".encode()).decode("ascii")
    return f"Basic {pair}"


def authorized(headers: Mapping[str, str], body: bytes, *, access_id: str, secret_key: str,
               max_skew_s: float, now_s: float) -> bool:
    """True when the request (lower-cased ``headers``) carries these credentials.

    ``Sign`` wins when both methods are sent; its ``TimeStamp`` must be at most ``max_skew_s``
    from ``now_s``. Comparisons are constant-time.
    """
    given = headers.get("sign")
    if given is not None:
        timestamp = headers.get("timestamp", "")
        if headers.get("accessid", "") != access_id or not _TIMESTAMP.fullmatch(timestamp):
            return False
        if abs(now_s - int(timestamp)) > max_skew_s:
            return False
        expected = expected_sign(secret_key, access_id, timestamp, body)
        return hmac.compare_digest(expected.encode(), given.encode())
    authorization = headers.get("authorization")
    return authorization is not None and hmac.compare_digest(
        expected_basic(access_id, secret_key).encode(), authorization.strip().encode())
