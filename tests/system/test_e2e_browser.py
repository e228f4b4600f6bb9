"""End to end in a real browser: `streamlit run` on localhost, driven by Playwright + Chromium."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed "
                       "(.ci/run installs it)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "RD_HOME": str(tmp_path / "home")}
    log = (tmp_path / "streamlit.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _not_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return pixels.std() > 3


def test_inspect_and_evaluate_in_a_browser(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        page.set_default_timeout(180_000)
        page.goto(server)
        page.get_by_role("heading", name="Inspect").wait_for()
        page.get_by_role("button", name="Open image", exact=True).first.click()
        fused = page.locator('[data-testid="stImage"]', has_text="fused heat map")
        fused.wait_for()
        for caption in ("layer 1 · stride 4", "layer 2 · stride 8", "layer 3 · stride 16",
                        "fused heat map"):
            element = page.locator('[data-testid="stImage"]', has_text=caption).first
            element.scroll_into_view_if_needed()
            image = element.locator("img")
            image.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=image.element_handle())
            assert _not_blank(image.screenshot()), f"{caption} is blank"
        page.screenshot(path=str(shots / "inspect.png"), full_page=True)

        page.get_by_role("link", name="Evaluate").click()
        page.get_by_role("heading", name="Evaluate").wait_for()
        roc = page.locator(".js-plotly-plot", has_text="false-positive rate").first
        roc.wait_for()
        roc.scroll_into_view_if_needed()
        assert roc.locator(".scatterlayer .trace").count() >= 2  # a curve and the chance line
        page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
        browser.close()
    assert (shots / "inspect.png").stat().st_size > 10_000
    assert (shots / "evaluate.png").stat().st_size > 10_000
