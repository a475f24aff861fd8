"""``tpns-batcher serve`` as a real process with an event stream open: told to stop, it ends the
stream and exits cleanly, instead of waiting for a client that never hangs up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.polling import wait_until
from worker.tools.drill import free_port


def test_serve_stops_promptly_with_a_following_stream_open(redis_url: str, prefix: str,
                                                           tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPNS_", "REDIS_URL"))}
    env.update(REDIS_URL=redis_url, TPNS_REDIS_PREFIX=prefix, TPNS_DATA_DIR=str(tmp_path))
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("tpns-batcher")), "serve",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base), 30, message="serve answering")
        with httpx.Client(base_url=base, timeout=30) as http, \
                http.stream("GET", "/v1/events", params={"from": "$"}) as stream:
            assert stream.status_code == 200
            proc.send_signal(signal.SIGTERM)  # what an orchestrator sends
            # the stream ends from the server's side: the body finishes instead of hanging
            assert list(stream.iter_lines()) == []
        # uvicorn re-raises the signal once it has shut down, so the status is the signal's
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text(errors="replace")
    assert "graceful shutdown exceeded" not in text and "Traceback" not in text, text[-3000:]


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/openapi.json", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
