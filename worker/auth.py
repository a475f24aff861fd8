"""TPNS authentication: the HMAC-SHA256 signature headers and HTTP Basic (SPEC §7, reference §4).

Sign = Base64( lowercase-hex( HMAC-SHA256(key=SecretKey, msg=TimeStamp + AccessId + body) ) ).
Note the hex step: TPNS base64-encodes the 64-character hex digest, not the raw 32 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def sign(secret_key: str, timestamp: int | str, access_id: int | str, body: bytes) -> str:
    """The ``Sign`` header for ``body`` (the exact bytes sent)."""
    message = f"{timestamp}{access_id}".encode() + body
    digest = hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()
    return base64.b64encode(digest.encode()).decode()


def sign_headers(access_id: str, secret_key: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The three signature headers TPNS reads: ``AccessId``, ``TimeStamp`` and ``Sign``."""
    return {
        "AccessId": str(access_id),
        "TimeStamp": str(timestamp),
        "Sign": sign(secret_key, timestamp, access_id, body),
    }


def basic_header(access_id: str, secret_key: str) -> dict[str, str]:
    """The ``Authorization: Basic base64(AccessId:SecretKey)`` header."""
    token = base64.b64encode(f"{access_id}:{secret_key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def verify_sign(secret_key: str, access_id: str, timestamp: str, body: bytes, given: str) -> bool:
    """True when ``given`` is the signature of ``body`` (compared in constant time)."""
    expected = sign(secret_key, timestamp, access_id, body)
    return hmac.compare_digest(expected.encode(), given.encode())


def verify_basic(access_id: str, secret_key: str, authorization: str) -> bool:
    """True when an ``Authorization`` header carries exactly these credentials."""
    expected = basic_header(access_id, secret_key)["Authorization"]
    return hmac.compare_digest(expected.encode(), authorization.strip().encode())
