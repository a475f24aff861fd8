"""The one strict JSON reader behind every door (SPEC §4): lines, documents, bytes of any kind.

``json.loads`` alone takes input the format does not allow and lets some of it escape as the wrong
error: a repeated key silently keeps the last value; a 5,000-digit literal raises ``ValueError``
(Python's int conversion limit); ``NaN`` and floats pass as numbers; 100,000 ``[`` raise
``RecursionError``. Here:

- nesting is measured *before* decoding, by a linear scan that never recurses;
- numbers that are not plain integers in range decode to a ``BadNumber`` marker (a giant literal is
  never converted), and an object with a repeated key decodes to a ``Duplicated`` dict. The
  validator (``worker.intents``) refuses both naming the field, since only it knows the field's path;
- a line is decoded from bytes on its own: invalid UTF-8 or a NUL byte refuses that line only;
  a UTF-8 BOM on the first line and a CR before the LF are accepted.

Every refusal here is an ``IntentError`` with the field ``json`` (no field can be named yet).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import IntentError

#: levels the format needs: intent object -> account_list -> account object
MAX_DEPTH = 3
#: digits in the longest integer literal decoded as a number; longer ones become a BadNumber
#: (every integer of the format fits in 4 digits; 18 keeps any int64 literal readable)
MAX_INT_DIGITS = 18
BOM = "\ufeff"

_STRUCTURE = re.compile(r'[\[\]{}"\\]')


class BadNumber:
    """A number in the input that is not a plain integer in range: the validator refuses it."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        #: what it was, for the message: "a float", "NaN", "an integer of 5001 digits"
        self.kind = kind

    def __repr__(self) -> str:
        return f"BadNumber({self.kind!r})"


class Duplicated(dict[str, Any]):
    """An object in which ``key`` appeared more than once (the first value is kept)."""

    key: str = ""


def _int(literal: str) -> int | BadNumber:
    digits = len(literal) - literal.startswith("-")
    if digits > MAX_INT_DIGITS:
        return BadNumber(f"an integer of {digits} digits")
    return int(literal)


def _float(literal: str) -> BadNumber:
    return BadNumber("a float")


def _constant(name: str) -> BadNumber:
    return BadNumber(name)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    repeated: str | None = None
    for key, value in pairs:
        if key in out:
            repeated = repeated if repeated is not None else key
            continue
        out[key] = value
    if repeated is None:
        return out
    dup = Duplicated(out)
    dup.key = repeated
    return dup


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_int, parse_float=_float,
                            parse_constant=_constant)


def too_deep(text: str, limit: int) -> int | None:
    """The offset of the first ``[`` or ``{`` nested deeper than ``limit``, else None.

    A linear scan that skips strings; it does not check anything else (the decoder does).
    """
    if text.count("[") + text.count("{") <= limit:  # never deeper than the brackets it holds
        return None
    depth = 0
    in_string = False
    skip_to = -1
    for match in _STRUCTURE.finditer(text):
        at = match.start()
        if at < skip_to:
            continue
        char = text[at]
        if in_string:
            if char == "\\":
                skip_to = at + 2
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return at
        elif char in "]}":
            depth -= 1
    return None


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one JSON text strictly; raises ``IntentError("json", ...)`` (no line number)."""
    deep = too_deep(text, max_depth)
    if deep is not None:
        raise IntentError("json", f"nested deeper than the format needs ({max_depth} levels) "
                                  f"at column {deep + 1}")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise IntentError("json", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # not expected after the checks; never a traceback
        raise IntentError("json", f"cannot be decoded ({type(exc).__name__})") from None


def decode_line(raw: bytes | str, number: int) -> Any:
    """Decode one JSON Lines line (bytes as read, or text); refusals name the line."""
    try:
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IntentError("json", f"not valid UTF-8 (byte {exc.start + 1})") from None
        else:
            text = raw
        if number == 1:
            text = text.removeprefix(BOM)
        nul = text.find("\x00")
        if nul >= 0:
            raise IntentError("json", f"a NUL byte at column {nul + 1}")
        return loads(text)
    except IntentError as exc:
        raise IntentError(exc.field, exc.rule, number) from None


def _blank(raw: bytes | str, number: int) -> bool:
    if isinstance(raw, bytes):
        if number == 1:
            raw = raw.removeprefix(BOM.encode())
        return not raw.strip(b" \t\r\n")
    if number == 1:
        raw = raw.removeprefix(BOM)
    return not raw.strip(" \t\r\n")


def iter_lines(lines: Iterable[bytes | str]) -> Iterator[tuple[int, bytes | str]]:
    """(physical line number from 1, raw line) for every non-blank line."""
    for number, raw in enumerate(lines, start=1):
        if not _blank(raw, number):
            yield number, raw


def split_lines(body: bytes) -> list[bytes]:
    """A JSON Lines body's physical lines: split at LF only (a CR before it is whitespace)."""
    return body.split(b"\n")
