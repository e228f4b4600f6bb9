import io
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
    at.file_uploader(key="inspect_uploads").upload("part.png", content, "image/png").run()
    assert not at.exception
    if ok:
        assert not at.error
        assert at.metric[0].label == "Score"
    else:
        assert "Cannot read this upload" in at.error[0].value
        assert not at.metric
