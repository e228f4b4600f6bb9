"""A fresh data home: the first page waits for one built-in category, not all of them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RD_HOME", str(home))
    return home


def _generated(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "builtin").iterdir() if not p.name.startswith("."))


def test_first_page_generates_one_category_and_lists_them_all(fresh_home, monkeypatch):
    from app import state

    monkeypatch.setattr(state, "QUIET_S", 3600.0)  # the background completion waits here
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    assert _generated(fresh_home) == ["fabric"]
    assert at.sidebar.selectbox(key="category").options == ["fabric", "hex_nut", "wood"]
    at.sidebar.selectbox(key="category").set_value("wood").run()
    assert not at.exception, [e.value for e in at.exception]
    assert _generated(fresh_home) == ["fabric", "wood"]
    assert any(b.label == "Open image" for b in at.button)  # wood's grid is drawn


def test_the_other_categories_follow_at_the_first_quiet_moment(fresh_home, monkeypatch):
    from app import state

    monkeypatch.setattr(state, "QUIET_S", 0.2)
    AppTest.from_file(APP, default_timeout=180).run()
    deadline = time.monotonic() + 120
    while _generated(fresh_home) != ["fabric", "hex_nut", "wood"]:
        assert time.monotonic() < deadline, _generated(fresh_home)
        time.sleep(0.5)
