"""worker.tpns_codes: pure, one table per rule, and the call classification of SPEC §6.

What each code does to a batch's items is tested in test_outcomes.py, parametrized over these
tables; here: the module's purity (the sandbox may import it and nothing else of the core), the
tables' consistency and ``classify_call`` row by row.
"""

from __future__ import annotations

import ast
import sys
from itertools import combinations
from pathlib import Path

import pytest

from worker import tpns_codes as codes

SOURCE = Path(codes.__file__)


def test_imports_only_the_standard_library() -> None:
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "tpns_codes must not import anything of worker"
            imported.append(node.module or "")
    assert imported, "the check found no import at all"
    outside = [m for m in imported
               if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"]
    assert outside == []


def test_call_level_tables_do_not_overlap() -> None:
    tables = {"item level": codes.ITEM_LEVEL_RET_CODES, "rejected": codes.REJECTED_RET_CODES,
              "credentials": codes.CREDENTIALS_RET_CODES,
              "retry": frozenset({codes.RATE_LIMITED_RET_CODE, codes.SERVICE_ERROR_RET_CODE})}
    for (a, x), (b, y) in combinations(tables.items(), 2):
        assert not x & y, f"{a} and {b} share {x & y}"


def test_item_tables_do_not_overlap() -> None:
    assert not codes.SUCCESS_ITEM_CODES & set(codes.FAILED_ITEM_CODES)


def test_accepted_classes_cover_every_item_level_code() -> None:
    assert set(codes.ACCEPTED_CLASSES) == codes.ITEM_LEVEL_RET_CODES
    assert set(codes.ACCEPTED_CLASSES.values()) <= set(codes.CALL_CLASSES)


@pytest.mark.parametrize(("ret_code", "kind"), [
    *((c, "accepted") for c in sorted(codes.ITEM_LEVEL_RET_CODES)),
    *((c, "rejected") for c in sorted(codes.REJECTED_RET_CODES)),
    *((c, "credentials") for c in sorted(codes.CREDENTIALS_RET_CODES)),
    (codes.RATE_LIMITED_RET_CODE, "rate_limited"),
    (codes.SERVICE_ERROR_RET_CODE, "service_error"),
    (1008099, "unexpected"),
    (None, "bad_response"),
])
def test_a_2xx_answer_by_its_ret_code(ret_code: int | None, kind: str) -> None:
    assert codes.classify_call(200, ret_code) == kind
    assert codes.classify_call(201, ret_code) == kind


@pytest.mark.parametrize(("status", "ret_code", "kind"), [
    (429, None, "rate_limited"),
    (429, 0, "rate_limited"),
    (429, codes.INVALID_PARAMETER, "rate_limited"),
    (503, codes.RATE_LIMITED_RET_CODE, "rate_limited"),
    *((400, c, "rejected") for c in sorted(codes.REJECTED_RET_CODES)),
    *((403, c, "credentials") for c in sorted(codes.CREDENTIALS_RET_CODES)),
    # a 5xx is the server's failure whatever it names; a 4xx naming no permanent code retries
    (500, codes.INVALID_PARAMETER, "http_status"),
    (502, codes.AUTH_FAILURE, "http_status"),
    (404, None, "http_status"),
    (400, 0, "http_status"),
    (400, codes.SERVICE_ERROR_RET_CODE, "http_status"),
    (302, None, "http_status"),
])
def test_a_non_2xx_answer(status: int, ret_code: int | None, kind: str) -> None:
    assert codes.classify_call(status, ret_code) == kind


@pytest.mark.parametrize(("code", "verdict"), [
    *((c, ("succeeded", None)) for c in sorted(codes.SUCCESS_ITEM_CODES)),
    *((c, ("failed", e)) for c, e in sorted(codes.FAILED_ITEM_CODES.items())),
    ("1008099", ("retry", "item_1008099")),
    ("", ("retry", "item_")),
])
def test_item_verdict(code: str, verdict: tuple[str, str | None]) -> None:
    assert codes.item_verdict(code) == verdict


def test_account_type_table() -> None:
    assert {0, 1, 16, 989, 1002, 1015} <= codes.ACCOUNT_TYPES
    assert not {-1, 17, 988, 1016} & codes.ACCOUNT_TYPES
    assert codes.PHONE_ACCOUNT_TYPE in codes.ACCOUNT_TYPES
