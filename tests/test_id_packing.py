"""The packing of ids in the history index and the summaries (``lib.lua``'s ``id_pack`` and
``id_unpack``), run by the real Redis's Lua: one-to-one for every id the product accepts, and short
for the ids it generates, on one Redis and on a cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import examples
from worker.bulk import new_id
from worker.keys import app_id
from worker.store_calls import load_script

ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:-"
#: the shared part of every script (everything before lookup.lua's own lines)
LIB = load_script("lookup").rsplit("-- KEYS: the families", 1)[0]
ROUND_TRIP = LIB + """
local out = {}
for k = 2, #ARGV do
  local packed = id_pack(ARGV[k])
  out[#out + 1] = id_unpack(packed)
  out[#out + 1] = #packed
end
return out
"""


@pytest.fixture(scope="module")
def lua(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def packed(client: redis.Redis, ids: list[str]) -> list[tuple[str, int]]:
    raw: Any = client.eval(ROUND_TRIP, 0, "unused:", *ids)
    return [(raw[k].decode(), int(raw[k + 1])) for k in range(0, len(raw), 2)]


def test_generated_ids_pack_to_10_bytes_and_cluster_ones_to_the_app_plus_12(
        lua: redis.Redis) -> None:
    plain, tagged = new_id(), app_id("android", new_id())
    assert packed(lua, [plain, tagged]) == [(plain, 10), (tagged, len("android") + 12)]


def test_look_alikes_come_back_as_they_went_in(lua: redis.Redis) -> None:
    ids = ["abcdefghij", "0123456789", "0123456789ABCDEF0123", "0123456789abcdef012",
           "x.y.0123456789abcdef0123", "android.order-17", "android.abcdefghij",
           "android.0123456789abcdef01234", "a" * 64]
    assert [back for back, _ in packed(lua, ids)] == ids


@settings(max_examples=examples(200, 2000), deadline=None)
@given(st.lists(st.one_of(
    st.text(ID_CHARS, min_size=1, max_size=64),
    st.builds(lambda app, hexes: f"{app}.{hexes}",
              st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True),
              st.text("0123456789abcdef", min_size=20, max_size=20))), min_size=1, max_size=20))
def test_every_id_round_trips_and_no_two_pack_alike(lua: redis.Redis, ids: list[str]) -> None:
    answers = packed(lua, ids)
    assert [back for back, _ in answers] == ids
