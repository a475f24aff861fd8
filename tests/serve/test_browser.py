"""The status page (``GET /``) in a real headless Chromium: its figures and an intent lookup.

Needs a ``chromium`` binary (Debian/Ubuntu: ``apt-get install -y chromium``); skipped without one.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.live_server import serving
from worker.producer import Producer
from worker.serve.app import create_app
from worker.settings import Settings

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                        "google-chrome")) if p), None)


class _ById(HTMLParser):
    """Text content of every element that has an ``id`` (nested ids each get their text)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("meta", "input", "br", "link"):
            return
        ident = dict(attrs).get("id")
        self._open.append((tag, ident))
        if ident:
            self.text.setdefault(ident, "")

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.text[ident] += data


def dump_dom(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM after load, as Chromium serializes it (or a screenshot when asked)."""
    assert CHROMIUM is not None
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    if screenshot is not None:
        args += [f"--screenshot={screenshot}", "--window-size=1200,1100"]
    else:
        args.append("--dump-dom")
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def page_server(redis_url: str, prefix: str) -> Iterator[tuple[str, Producer]]:
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium)")
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_LINGER_MS": "0"})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base:
        yield base, producer


def test_the_status_page_shows_the_figures_and_looks_an_intent_up(
        page_server: tuple[str, Producer], tmp_path: Path) -> None:
    base, producer = page_server
    ids = producer.submit_many(
        [{"operator_type": 2, "token": f"tok-{k}", "account_list": [{"account": f"u{k}"}]}
         for k in range(4)] + [{"operator_type": 4, "token": "tok-queued"}])
    store = producer.store
    claim = store.claim("default", 2)
    assert claim.kind == "batch" and claim.batch_id is not None
    outcomes = [{"id": item.id, "state": "succeeded", "result_code": "0", "ret_code": 0}
                for item in claim.items if item.id != ids[3]]
    outcomes.append({"id": ids[3], "state": "failed", "result_code": "1008006",
                     "ret_code": 1008026, "err_msg": "<partly> failed", "error": "invalid_token"})
    store.complete(claim.batch_id, outcomes, calls=1, items_sent=4, operator_type=2,
                   call_metrics=[("partly_failed", 40.0)])
    store.heartbeat("w1")

    dom = dump_dom(base + "/", tmp_path / "profile")
    found = _ById()
    found.feed(dom)
    text = found.text
    assert "1 worker(s) seen" in text["health"]
    assert "not paused" in text["pause"]
    assert text["queue-depth"] == "1"
    assert text["calls"] == "1"
    assert text["items-per-call"] == "4.0"
    assert "partly_failed 1" in text["call-classes"]
    assert text["latency"] == "40.0 ms"
    assert text["workers"] == "1"
    assert "succeeded" in text["states"] and "failed" in text["states"]
    assert ids[3] in text["failures"]
    assert "invalid_token, result 1008006, ret_code 1008026, <partly> failed" in text["failures"]
    assert "<partly>" not in dom  # escaped in the document, shown as text

    lookup = dump_dom(f"{base}/?id={quote(str(ids[0]))}", tmp_path / "profile")
    found = _ById()
    found.feed(lookup)
    assert "succeeded" in found.text["lookup"] and "tok-0" in found.text["lookup"]

    missing = _ById()
    missing.feed(dump_dom(f"{base}/?id=nope-{quote('<i>')}", tmp_path / "profile"))
    assert missing.text["lookup"] == "nope-<i>: not found"
