"""Evaluate: ROC curves per class (every category with a model on one figure, each defect
type) with AUROC in the legend, and the small-class warning."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _evaluate(source: str, rerun_until) -> AppTest:
    """The Evaluate page once every category's report is in (scored in the background)."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["source"] = source
    at.run()
    at.switch_page("screens/evaluate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return rerun_until(at, lambda at: at.metric and not any(
        "Still being scored" in c.value for c in at.caption))


def _legends(at: AppTest) -> list[list[str]]:
    """The legend entries of every figure on the page."""
    legends = []
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        legends.append([t["name"] for t in spec["data"] if t.get("showlegend", True)
                        and t.get("name") and t["name"] != "chance"])
    return legends


def test_per_defect_legend_carries_auroc_and_small_classes_are_flagged(studio, rerun_until):
    at = _evaluate(studio.dataset, rerun_until)
    (names,) = [n for n in _legends(at) if any(x.startswith("hole") for x in n)]
    assert sorted(n.split(" · ")[0] for n in names) == ["hole", "scratch"]
    assert all(" · AUROC " in n for n in names)
    warnings = " ".join(w.value for w in at.warning)
    assert "Fewer than 5 images in: normal (4)" in warnings and "hole (3)" in warnings
    assert any("Only widget of" in c.value for c in at.caption)  # one category, no figure


def test_every_category_with_a_model_on_one_figure(two_categories, rerun_until):
    at = _evaluate("twoparts", rerun_until)
    (names,) = [n for n in _legends(at) if any(x.startswith("gadget") for x in n)]
    assert sorted(n.split(" (")[0] for n in names) == ["gadget", "widget"]
    assert all(" · AUROC " in n for n in names)
    table = next(d.value for d in at.dataframe if "category" in d.value.columns)
    assert sorted(table["category"]) == ["gadget", "widget"]


def test_stored_results_of_other_categories_load_no_model(two_categories, rerun_until,
                                                          monkeypatch):
    """Once every category is scored, opening Evaluate (a restarted server: no model in memory)
    loads only the model on screen: the other categories' curves come from the results store
    (before, each of their models was loaded and exported while the user moved the slider)."""
    import streamlit as st

    from app import state

    _evaluate("twoparts", rerun_until)
    st.cache_resource.clear()
    loaded: list[str] = []
    real = state.load_model
    monkeypatch.setattr(state, "load_model",
                        lambda path, *rest: loaded.append(Path(path).name) or real(path, *rest))
    at = _evaluate("twoparts", rerun_until)
    (names,) = [n for n in _legends(at) if any(x.startswith("widget") for x in n)]
    assert sorted(n.split(" (")[0] for n in names) == ["gadget", "widget"]
    assert loaded and set(loaded) == {"two_gadget.safetensors"}
