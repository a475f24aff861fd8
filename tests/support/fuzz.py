"""Hypothesis strategies for fuzzing the input doors (SPEC §4): JSON values, raw lines, and valid
intents with one field broken.

A ``Line`` carries its raw bytes and what the product must answer: ``valid`` lines are built from
the rules of SPEC §4 (not from ``worker.intents``), and every mutation below breaks one rule, so a
test can tell a door that refuses too much from one that refuses too little.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

EXTENDED = os.environ.get("TPNS_TEST_PROFILE") == "extended"


def examples(default: int, extended: int) -> int:
    """An example count for a test whose examples are costly (a process, a server round trip)."""
    return extended if EXTENDED else default


#: account types of the service's table (SPEC §4), written out here on purpose
TYPES = [0, *range(1, 17), *range(989, 1016)]
_TEXT_CHARS = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp"))

tokens = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp", "Zs")),
                 min_size=1, max_size=12).filter(
    lambda t: not any(c.isspace() for c in t) and len(t.encode()) <= 64)
names = st.text(alphabet=_TEXT_CHARS, min_size=1, max_size=24)
phones = st.from_regex(r"\+[0-9]{6,15}", fullmatch=True)


@st.composite
def accounts(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([None, *TYPES]))
    name = draw(phones if kind == 1002 else names)
    return {"account": name} if kind is None else {"account": name, "account_type": kind}


@st.composite
def valid_intents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid intent; an account_list may repeat an account exactly (collapsed, still valid)."""
    op = draw(st.integers(1, 5))
    if op == 5:
        return {"operator_type": 5, **draw(accounts())}
    intent: dict[str, Any] = {"operator_type": op, "token": draw(tokens)}
    if op != 4:
        distinct = draw(st.lists(accounts(), min_size=1, max_size=5))
        repeats = draw(st.lists(st.sampled_from(distinct), max_size=2))
        intent["account_list"] = distinct + repeats
    return intent


def dumps(obj: Any) -> str:
    """JSON as another language's encoder may write it: ASCII escapes, or UTF-8 as is."""
    return json.dumps(obj, ensure_ascii=len(json.dumps(obj)) % 2 == 0)


def _with_op(intent: dict[str, Any], literal: str) -> bytes:
    rest = {k: v for k, v in intent.items() if k != "operator_type"}
    return ('{"operator_type": ' + literal + ", " + json.dumps(rest)[1:]).encode()


def _string_field(intent: dict[str, Any]) -> str:
    return "account" if intent["operator_type"] == 5 else "token"


def _mutate_op(kind: str, intent: dict[str, Any], draw: st.DrawFn) -> bytes:
    op = intent["operator_type"]
    if kind == "op as string":
        return _with_op(intent, f'"{op}"')
    if kind == "huge int":
        return _with_op(intent, str(op) * draw(st.integers(19, 6000)))
    if kind == "float":
        return _with_op(intent, draw(st.sampled_from([f"{op}.0", f"{op}e0", f"{op}.5", f"{op}E+0"])))
    return _with_op(intent, draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))


