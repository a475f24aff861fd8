"""The benchmark's memory phase (``worker/tools/memory.py``) on a real Redis: what it stores, and
that it deletes what it created and nothing else. Byte figures are never asserted here (the
server may be shared, and figures belong to ``tpns-batcher bench``); the bench's own test checks
they are positive on its private Redis."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest
import redis

from worker.tools.memory import memory_intents, terminal_memory
from worker.tools.stack import glob_escape, keys_under

HEX64 = re.compile(r"[0-9a-f]{64}")
EMAIL = re.compile(r"user\d{8}@example\.com")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_the_phase_deletes_every_key_it_created_and_no_other(client: redis.Redis,
                                                               prefix: str) -> None:
    # glob characters in the phase's prefix: an unescaped SCAN MATCH "…m[1]:*" would also take
    # "…m1:keep", a key the phase did not create
    own = prefix + "m[1]:"
    others = {prefix + "m1:keep": "a", prefix + "m[1]": "b", prefix + "keep": "c"}
    for key, value in others.items():
        client.set(key, value)

    figures = terminal_memory(client, own, 300)

    assert figures.intents == 300
    # the events stream was there, under the phase's prefix, when it measured: one event or more
    # per intent (each is stored, then succeeded)
    assert figures.events_bytes > 0
    assert list(keys_under(client, own)) == []
    assert {key: client.get(key) for key in others} == {k: v.encode() for k, v in others.items()}


def test_the_phase_refuses_a_prefix_that_holds_keys_and_deletes_nothing(
        client: redis.Redis, prefix: str) -> None:
    client.set(prefix + "mem:someone", "x")
    with pytest.raises(ValueError, match=r"^prefix: must hold no key"):
        terminal_memory(client, prefix + "mem:", 20)
    assert client.get(prefix + "mem:someone") == b"x"
    with pytest.raises(ValueError, match=r"^count: must be at least 1"):
        terminal_memory(client, prefix + "empty:", 0)


def test_glob_escape_makes_every_special_character_literal() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape("tpns-mem-1a2b:") == "tpns-mem-1a2b:"


def test_the_phase_stores_realistic_sizes_of_ops_1_to_3() -> None:
    intents = memory_intents(1000, random.Random(4))
    assert {i["operator_type"] for i in intents} == {1, 2, 3}
    assert all(HEX64.fullmatch(i["token"]) for i in intents)
    accounts = [i["account_list"][0]["account"] for i in intents]
    assert all(EMAIL.fullmatch(a) for a in accounts)
    assert accounts[0] == "user00000001@example.com"
    # no two intents share a key: nothing is chained, every intent is claimed at once
    assert len(set(accounts)) == len({i["token"] for i in intents}) == 1000
