"""worker.auth against the published TPNS vectors (reference §4)."""

from __future__ import annotations

from worker.auth import basic_header, sign, sign_headers, verify_basic, verify_sign

ACCESS_ID = "1500001048"
SECRET_KEY = "1452fcebae9f3115ba794fb0fff2fd73"
TIMESTAMP = 1565314789

#: the body of the official signature example, byte for byte (reference §4.2)
PUBLISHED_BODY = (
    b'{"audience_type": "account","platform": "android","message": {"title": "test title",'
    b'"content": "test content","android": { "action": {"action_type": 3,"intent": '
    b'"xgscheme://com.xg.push/notify_detail?param1=xg"}}},"message_type": "notify",'
    b'"account_list": ["5822f0eee44c3625ef0000bb"] }'
)
PUBLISHED_SIGN = ("Y2QyMDc3NDY4MmJmNzhiZmRiNDNlMTdkMWQ1ZDU2YjNlNWI3ODlh"
                  "MTY3MGZjMTUyN2VmNTRjNjVkMmQ3Yjc2ZA==")

BATCH_BODY = (b'{"operator_type":2,"token_accounts":[{"token":"token1","account_list":'
              b'[{"account":"926@126.com","account_type":0}]}]}')
BATCH_SIGN = ("YjQ2MzQ4ZjgyYzI2YjQ2Y2NhMWNjNWU1MWYyMzViOTI0ZGE4ZDYx"
              "NjI2ZGEzZTFjOGNmMDZiNzBlMmU4OGQ5Yw==")
BASIC = "Basic MTUwMDAwMTA0ODoxNDUyZmNlYmFlOWYzMTE1YmE3OTRmYjBmZmYyZmQ3Mw=="


def test_published_signature_vector() -> None:
    assert sign(SECRET_KEY, TIMESTAMP, ACCESS_ID, PUBLISHED_BODY) == PUBLISHED_SIGN


def test_signature_is_base64_of_the_hex_digest_not_the_raw_bytes() -> None:
    assert sign(SECRET_KEY, TIMESTAMP, ACCESS_ID, PUBLISHED_BODY) != \
        "zSB3RoK/eL/bQ+F9HV1Ws+W3iaFnD8FSfvVMZdLXt20="


def test_derived_batchoperate_vector() -> None:
    assert sign(SECRET_KEY, str(TIMESTAMP), int(ACCESS_ID), BATCH_BODY) == BATCH_SIGN
    assert sign_headers(ACCESS_ID, SECRET_KEY, BATCH_BODY, TIMESTAMP) == {
        "AccessId": ACCESS_ID, "TimeStamp": str(TIMESTAMP), "Sign": BATCH_SIGN}


def test_verify_sign_accepts_the_vector_and_refuses_any_change() -> None:
    assert verify_sign(SECRET_KEY, ACCESS_ID, str(TIMESTAMP), BATCH_BODY, BATCH_SIGN)
    assert not verify_sign(SECRET_KEY, ACCESS_ID, str(TIMESTAMP + 1), BATCH_BODY, BATCH_SIGN)
    assert not verify_sign(SECRET_KEY, ACCESS_ID, str(TIMESTAMP), BATCH_BODY + b" ", BATCH_SIGN)
    assert not verify_sign("other", ACCESS_ID, str(TIMESTAMP), BATCH_BODY, BATCH_SIGN)


def test_basic_vector() -> None:
    assert basic_header(ACCESS_ID, SECRET_KEY) == {"Authorization": BASIC}
    assert verify_basic(ACCESS_ID, SECRET_KEY, BASIC)
    assert verify_basic(ACCESS_ID, SECRET_KEY, f"  {BASIC} ")
    assert not verify_basic(ACCESS_ID, "other", BASIC)
