"""End to end in a real browser: `streamlit run` on localhost, driven by Playwright + Chromium."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.browser import CHROMIUM, VIEWPORT, go_to, launch, serve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed "
                       "(.ci/run installs it)"),
]


@pytest.fixture
def server(tmp_path: Path):
    with serve(tmp_path / "home", tmp_path / "streamlit.log") as url:
        yield url


def _not_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return pixels.std() > 3


def test_inspect_and_evaluate_in_a_browser(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=VIEWPORT)
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

        go_to(page, "Evaluate")
        roc = page.locator(".js-plotly-plot", has_text="false-positive rate").first
        roc.wait_for()
        roc.scroll_into_view_if_needed()
        assert roc.locator(".scatterlayer .trace").count() >= 2  # a curve and the chance line
        page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
        browser.close()
    assert (shots / "inspect.png").stat().st_size > 10_000
    assert (shots / "evaluate.png").stat().st_size > 10_000
