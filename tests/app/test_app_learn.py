"""The Learn page in the real app: a tiny registered model on generated data, driven by AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app" / "main.py"
SOURCE = "fakeparts"  # tests/conftest.py studio_home: source name = manifest dataset
CATEGORY = "widget"


@pytest.fixture
def rd_home(studio):
    """The shared studio data folder (tests/conftest.py) as the user's RD_HOME."""
    return studio.home


def _learn_page(rd_home: Path) -> AppTest:
    del rd_home  # the fixture only has to be active
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["source"] = SOURCE
    at.session_state["device"] = "cpu"
    at.run()
    at.switch_page("screens/learn.py").run()
    assert not at.exception, at.exception
    return at


def _metric(at: AppTest, label: str) -> float:
    return float(next(m for m in at.metric if m.label == label).value)


def _apply(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Apply").click().run()
    assert not at.exception, at.exception


def test_learn_page_explains_the_model(rd_home):
    at = _learn_page(rd_home)
    assert at.title[0].value == "Learn"
    assert not at.error
    assert at.selectbox(key="learn_image").value.defect == "good"
    diagram = at.get("graphviz_chart")[0].proto.spec
    assert "one-class embedding" in diagram and "OCBE bottleneck" in diagram
    assert any("PCA" in c.value for c in at.caption)
    assert [m.label for m in at.metric] == ["Score before"]


def test_painting_a_stroke_changes_the_score(rd_home):
    at = _learn_page(rd_home)
    before = _metric(at, "Score before")
    at.slider(key="learn_width").set_value(8)
    at.color_picker(key="learn_colour").set_value("#000000")
    _apply(at)
    after = _metric(at, "Score after")
    assert after != pytest.approx(before, abs=1e-6)
    assert _metric(at, "Score before") == before
    delta = next(m for m in at.metric if m.label == "Score after").delta
    assert float(delta) == pytest.approx(after - before, abs=2e-4)


def test_pasting_a_defect_patch(rd_home):
    at = _learn_page(rd_home)
    at.radio(key="learn_kind").set_value("Paste a patch of a real defect").run()
    assert at.selectbox(key="learn_source").value.label == 1
    _apply(at)
    assert not at.error
    assert _metric(at, "Score after") != pytest.approx(_metric(at, "Score before"), abs=1e-6)
