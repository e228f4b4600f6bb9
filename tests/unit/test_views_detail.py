"""The detail block's pictures: sizes, aspect ratio, colour scales, download names."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.views.detail import (
    LAYER_NAMES,
    detail_pictures,
    display_size,
    download_name,
    fit_mask,
    layer_context,
    npy_bytes,
    score_note,
    to_size,
)
from app.views.images import ScaleContext


def test_layer_context_is_a_third_of_the_fused_scale():
    context = layer_context(ScaleContext(0.9, None, 0.3))
    assert (context.category_max, context.normal_p99, context.threshold) == pytest.approx(
        (0.3, None, 0.1))
    assert layer_context(ScaleContext(0.9, 0.6, 0.3)).normal_p99 == pytest.approx(0.2)
    assert len(LAYER_NAMES) == 3


def test_display_size_keeps_the_aspect_ratio_and_never_enlarges():
    assert display_size(4000, 3000, longest=640) == (640, 480)
    assert display_size(300, 1200, longest=640) == (160, 640)
    assert display_size(80, 60) == (80, 60)
    with pytest.raises(ValueError):
        display_size(0, 10)


def test_pictures_come_at_the_image_aspect_ratio():
    image = Image.new("RGB", (120, 60), (90, 90, 90))
    layers = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    fused = layers.sum(axis=0)
    mask = np.zeros((32, 32), bool)
    mask[4:10, 4:10] = True
    pictures = detail_pictures(image, layers, fused, mask, ScaleContext(3.0, 1.0, 1.5),
                               "absolute")
    for picture in (pictures.base, pictures.overlay, pictures.heat, *pictures.layers):
        assert picture.shape == (60, 120, 3)
    assert pictures.mask.shape == (60, 120) and pictures.mask.dtype == bool
    square = detail_pictures(image, layers, fused, None, ScaleContext(3.0, 1.0, 1.5),
                             "absolute", size=(32, 32))
    assert square.overlay.shape == (32, 32, 3) and square.mask is None
    assert (pictures.vmin, pictures.vmax) == (0.0, 3.0)


def test_maps_resized_back_to_the_image_size():
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    wide = to_size(values, (8, 2))
    assert wide.shape == (2, 8) and wide.dtype == np.float32
    assert (to_size(values, (4, 4)) == values).all()  # already at size: unchanged
    assert fit_mask(np.eye(4, dtype=bool), (8, 8)).sum() == 4 * 4
    loaded = np.load(io.BytesIO(npy_bytes(wide)))
    assert loaded.dtype == np.float32 and loaded.shape == (2, 8)


def test_download_names_carry_category_defect_and_image():
    assert download_name("wood", "crack", "003.png", "overlay", "png") == \
        "wood_crack_003_overlay.png"
    assert download_name("fabric", "upload", "part", "layers", "npy") == \
        "fabric_upload_part_layers.npy"


def test_the_score_note_says_when_the_heat_map_adds_position_statistics() -> None:
    """A model trained with --position-stats shows more on its heat map than its score
    counts: the note says so, and says nothing of it for the paper's models."""
    paper = score_note({})
    position = score_note({"position_stats": {"weight": 1.0}})
    assert "position statistics" not in paper
    assert "position statistics" in position and "score leaves out" in position
    scored = score_note({"position_stats": {"weight": 1.0, "score": True,
                                            "score_weight": 0.3}})
    assert "larger of the paper's score" in scored and "leaves out" not in scored
    left_out = score_note({"position_auto": {"kept": False, "why": "position statistics left "
                                             "out: the normal training images' left-out "
                                             "maxima spread by 0.62"}})
    assert left_out.startswith("Score = maximum of the smoothed fused map (position statistics "
                               "left out: ")


def test_the_score_note_names_aligned_statistics_and_the_turn_average() -> None:
    paper = score_note({})
    both = score_note({"aligned_stats": {"weight": 2.5}, "turn_average": {"mode": "auto"}})
    assert "aligned statistics" not in paper and "quarter turns" not in paper
    assert both.startswith(paper)
    assert "aligned statistics" in both and "averaged over the image's four quarter turns" in both
    left_out = score_note({"turn_average_auto": {"kept": False}})
    assert left_out == paper
