"""Offline and private: every request the studio's pages make in a real browser goes to the
server itself (no font CDN, no analytics, no tile server); anything else is blocked and fails
the test."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from benchmarks.browser import CHROMIUM, VIEWPORT, go_to, launch, serve, settle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed "
                       "(.ci/run installs it)"),
]
LOCAL_SCHEMES = {"data", "blob", "about"}
# Every URL the page has loaded or points the browser at: resources (Resource Timing) and the
# favicon links, which Chromium fetches without reporting them to Playwright.
REFERENCED = """() => [
  ...performance.getEntriesByType('resource').map(entry => entry.name),
  ...[...document.querySelectorAll('link[rel~="icon"], link[rel="stylesheet"], script[src], img')]
     .map(node => node.href || node.src).filter(Boolean),
]"""


def _foreign(urls: list[str], host: str) -> list[str]:
    return sorted({url for url in urls
                   if urlsplit(url).scheme not in LOCAL_SCHEMES and urlsplit(url).netloc != host})


def test_no_request_leaves_the_machine(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    requested: list[str] = []
    with serve(tmp_path / "home", tmp_path / "streamlit.log") as url, \
            playwright.sync_playwright() as p:
        host = urlsplit(url).netloc
        browser = launch(p)
        context = browser.new_context(viewport=VIEWPORT)
        context.on("request", lambda request: requested.append(request.url))
        context.route("**/*", lambda route: route.abort() if urlsplit(route.request.url).netloc
                      not in (host, "") else route.continue_())
        page = context.new_page()
        page.set_default_timeout(300_000)  # a fresh home generates the built-in data
        page.goto(url)
        page.get_by_role("button", name="Open image", exact=True).first.click()
        page.locator('[data-testid="stImage"]', has_text="fused heat map").wait_for()
        settle(page)
        referenced = page.evaluate(REFERENCED)
        for name in ("Evaluate", "Review", "Learn", "Train"):
            go_to(page, name)
            settle(page)
            referenced += page.evaluate(REFERENCED)
        browser.close()
    assert any(urlsplit(u).netloc == host for u in requested), "no request was recorded"
    assert _foreign(requested + referenced, host) == []
