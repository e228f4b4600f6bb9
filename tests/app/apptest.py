"""What the app tests share: open a page as a user would, and wait for the background
evaluations a page started (the pages never wait for them; tests do)."""

from __future__ import annotations

import threading
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app" / "main.py"


def open_page(source: str, page: str | None = None, category: str | None = None,
              timeout_s: float = 120) -> AppTest:
    """The app on data source ``source`` (and ``category``), switched to ``page``."""
    at = AppTest.from_file(str(APP), default_timeout=timeout_s)
    at.session_state["source"] = source
    if category is not None:
        at.session_state["category"] = category
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def settled(at: AppTest) -> AppTest:
    """Wait for the background evaluations (app/state.py's ``evaluate-`` threads), redraw."""
    for _ in range(5):
        running = [t for t in threading.enumerate() if t.name.startswith("evaluate-")]
        for thread in running:
            thread.join(120)
        at.run()
        if not running:
            break
    assert not at.exception, [e.value for e in at.exception]
    return at
