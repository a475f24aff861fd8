"""The sandbox's own signature and Basic checks, against the published TPNS vector (reference §4)."""

from __future__ import annotations

import pytest

from worker.sandbox.auth import (
    SANDBOX_ACCESS_ID,
    SANDBOX_SECRET_KEY,
    authorized,
    expected_basic,
    expected_sign,
)
from worker.settings import Settings

ACCESS_ID = "1500001048"
SECRET_KEY = "1452fcebae9f3115ba794fb0fff2fd73"
TIMESTAMP = "1565314789"
#: the body of the official signature example, byte for byte (reference §4.2)
PUBLISHED_BODY = (
    b'{"audience_type": "account","platform": "android","message": {"title": "test title",'
    b'"content": "test content","android": { "action": {"action_type": 3,"intent": '
    b'"xgscheme://com.xg.push/notify_detail?param1=xg"}}},"message_type": "notify",'
    b'"account_list": ["5822f0eee44c3625ef0000bb"] }'
)
PUBLISHED_SIGN = ("Y2QyMDc3NDY4MmJmNzhiZmRiNDNlMTdkMWQ1ZDU2YjNlNWI3ODlh"
                  "MTY3MGZjMTUyN2VmNTRjNjVkMmQ3Yjc2ZA==")
BASIC = "Basic MTUwMDAwMTA0ODoxNDUyZmNlYmFlOWYzMTE1YmE3OTRmYjBmZmYyZmQ3Mw=="
NOW = float(TIMESTAMP)


def signed(**changes: str) -> dict[str, str]:
    """Lower-cased headers of the published example, with ``changes`` applied."""
    return {"accessid": ACCESS_ID, "timestamp": TIMESTAMP, "sign": PUBLISHED_SIGN, **changes}


def check(headers: dict[str, str], body: bytes = PUBLISHED_BODY, now_s: float = NOW,
          secret_key: str = SECRET_KEY) -> bool:
    return authorized(headers, body, access_id=ACCESS_ID, secret_key=secret_key,
                      max_skew_s=600, now_s=now_s)


def test_the_published_vector() -> None:
    assert expected_sign(SECRET_KEY, ACCESS_ID, TIMESTAMP, PUBLISHED_BODY) == PUBLISHED_SIGN
    assert expected_basic(ACCESS_ID, SECRET_KEY) == BASIC


def test_the_published_request_is_authorized_and_any_change_is_not() -> None:
    assert check(signed())
    assert not check(signed(), body=PUBLISHED_BODY + b" ")
    assert not check(signed(), secret_key="other")
    assert not check(signed(accessid="1500001049"))
    assert not check(signed(timestamp=str(int(TIMESTAMP) + 1)))
    assert not check(signed(sign=PUBLISHED_SIGN.lower()))


@pytest.mark.parametrize(("now_s", "ok"), [(NOW + 600, True), (NOW - 600, True),
                                           (NOW + 601, False), (NOW - 601, False)])
def test_the_timestamp_must_be_within_the_skew(now_s: float, ok: bool) -> None:
    assert check(signed(), now_s=now_s) is ok


@pytest.mark.parametrize("timestamp", ["", "-1", "1e9", "１５６５３１４７８９", "1" * 13])
def test_a_timestamp_that_is_not_unix_seconds_is_refused(timestamp: str) -> None:
    assert not check(signed(timestamp=timestamp))


def test_basic_is_checked_when_no_sign_is_sent_and_sign_wins_when_both_are() -> None:
    assert check({"authorization": BASIC})
    assert check({"authorization": f"  {BASIC} "})
    assert not check({"authorization": BASIC.replace("Basic", "Bearer")})
    assert not check({})
    assert not check({**signed(sign="wrong"), "authorization": BASIC})


def test_a_worker_pointed_at_a_sandbox_signs_with_the_sandboxs_default_pair() -> None:
    # worker.settings keeps its own copy of the public pair (the core may not import the sandbox);
    # this is where the two are held together.
    app = Settings.from_env({"TPNS_BASE_URL": "http://127.0.0.1:8810"}).app
    assert (app.access_id, app.secret_key) == (SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY)
