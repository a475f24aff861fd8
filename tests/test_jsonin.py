"""The strict decoder (``worker.jsonin``) and the validator behind it, fuzzed in process.

Properties: whatever the bytes, decoding a line and validating it raises ``IntentError`` only; a
valid intent is accepted as SPEC §4 says (exact repeats collapsed); a valid intent with one rule
broken is refused, naming the field wherever one can be named.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import Line, collapsed, json_values, near_valid_lines, valid_lines
from worker.errors import IntentError
from worker.intents import validate
from worker.jsonin import MAX_DEPTH, BadNumber, Duplicated, decode_line, iter_lines, loads, too_deep

APPS = {"default", "ios"}


def judge(raw: bytes, number: int = 1) -> Any:
    """What the CLI and HTTP do with one line: decode, then validate (refusals name the line)."""
    obj = decode_line(raw, number)
    try:
        return validate(obj, APPS)
    except IntentError as exc:
        raise IntentError(exc.field, exc.rule, number) from None


def test_a_giant_integer_is_never_converted() -> None:
    doc = loads('{"a": ' + "9" * 100_000 + ', "b": -' + "1" * 19 + ', "c": 123456789012345678}')
    assert isinstance(doc["a"], BadNumber) and doc["a"].kind == "an integer of 100000 digits"
    assert isinstance(doc["b"], BadNumber) and doc["b"].kind == "an integer of 19 digits"
    assert doc["c"] == 123456789012345678


@pytest.mark.parametrize(("literal", "kind"), [("1.0", "a float"), ("1e3", "a float"), ("-0.5", "a float"),
                                               ("NaN", "NaN"), ("Infinity", "Infinity"),
                                               ("-Infinity", "-Infinity")])
def test_numbers_that_are_not_plain_integers_become_markers(literal: str, kind: str) -> None:
    value = loads(f"[{literal}]")[0]
    assert isinstance(value, BadNumber) and value.kind == kind


def test_a_repeated_key_is_marked_and_the_first_value_kept() -> None:
    doc = loads('{"a": 1, "b": {"x": 1, "x": 2}, "a": 3}')
    assert isinstance(doc, Duplicated) and doc.key == "a" and doc["a"] == 1
    assert isinstance(doc["b"], Duplicated) and doc["b"].key == "x" and doc["b"]["x"] == 1
    assert type(loads('{"a": 1, "b": 2}')) is dict


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 50_000,
                                  '{"a": [[[[1]]]]}', '[{"a": [{"b": []}]}]'])
def test_nesting_deeper_than_the_format_is_refused_without_recursing(text: str) -> None:
    with pytest.raises(IntentError) as caught:
        loads(text)
    assert caught.value.field == "json" and "nested deeper" in caught.value.rule


def test_nesting_is_measured_outside_strings_only() -> None:
    assert too_deep('{"a": "[[[[[[{{{{", "b": "\\"[[[[["}', MAX_DEPTH) is None
    assert loads('{"a": [{"b": 1}]}') == {"a": [{"b": 1}]}
    assert too_deep('[[[[', 3) == 3


@pytest.mark.parametrize(("text", "limit", "offset"), [
    ('{"account_list": [{"account": "a"}]}', 3, None),  # as many brackets as the limit: no scan
    ('{"a": [{"b": [1]}]}', 3, 13),  # one more, nested: found where it starts
    ('{"a": [1], "b": [2], "c": {}}', 3, None),  # more brackets than the limit, side by side
    ('{"a": "[[[["}', 3, None),  # brackets in a string count towards the quick check only
])
def test_the_depth_is_measured_exactly_whether_or_not_it_is_scanned(text: str, limit: int,
                                                                   offset: int | None) -> None:
    assert too_deep(text, limit) == offset


@pytest.mark.parametrize(("raw", "word"), [(b'{"a": "\xff"}', "UTF-8"), (b'{"a": "x\x00"}', "NUL"),
                                           (b'\x00', "NUL"), (b'{"a": 1', "not valid JSON"),
                                           (b'\xef\xbb\xbf{"a": 1}', "")])
def test_a_line_is_decoded_from_bytes_and_refusals_name_the_line(raw: bytes, word: str) -> None:
    if not word:  # a BOM on the first line is accepted, and only there
        assert decode_line(raw, 1) == {"a": 1}
        raw, word = raw, "not valid JSON"
        with pytest.raises(IntentError) as caught:
            decode_line(raw, 2)
    else:
        with pytest.raises(IntentError) as caught:
            decode_line(raw, 7)
    assert caught.value.field == "json" and word in caught.value.rule
    assert str(caught.value).startswith(f"line {caught.value.line}: json: ")


def test_blank_lines_are_skipped_and_physical_lines_counted() -> None:
    lines = [b"\xef\xbb\xbf\r", b'{"a": 1}\r', b"  ", b"\t\r", b"x", b"\xef\xbb\xbf"]
    assert [n for n, _ in iter_lines(lines)] == [2, 5, 6]


@pytest.mark.parametrize(("raw", "field", "word"), [
    (b'{"operator_type": ' + b"1" * 5001 + b', "token": "a"}', "operator_type", "5001 digits"),
    (b'{"operator_type": 4, "token": "\\ud800"}', "token", "valid Unicode"),
    (b'{"operator_type": 4, "token": "a", "token": "b"}', "token", 'duplicate key "token"'),
    (b'{"operator_type": 4, "operator_type": 4, "token": "a"}', "operator_type", "duplicate key"),
    (b'{"operator_type": 2, "token": "a", "account_list": [{"account": "u", "account": "v"}]}',
     "account_list[0].account", 'duplicate key "account"'),
    (b'{"operator_type": 1.0, "token": "a"}', "operator_type", "must be an integer from 1 to 5, not a float"),
    (b'{"operator_type": NaN, "token": "a"}', "operator_type", "not NaN"),
    (b'{"operator_type": 5, "account": "u", "account_type": -Infinity}', "account_type", "not -Infinity"),
    (b'{"operator_type": 5, "account": "u", "account_type": 1e3}', "account_type", "not a float"),
    (b'{"operator_type": 5, "account": "u", "account_type": ' + b"9" * 5000 + b"}", "account_type", "digits"),
    (b'{"operator_type": 5, "account": "u\\u0000"}', "account", "control"),
    (b'{"operator_type": 5, "account": "u", "account_type": null}', "account_type", "integer"),
    (b'{"operator_type": 4, "token": "t", "id": null}', "id", "non-empty string"),
    (b'{"operator_type": 4, "token": "t", "\\ud800": 1}', "\\ud800", "not a known field"),
])
def test_each_new_refusal_names_the_field(raw: bytes, field: str, word: str) -> None:
    with pytest.raises(IntentError) as caught:
        judge(raw, 3)
    assert (caught.value.field, caught.value.line) == (field, 3)
    assert word in caught.value.rule
    caught.value.reason.encode("utf-8")  # printable and sendable as it is


def test_an_exact_repeat_of_an_account_is_collapsed_through_the_decoder() -> None:
    intent = judge(b'{"operator_type": 2, "token": "t", "account_list": [{"account": "u"}, '
                   b'{"account": "v", "account_type": 1}, {"account": "u", "account_type": 0}]}')
    assert [(a.account, a.account_type) for a in intent.accounts] == [("u", 0), ("v", 1)]


# -- fuzz ---------------------------------------------------------------------------------------

@given(st.binary(max_size=200), st.integers(1, 3))
def test_any_bytes_get_an_intent_or_an_intent_error(raw: bytes, number: int) -> None:
    try:
        judge(raw, number)
    except IntentError as exc:
        assert exc.line == number or exc.line is None
        exc.reason.encode("utf-8")


@given(json_values)
def test_any_json_value_gets_an_intent_or_an_intent_error(value: Any) -> None:
    try:
        judge(json.dumps(value).encode())
    except IntentError as exc:
        assert "cannot be read" not in exc.rule, "the validator's safety net caught a bug"
        exc.reason.encode("utf-8")


@given(st.recursive(st.none() | st.integers() | st.floats() | st.text() | st.binary()
                    | st.integers(min_value=10**4400),
                    lambda inner: st.lists(inner, max_size=3) | st.sets(st.integers(), max_size=3)
                    | st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=4),
                    max_leaves=10))
def test_any_python_object_gets_an_intent_or_an_intent_error(obj: Any) -> None:
    try:
        validate(obj, APPS)
    except IntentError as exc:
        assert "cannot be read" not in exc.rule, "the validator's safety net caught a bug"
        exc.reason.encode("utf-8")


@given(valid_lines())
def test_a_valid_line_is_accepted_as_written(line: Line) -> None:
    assert line.intent is not None
    intent = judge(line.raw)
    assert intent.operator_type == line.intent["operator_type"]
    got = [a.to_json() for a in intent.accounts]
    if line.intent["operator_type"] == 5:
        assert got == collapsed([{k: v for k, v in line.intent.items() if k != "operator_type"}])
    else:
        assert intent.token == line.intent["token"]
        assert got == collapsed(line.intent.get("account_list", []))


@given(near_valid_lines())
def test_a_valid_line_with_one_rule_broken_is_refused(line: Line) -> None:
    with pytest.raises(IntentError) as caught:
        judge(line.raw, 5)
    exc = caught.value
    assert exc.line == 5
    exc.reason.encode("utf-8")
    by_field = {"op as string", "huge int", "float", "non-finite", "lone surrogate", "NUL escape",
                "duplicate key", "extra field", "wrong type"}
    if line.mutation in by_field:
        assert exc.field != "json", f"{line.mutation}: the field could be named: {exc}"
    else:
        assert exc.field == "json", f"{line.mutation}: {exc}"
