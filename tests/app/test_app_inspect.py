import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _app(studio) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["source"] = studio.dataset
    return at.run()


def test_default_load_has_no_exception(studio):
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception
    assert at.title[0].value == "Inspect"
    assert at.sidebar.selectbox(key="source").value == "builtin"


def test_choose_category_and_open_an_image_shows_layer_and_fused_maps(studio):
    at = _app(studio)
    assert not at.exception
    assert at.sidebar.selectbox(key="category").value == studio.category
    opens = [b for b in at.button if b.key and b.key.startswith("open::")]
    assert opens, "the test-image grid shows an Open button per image"
    at = next(b for b in opens if "/hole/" in b.key).click().run()
    assert not at.exception
    captions = [c for image in at.get("image") for c in image.captions]
    for expected in ("layer 1 · stride 4", "layer 2 · stride 8", "layer 3 · stride 16",
                     "fused heat map", "overlay", "ground truth"):
        assert expected in captions
    score = float(at.metric[0].value)
    assert np.isfinite(score)
    at.radio(key="colour_mode").set_value("per-image").run()
    assert not at.exception
    assert "min–max" in " ".join(c.value for c in at.caption)


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("content, ok", [(_png((120, 90, 60)), True),
                                         (_png((1, 2, 3))[:40], False),
                                         (b"not an image at all", False)])
def test_upload_good_and_corrupt_files(studio, content, ok):
    at = _app(studio)
    at.segmented_control(key="inspect_source").set_value("Upload").run()
    at.file_uploader(key="inspect_uploads::0").upload("part.png", content, "image/png").run()
    assert not at.exception
    if ok:
        assert not at.error
        assert at.metric[0].label == "Score"
    else:
        assert "Cannot read this upload" in at.error[0].value
        assert not at.metric


def _detail_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if "shown at" in c.value)


def test_upload_is_shown_at_its_own_aspect_ratio_and_persists_across_modes(studio):
    at = _app(studio)
    at.segmented_control(key="inspect_source").set_value("Upload").run()
    uploader = at.file_uploader(key="inspect_uploads::0")
    at = uploader.upload("first.png", _png((120, 90, 60)), "image/png").run()
    assert "80×60 image, shown at 80×60" in _detail_caption(at)
    at.file_uploader(key="inspect_uploads::0").upload("second.png", _png((30, 90, 160)),
                                                      "image/png").run()
    assert at.subheader[0].value == "second.png", "the newest upload is selected"
    at.toggle(key="inspect_model_size").set_value(True).run()
    assert "shown at 64×64" in _detail_caption(at)
    at.segmented_control(key="inspect_source").set_value("Test images").run()
    at.segmented_control(key="inspect_source").set_value("Upload").run()
    assert not at.exception
    assert at.radio(key="inspect_upload_radio").options == ["first.png", "second.png"]
    assert at.subheader[0].value == "second.png"
    labels = [b.label for b in at.get("download_button")]
    assert labels[:2] == ["Overlay (PNG)", "Heat map (PNG)"]
    at.button(key="inspect_forget").click().run()
    assert not at.exception and not at.metric


def test_next_and_previous_walk_the_grid_and_keep_it(studio):
    at = _app(studio)
    opens = [b.key for b in at.button if b.key and b.key.startswith("open::")]
    at.button(key=opens[0]).click().run()
    first = at.subheader[0].value
    at.button(key="inspect_next").click().run()
    assert not at.exception
    second = at.subheader[0].value
    assert second != first
    assert second == "/".join(Path(opens[1].removeprefix("open::")).parts[-2:])
    at.button(key="inspect_previous").click().run()
    assert at.subheader[0].value == first
    at.button(key="inspect_previous").click().run()  # wraps to the last image of the grid
    assert at.subheader[0].value == "/".join(Path(opens[-1].removeprefix("open::")).parts[-2:])
    assert [b.key for b in at.button if b.key and b.key.startswith("open::")] == opens