#: one-rule breakages of a valid intent: name -> (intent, draw) -> raw line
def _mutate(kind: str, intent: dict[str, Any], draw: st.DrawFn) -> bytes:
    op = intent["operator_type"]
    field = _string_field(intent)
    if kind in ("op as string", "huge int", "float", "non-finite"):
        return _mutate_op(kind, intent, draw)
    if kind == "lone surrogate":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\udbff"]))
        return json.dumps({**intent, field: "x"}).replace('"x"', f'"x{escape}"', 1).encode()
    if kind == "NUL escape":
        return json.dumps({**intent, field: "x\x00"}).encode()
    if kind == "NUL byte":
        return json.dumps({**intent, field: "x"}).replace('"x"', '"x\x00"', 1).encode()
    if kind == "invalid UTF-8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]))
        return json.dumps({**intent, field: "x"}).encode().replace(b'"x"', b'"x' + bad + b'"', 1)
    if kind == "duplicate key":
        again = draw(st.sampled_from(sorted(intent)))
        return (json.dumps(intent)[:-1] + f", {json.dumps(again)}: {json.dumps(intent[again])}}}").encode()
    if kind == "deep nesting":
        depth = draw(st.integers(3, 100_000))
        return (json.dumps(intent)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "unclosed nesting":
        return ("[" * draw(st.integers(1, 100_000))).encode()
    if kind == "extra field":
        name = draw(st.sampled_from(["colour", "Token", "platform", " token", "account_type"]))
        if name == "account_type" and op == 5:
            name = "token"
        return json.dumps({**intent, name: 1}).encode()
    if kind == "wrong type":
        return json.dumps({**intent, field: draw(st.sampled_from([7, None, True, [], {}, ["x"]]))}).encode()
    if kind == "truncated":
        text = json.dumps(intent)
        return text[:draw(st.integers(1, len(text) - 1))].encode()
    raise AssertionError(kind)


MUTATIONS = ("op as string", "huge int", "float", "non-finite", "lone surrogate", "NUL escape",
             "NUL byte", "invalid UTF-8", "duplicate key", "deep nesting", "unclosed nesting",
             "extra field", "wrong type", "truncated")


@dataclass(frozen=True)
class Line:
    """One physical line of a JSON Lines input and the answer it must get."""

    raw: bytes
    #: "valid": must be stored; "refused": must be refused; "blank": no answer;
    #: "any": arbitrary bytes, judged by the properties that hold for every line
    expect: str
    intent: dict[str, Any] | None = None
    mutation: str = ""


@st.composite
def near_valid_lines(draw: st.DrawFn) -> Line:
    """A valid intent with exactly one rule broken."""
    intent = draw(valid_intents())
    kind = draw(st.sampled_from(MUTATIONS))
    return Line(_mutate(kind, intent, draw), "refused", intent, kind)


@st.composite
def valid_lines(draw: st.DrawFn) -> Line:
    intent = draw(valid_intents())
    ending = draw(st.sampled_from(["", "\r", " ", "\t \r"]))
    return Line((dumps(intent) + ending).encode(), "valid", intent)


blank_lines = st.sampled_from([b"", b" ", b"\r", b"\t \r"]).map(lambda raw: Line(raw, "blank"))
#: arbitrary bytes (no LF: that would end the line)
any_lines = st.binary(max_size=60).map(lambda raw: Line(raw.replace(b"\n", b""), "any"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def mixed_lines(max_size: int) -> st.SearchStrategy[list[Line]]:
    """A JSON Lines file of valid, near-valid, blank and arbitrary lines in any order."""
    return st.lists(st.one_of(valid_lines(), near_valid_lines(), blank_lines, any_lines,
                              json_values.map(lambda v: Line(json.dumps(v).encode(), "any"))),
                    min_size=1, max_size=max_size)


def with_ids(lines: list[Line], ids: list[str | None]) -> list[Line]:
    """Give the valid lines the ids in ``ids`` (None: no id); a repeated id with another payload
    makes the later line one that must be refused (SPEC §4), the same payload one stored once."""
    out: list[Line] = []
    seen: dict[str, dict[str, Any]] = {}
    k = 0
    for line in lines:
        if line.expect != "valid" or line.intent is None:
            out.append(line)
            continue
        intent_id = ids[k % len(ids)] if ids else None
        k += 1
        if intent_id is None:
            out.append(line)
            continue
        intent = {**line.intent, "id": intent_id}
        expect = "valid" if seen.setdefault(intent_id, intent) == intent else "refused"
        out.append(Line(dumps(intent).encode(), expect, intent, "" if expect == "valid" else "id reused"))
    return out


def collapsed(accounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An account_list with exact repeats dropped (first kept), types made explicit."""
    out: list[dict[str, Any]] = []
    for acc in accounts:
        full = {"account": acc["account"], "account_type": acc.get("account_type", 0)}
        if full not in out:
            out.append(full)
    return out
