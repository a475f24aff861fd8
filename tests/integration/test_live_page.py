"""The live status page in a real headless Chromium (DevTools protocol), over a real worker.

With ``TPNS_API_TOKEN`` set the page signs in through its form (cookie + CSRF token); intents
then go through a real ``tpns-batcher worker`` and the sandbox, and the page must show them
without a reload: figures, a chart of intents in/finished, the failures chart and list; the
requeue button (a CSRF-carrying POST from the page) and the lookup box work. Set
``TPNS_SCREENSHOT=path.png`` to keep a screenshot of the page at the end (docs/status-page.png is
taken that way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Launcher, product_env
from tests.support.browser import CHROMIUM, Browser
from tests.support.live_server import serving
from tests.support.polling import wait_until
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.serve.app import create_app
from worker.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

TOKEN = "page-token-for-the-browser"
INVALID = "invalid-"  # the sandbox's prefix of invalid tokens


@pytest.fixture
def page(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[tuple[str, Producer, Browser]]:
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium)")
    settings = Settings.from_env(product_env(redis_url, prefix, TPNS_API_TOKEN=TOKEN))
    with Producer(redis_url, prefix, settings=settings) as producer, \
            serving(create_app(producer, settings)) as base, \
            Browser(tmp_path / "profile") as browser:
        yield base, producer, browser


def figures(browser: Browser) -> dict[str, Any]:
    """What the page shows now: a few figures, the charts' sums and lines, the refresh count."""
    return dict(browser.evaluate("""(() => {
        const text = id => (document.getElementById(id) || {}).textContent || null;
        const chart = id => {
            const el = document.getElementById(id);
            if (!el) return {sum: 0, lines: '', series: []};
            return {sum: Number(el.getAttribute('data-sum') || 0),
                    lines: [...el.querySelectorAll('polyline')].map(p => p.getAttribute('points'))
                               .join('|'),
                    series: [...el.querySelectorAll('polyline')].map(
                        p => p.getAttribute('data-series'))};
        };
        return {refreshes: window.tpnsRefreshes ?? null, marker: window.testMarker || null,
                calls: text('calls'), depth: text('queue-depth'), failures: text('failures'),
                states: text('states'), flow: chart('chart-flow'),
                failed_by: chart('chart-failures'), latency: chart('chart-latency'),
                requeue: text('requeue-result'), lookup: text('lookup-results'),
                live: text('live-failures'),
                signin: !!document.getElementById('signin')};
    })()"""))


def test_the_page_signs_in_and_follows_a_real_worker_without_a_reload(
        page: tuple[str, Producer, Browser], launcher: Launcher, sandbox: SandboxServer,
        redis_url: str, prefix: str) -> None:
    base, producer, browser = page
    browser.navigate(base + "/")
    wait_until(lambda: figures(browser)["signin"], 30, message="the sign-in form")
    assert TOKEN not in browser.evaluate("document.documentElement.outerHTML")
    browser.evaluate(f"document.getElementById('signin-token').value = {json.dumps(TOKEN)};"
                     "document.getElementById('signin').submit(); true")
    wait_until(lambda: (figures(browser)["refreshes"] or 0) >= 1, 30,
               message=lambda: "the signed-in page refreshed once: " + str(browser.evaluate(
                   "document.location.href + ' ' + document.body.innerText.slice(0, 300)")))
    assert browser.evaluate("document.cookie") == ""  # HttpOnly: the page's script cannot read it
    browser.evaluate("window.testMarker = 'same document'; true")  # gone if the page reloads
    before = figures(browser)
    assert before["calls"] == "0" and before["flow"]["sum"] == 0

    worker = launcher.start(redis_url, prefix, sandbox)
    worker.wait_ready()
    intents: list[dict[str, Any]] = [
        {"operator_type": 2, "token": f"tok-{k}", "account_list": [{"account": f"u{k}"}]}
        for k in range(40)]
    intents += [{"operator_type": 4, "token": f"{INVALID}{k}"} for k in range(3)]
    ids = [i for i in producer.submit_many(intents) if i is not None]
    statuses = producer.wait(ids, timeout_s=60)
    failed = [s.id for s in statuses if s is not None and s.state == "failed"]
    assert len(failed) == 3

    def caught_up() -> dict[str, Any] | None:
        now = figures(browser)
        done = (now["calls"] not in ("0", None) and now["flow"]["sum"] > 0
                and now["failed_by"]["lines"]
                and all(i in (now["failures"] or "") and i in (now["live"] or "") for i in failed))
        return now if done else None

    after = wait_until(caught_up, 30, message=lambda: f"the page to show the run: {figures(browser)}")
    assert after["marker"] == "same document" and after["refreshes"] > before["refreshes"]
    assert after["flow"]["lines"] != before["flow"]["lines"]
    assert after["failed_by"]["series"] == ["invalid_token"]
    assert after["latency"]["lines"], "a call latency line once calls were made"
    assert "invalid_token" in after["failures"]
    assert after["live"].count("invalid_token") == 3  # pushed by /v1/events, the cookie's stream

    # the requeue button: a POST from the page with its CSRF token
    browser.evaluate("document.getElementById('requeue').click(); true")
    wait_until(lambda: (figures(browser)["requeue"] or "").startswith("requeued "), 30,
               message="the requeue answer")
    assert figures(browser)["requeue"] == "requeued 3"
    # the lookup box, by token
    browser.evaluate("document.getElementById('lookup-input').value = 'tok-7';"
                     "document.getElementById('lookup-form').requestSubmit(); true")
    wait_until(lambda: ids[7] in (figures(browser)["lookup"] or ""), 30,
               message="the lookup's answer")
    # and by account (with its type)
    browser.evaluate("document.getElementById('lookup-input').value = 'u5';"
                     "document.getElementById('lookup-type').value = '0';"
                     "document.getElementById('lookup-form').requestSubmit(); true")
    wait_until(lambda: ids[5] in (figures(browser)["lookup"] or ""), 30,
               message="the account lookup's answer")
    assert figures(browser)["marker"] == "same document"

    shot = os.environ.get("TPNS_SCREENSHOT")
    if shot:
        browser.evaluate("window.scrollTo(0, 0); true")
        browser.screenshot(Path(shot))