def test_the_neighbours_maps_are_ready_before_next_is_pressed(studio, monkeypatch):
    """Opening an image computes its grid neighbours' maps in the background; Next then shows
    maps already in memory (no model call in its run)."""
    from app import state

    at = _app(studio)
    opens = [b.key for b in at.button if b.key and b.key.startswith("open::")]
    at.button(key=opens[1]).click().run()
    neighbours = [key.removeprefix("open::") for key in (opens[2], opens[0])]
    deadline = time.monotonic() + 30
    while any(path in state._PREFETCHING for path in neighbours) or not all(
            _in_memory(state, path) for path in neighbours):
        assert time.monotonic() < deadline, "the neighbours were not prefetched"
        time.sleep(0.05)
    calls = []
    predict = state.predict

    def counted(*args):
        calls.append(threading.current_thread().name)
        return predict(*args)

    monkeypatch.setattr(state, "predict", counted)
    at.button(key="inspect_next").click().run()
    assert at.subheader[0].value == "/".join(Path(neighbours[0]).parts[-2:])
    assert all(name == "rd-prefetch" for name in calls)  # only the next neighbours


def test_the_checkpoint_is_hashed_once_not_at_every_click(studio, monkeypatch):
    """Verifying the model file (its SHA-256) is remembered per file version: next and
    previous do not hash the checkpoint again."""
    from rd.manifest import ModelEntry

    hashed = []
    verify = ModelEntry.verify
    monkeypatch.setattr(ModelEntry, "verify", lambda self: hashed.append(1) or verify(self))
    at = _app(studio)
    opens = [b.key for b in at.button if b.key and b.key.startswith("open::")]
    at.button(key=opens[0]).click().run()
    for _ in range(3):
        at.button(key="inspect_next").click().run()
    assert not at.exception
    assert len(hashed) <= 1


def _in_memory(state, path: str) -> bool:
    from rd.results import image_digest

    cache, lock = state._maps_cache()
    with lock:
        return any(key[2] == image_digest(path) for key in cache)


def test_maps_reach_the_browser_as_png(studio):
    """The detail's pictures are PNG files: Streamlit, left to choose, re-encoded them as
    JPEG (smeared heat-map colours, and time spent on every image)."""
    at = _app(studio)
    opens = [b.key for b in at.button if b.key and b.key.startswith("open::")]
    at.button(key=opens[0]).click().run()
    urls = {image.caption: image.url for element in at.get("image")
            for image in element.proto.imgs}
    for caption in ("input", "overlay", "layer 1 · stride 4", "fused heat map"):
        assert urls[caption].endswith(".png"), (caption, urls[caption])


def _scored(at: AppTest) -> bool:
    return any(c.endswith(("⚠", "✓")) for image in at.get("image") for c in image.captions)


def test_verdict_uses_the_stored_score_of_the_test_image(studio, rerun_until):
    at = rerun_until(_app(studio), _scored)
    at.button(key=next(b.key for b in at.button if b.key and "/hole/" in b.key)).click().run()
    score = float(at.metric[0].value)
    grid_scores = [c for image in at.get("image") for c in image.captions
                   if c.startswith(at.subheader[0].value + " · ")]
    assert grid_scores and f"{score:.3f}" in grid_scores[0]


