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


def _draw(at: AppTest, **selection) -> None:
    """What the canvas callback stores when the user draws on the image (AppTest cannot drag
    on a Plotly chart; tests/system/test_e2e_browser.py does, in Chromium)."""
    image = at.selectbox(key="learn_image").value
    at.session_state["learn_region"] = {
        "image": str(image.path), "size": 64,
        "selection": {"points": [], "box": [], "lasso": [], **selection}}
    at.run()
    assert not at.exception, at.exception


def test_learn_page_explains_the_model(rd_home):
    at = _learn_page(rd_home)
    assert at.title[0].value == "Learn"
    assert not at.error
    assert at.selectbox(key="learn_image").value.defect == "good"
    diagram = at.get("graphviz_chart")[0].proto.spec
    assert "one-class embedding" in diagram and "OCBE bottleneck" in diagram
    assert any("PCA" in c.value for c in at.caption)
    assert any("Why layer 1 is speckled" in c.value for c in at.caption)
    assert [m.label for m in at.metric] == ["Score before"]
    assert at.get("plotly_chart"), "the image to draw on"


def test_walk_through_accepts_a_defective_image(rd_home):
    at = _learn_page(rd_home)
    box = at.selectbox(key="learn_image")
    index = next(i for i, label in enumerate(box.options) if label.startswith("test/hole"))
    box.select_index(index).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="learn_image").value.label == 1
    captions = [c for image in at.get("image") for c in image.captions]
    assert any("ground truth in green" in c for c in captions)
    assert any("On a defect the teacher" in c.value for c in at.caption)


def test_painting_a_drawn_region_changes_the_score(rd_home):
    at = _learn_page(rd_home)
    before = _metric(at, "Score before")
    at.color_picker(key="learn_colour").set_value("#000000")
    _draw(at, lasso=[{"x": [10, 40, 40, 10], "y": [20, 20, 28, 28]}])
    after = _metric(at, "Score after")
    assert after != pytest.approx(before, abs=1e-6)
    assert _metric(at, "Score before") == before
    delta = next(m for m in at.metric if m.label == "Score after").delta
    assert float(delta) == pytest.approx(after - before, abs=2e-4)
    captions = [c for image in at.get("image") for c in image.captions]
    assert any(c.startswith("edited: ") and "pixels changed" in c for c in captions)


def test_a_click_paints_a_spot_of_the_brush_width(rd_home):
    at = _learn_page(rd_home)
    at.slider(key="learn_width").set_value(5)
    _draw(at, points=[{"x": 30, "y": 30}])
    captions = [c for image in at.get("image") for c in image.captions]
    changed = int(next(c for c in captions if c.startswith("edited: ")).split()[1])
    assert 5 <= changed <= 25  # a disc of diameter 5


def test_pasting_a_defect_patch_where_the_region_is_drawn(rd_home):
    at = _learn_page(rd_home)
    at.radio(key="learn_kind").set_value("Paste a patch of a real defect").run()
    assert at.selectbox(key="learn_source").value.label == 1
    _draw(at, box=[{"x": [20, 30], "y": [20, 30]}])
    assert not at.error
    assert _metric(at, "Score after") != pytest.approx(_metric(at, "Score before"), abs=1e-6)
