"""Issue 13 item 7 with a real server: started from another folder (no config file read, so
Streamlit listens on every interface), the studio shows only how to start it safely."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.browser import CHROMIUM, launch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_started_from_another_folder_the_studio_refuses_without_a_password(tmp_path):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "RD_HOME": str(tmp_path / "home")}
    env.pop("RD_STUDIO_PASSWORD", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
         "--server.headless", "true", "--server.port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_selector("text=all network interfaces", timeout=60_000)
            assert "RD_STUDIO_PASSWORD" in page.content()
            assert page.locator("[data-testid=stSidebar]").count() == 0
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
