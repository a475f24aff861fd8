"""The local stack's Redis (``worker/tools/stack.py``): under ``REDIS_URL`` the stack works under a
fresh prefix and leaves nothing behind there, whatever happened inside."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from worker.tools.stack import delete_prefix, local_redis


def test_a_stack_on_redis_url_deletes_its_own_keys_on_exit_and_no_other(
        redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    client = redis.Redis.from_url(redis_url)
    seen: list[str] = []
    try:
        client.set(prefix + "keep", "x")
        with pytest.raises(RuntimeError, match="inside the stack"):
            with local_redis(tmp_path, "unit") as target:
                assert not target.private
                assert target.prefix.startswith("tpns-unit-")
                seen.append(target.prefix)
                for k in range(1200):  # more than one SCAN page and one UNLINK round
                    client.set(f"{target.prefix}k{k}", k)
                raise RuntimeError("inside the stack")
        assert list(client.scan_iter(match=seen[0] + "*")) == []
        assert client.get(prefix + "keep") == b"x"
    finally:  # what this test wrote goes, even when the code under test failed to delete it
        if seen:
            delete_prefix(client, seen[0])
        client.close()
