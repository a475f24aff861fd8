"""The embedded Redis: started by the first command that needs it, found by the others, durable."""

from __future__ import annotations

from pathlib import Path

import redis

from worker.embedded import ensure_embedded, stop_embedded


def test_the_first_caller_starts_it_the_next_finds_it_and_data_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = ensure_embedded(data)
    try:
        assert url == f"unix://{data.resolve() / 'redis.sock'}"
        pid = (data / "redis.pid").read_text().strip()
        client = redis.Redis.from_url(url)
        first = client.info("server")
        client.set("tpns:probe", "kept")
        client.close()
        assert int(first["process_id"]) == int(pid)
        assert ensure_embedded(data) == url
        # found, not started twice: the socket still leads to the very same server process
        client = redis.Redis.from_url(url)
        again = client.info("server")
        client.close()
        assert (again["run_id"], again["process_id"]) == (first["run_id"], first["process_id"])
        assert (data / "redis.pid").read_text().strip() == pid
    finally:
        assert stop_embedded(data)
    assert not stop_embedded(data), "it was still running after shutdown"
    url = ensure_embedded(data)  # started again from the append-only file
    try:
        client = redis.Redis.from_url(url)
        assert client.get("tpns:probe") == b"kept"
        assert (data / "redis.pid").read_text().strip() != pid
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.close()
    finally:
        stop_embedded(data)


def test_a_data_dir_too_long_for_a_socket_is_one_clear_error(tmp_path: Path) -> None:
    import pytest

    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="TPNS_DATA_DIR: too long a path"):
        ensure_embedded(tmp_path / ("d" * 120))
