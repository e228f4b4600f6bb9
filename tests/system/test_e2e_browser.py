"""End to end in a real browser: `streamlit run` on localhost, driven by Playwright + Chromium."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.browser import CHROMIUM, VIEWPORT, go_to, launch, serve, settle

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

        # The → key opens the next image of the grid (the Next button's shortcut).
        title = page.get_by_role("heading", level=3).first.inner_text()
        settle(page)
        page.locator("body").press("ArrowRight")
        page.wait_for_function(
            "title => document.querySelector('h3') && document.querySelector('h3').innerText"
            ".trim() !== title", arg=title.strip())
        settle(page)

        go_to(page, "Evaluate")
        roc = page.locator(".js-plotly-plot", has_text="false-positive rate").first
        roc.wait_for()
        roc.scroll_into_view_if_needed()
        assert roc.locator(".scatterlayer .trace").count() >= 2  # a curve and the chance line
        page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
        browser.close()
    assert (shots / "inspect.png").stat().st_size > 10_000
    assert (shots / "evaluate.png").stat().st_size > 10_000


def test_paint_a_defect_by_drawing_on_the_image(server):
    """Learn: a lasso dragged over the image in Chromium edits it and scores the edit."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(180_000)
        page.goto(server)
        page.get_by_role("heading", name="Inspect").wait_for()
        go_to(page, "Learn")
        canvas = page.locator(".js-plotly-plot").first
        canvas.scroll_into_view_if_needed()
        settle(page)
        box = canvas.locator(".nsewdrag").first.bounding_box()
        left, top = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
        page.mouse.move(left, top)
        page.mouse.down()
        for dx, dy in ((0.3, 0.0), (0.3, 0.25), (0.0, 0.25), (0.0, 0.0)):
            page.mouse.move(left + dx * box["width"], top + dy * box["height"], steps=5)
        page.mouse.up()
        after = page.locator('[data-testid="stMetric"]', has_text="Score after")
        after.wait_for()
        settle(page)
        edited = page.locator('[data-testid="stImage"]', has_text="pixels changed")
        assert int(edited.inner_text().split("edited: ")[1].split()[0]) > 0
        browser.close()