def test_defect_filter_is_kept_per_category(two_categories):
    """Bug 1 of issue 10: switching category kept only the defect types both share."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["source"] = "twoparts"
    at.session_state["category"] = "widget"
    at.run()
    filters = [m for m in at.multiselect if m.label == "Defect types"]
    assert filters[0].value == ["good", "hole", "scratch"]
    at.sidebar.selectbox(key="category").set_value("gadget").run()
    assert not at.exception
    (defects,) = [m for m in at.multiselect if m.label == "Defect types"]
    assert defects.value == ["crack", "good", "hole"]
    opens = [b.key for b in at.button if b.key and b.key.startswith("open::")]
    assert any("/crack/" in key for key in opens)
    defects.set_value(["crack"]).run()
    at.sidebar.selectbox(key="category").set_value("widget").run()
    assert next(m for m in at.multiselect if m.label == "Defect types").value == [
        "good", "hole", "scratch"]


def test_images_of_a_category_without_a_model_can_be_browsed(two_categories):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["source"] = "twoparts"
    at.session_state["category"] = "spare"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("train one" in i.value for i in at.info)
    assert any(b.label == "Train a model for this data" for b in at.button)
    opens = [b.key for b in at.button if b.key and b.key.startswith("open::")]
    at.button(key=next(k for k in opens if "/hole/" in k)).click().run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [c for image in at.get("image") for c in image.captions]
    assert "ground truth" in captions and any(c.startswith("input (64×64") for c in captions)
    assert not at.metric  # no model: no score, no verdict


def test_stored_scores_show_the_grid_before_the_model_is_loaded(studio, rerun_until,
                                                               monkeypatch):
    """The first paint does not wait for the model (torch, seconds on a fresh server): with
    the scores stored, the grid and its verdicts are drawn before the model is loaded, so even a
    model that fails to load leaves them on screen (the page stopped before the grid)."""
    from app import state
    from rd.errors import RDError

    at = rerun_until(_app(studio), _scored)

    def cannot_load(*args, **kwargs):
        raise RDError("cannot load (test)")

    monkeypatch.setattr(state, "load_model", cannot_load)
    at.run()
    assert not at.error  # the grid neither waits for the model nor stops at its failure
    assert _scored(at)
    opens = [b for b in at.button if b.key and b.key.startswith("open::")]
    opens[0].click().run()
    assert "cannot load (test)" in at.error[0].value  # said where the model is needed


def test_the_model_loads_in_the_background_once_the_page_is_quiet(studio, rerun_until,
                                                                  monkeypatch):
    """After the grid, the model is loaded by a background thread (not in the page's run,
    where importing torch delayed the thumbnails), so the first image opens without waiting."""
    import threading

    from app import state

    at = rerun_until(_app(studio), _scored)
    loaded = threading.Event()
    calls: list[tuple] = []

    def record(*args):
        calls.append(threading.current_thread().name)
        loaded.set()

    monkeypatch.setattr(state, "load_model", record)
    monkeypatch.setattr(state, "PRELOAD_QUIET_S", 0.1)
    state._PRELOADS.clear()
    at.run()
    assert loaded.wait(10)
    assert calls == ["rd-preload-model"]
    at.run()  # once per model and device
    time.sleep(0.5)
    assert calls == ["rd-preload-model"]


def test_browsing_a_restarted_app_imports_no_torch_in_the_page_run(tmp_path):
    """The first page of a restarted server sends its thumbnails while the browser fetches them
    from this server: importing torch in that run (the start-up scheduler step of rd.jobs did)
    held the interpreter for seconds. A fresh interpreter, data without a model; the background
    work that needs torch waits for a quiet moment, made long here."""
    import json
    import subprocess
    import sys

    from tests.conftest import make_fake_mvtec

    make_fake_mvtec(tmp_path / "parts", "widget")
    home = tmp_path / "home"
    home.mkdir()
    (home / "app_settings.json").write_text(json.dumps(
        {"mvtec_roots": {"parts": str(tmp_path / "parts")}}))
    root = str(Path(APP).parents[1])
    code = (f"import sys\nsys.path.insert(0, {root!r})\nimport app.state\n"
            "app.state.PRELOAD_QUIET_S = app.state.QUIET_S = 600\n"
            "from streamlit.testing.v1 import AppTest\n"
            f"at = AppTest.from_file({APP!r}, default_timeout=180)\n"
            "at.session_state['source'] = 'parts'\nat.run()\n"
            "assert not at.exception, [e.value for e in at.exception]\n"
            "opens = [b for b in at.button if b.key and b.key.startswith('open::')]\n"
            "print(len(opens), 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RD_HOME": str(home)}, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    shown, torch_imported = done.stdout.split()[-2:]
    assert int(shown) > 0 and torch_imported == "False"
