"""The Learn page's pure parts: feature PCA colours, the explicit teacher→student walk, edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.views.learn import (
    enlarge,
    feature_walk,
    hex_colour,
    mask_box,
    outline,
    paint_stroke,
    paste_patch,
    pca_rgb,
)
from rd.backbones import get_backbone
from rd.data import Preprocess
from rd.detector import Detector
from rd.model import build_model


def _features(seed: int = 0, channels: int = 16, size: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(channels, size, size)) + 3.0  # an offset: vectors are not centred


# ------------------------------------------------------------------------------------ PCA


def test_pca_rgb_shapes_and_range():
    rgb, basis = pca_rgb(_features())
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8
    assert basis.components.shape == (3, 16) and basis.mean.shape == (16,)
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(3), atol=1e-9)
    assert rgb.min() == 0 and rgb.max() == 255  # percentile scaling spans the whole range


def test_shared_basis_colours_student_like_teacher():
    teacher = _features()
    rgb, basis = pca_rgb(teacher)
    again, same = pca_rgb(teacher, basis)
    np.testing.assert_array_equal(again, rgb)
    assert same is basis
    # A student that rebuilt the directions but not the lengths looks the same (cosine view).
    shorter, _ = pca_rgb(teacher * 0.125, basis)
    np.testing.assert_array_equal(shorter, rgb)
    # Its own fit would colour it differently; the shared one shows where it departs.
    other = _features(seed=1)
    assert not np.array_equal(pca_rgb(other, basis)[0], pca_rgb(other)[0])


def test_sign_convention_is_deterministic():
    """The dominant direction (channel 0 rising along x) always maps to rising red."""
    rng = np.random.default_rng(0)
    features = rng.normal(scale=0.05, size=(8, 10, 10)) + 1.0
    features[0] += np.linspace(-4, 4, 10)[None, :]
    for flip in (1.0, -1.0):
        rgb, basis = pca_rgb(features * np.r_[flip, np.ones(7)][:, None, None])
        assert basis.components[0, np.abs(basis.components[0]).argmax()] > 0
        red = rgb[..., 0].astype(int).mean(axis=0)
        assert (np.sign(np.diff(red)) == flip).mean() > 0.8


def test_pca_handles_few_channels_and_refuses_mismatched_basis():
    rgb, basis = pca_rgb(_features(channels=2))
    assert rgb.shape == (12, 12, 3)
    assert not basis.components[2].any()  # rank 2: the blue component is empty
    with pytest.raises(ValueError, match="fitted on 2 channels"):
        pca_rgb(_features(channels=5), basis)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        pca_rgb(np.zeros((4, 4)))


def test_enlarge_keeps_cells_as_blocks():
    small = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    big = enlarge(small, 8)
    assert big.shape == (8, 8, 3)
    np.testing.assert_array_equal(big[:4, :4], np.broadcast_to(small[0, 0], (4, 4, 3)))


# ---------------------------------------------------------------------------- feature walk


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    spec = get_backbone("efficientnet_lite0")
    metadata = {"preprocess": Preprocess(64, spec.mean, spec.std).to_dict(), "fusion": "sum"}
    return Detector(build_model("efficientnet_lite0", pretrained=True), metadata, "cpu")


def test_feature_walk_maps_equal_inference(detector, tiny_mvtec):
    paths = sorted((tiny_mvtec.root / tiny_mvtec.category / "test" / "scratch").iterdir())[:2]
    batch = detector.to_batch(paths)
    steps = feature_walk(detector.model, batch)
    expected = detector.predict(batch).layer_maps
    assert steps["layer_maps"].shape == expected.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(steps["layer_maps"], expected, atol=1e-6)
    assert [t.shape[-1] for t in steps["teacher"]] == [16, 8, 4]  # strides 4, 8, 16
    assert [s.shape for s in steps["student"]] == [t.shape for t in steps["teacher"]]
    assert steps["embedding"].shape[0] == 2 and steps["embedding"].shape[-1] == 2  # stride 32


def test_feature_walk_maps_of_a_turn_average_model_equal_inference(detector):
    """A --turn-average model reports maps averaged over quarter turns: the page shows those."""
    batch = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    detector.model.turn_average = True
    try:
        steps = feature_walk(detector.model, batch)
        expected = detector.predict(batch).layer_maps
    finally:
        detector.model.turn_average = False
    np.testing.assert_allclose(steps["layer_maps"], expected, atol=1e-6)
    assert not np.allclose(steps["layer_maps"], feature_walk(detector.model, batch)["layer_maps"],
                           atol=1e-4)


def test_feature_walk_refuses_a_model_in_training_mode(detector):
    detector.model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            feature_walk(detector.model, torch.zeros(1, 3, 64, 64))
    finally:
        detector.model.eval()


# ----------------------------------------------------------------------------------- edits


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 200, size=(32, 40, 3), dtype=np.uint8)


def test_stroke_mask_is_exactly_the_changed_pixels():
    image = _image()
    image[10, 5] = (250, 0, 0)  # already the stroke's colour: painted over but not changed
    painted, mask = paint_stroke(image, (5, 10), (30, 10), 3, (250, 0, 0))
    np.testing.assert_array_equal(mask, np.any(painted != image, axis=-1))
    assert not mask[10, 5] and mask[10, 6] and mask[10, 30]
    np.testing.assert_array_equal(painted[~mask], image[~mask])
    assert (painted[mask] == (250, 0, 0)).all()
    assert set(np.flatnonzero(mask.any(axis=1))) == {9, 10, 11}  # width 3 around row 10
    assert image[10, 6].tolist() != [250, 0, 0]  # the input is left untouched


def test_stroke_of_zero_length_is_a_dot_and_width_must_be_positive():
    _, mask = paint_stroke(np.zeros((20, 20, 3), np.uint8), (10, 10), (10, 10), 5, (9, 9, 9))
    assert mask.sum() == 21 and mask[10, 10]  # a disc of radius 2.5
    with pytest.raises(ValueError, match="positive"):
        paint_stroke(np.zeros((4, 4, 3), np.uint8), (0, 0), (3, 3), 0, (1, 1, 1))


def test_paste_mask_is_exactly_the_changed_pixels_and_clips_at_the_border():
    target = _image()
    source = np.full((20, 20, 3), 255, np.uint8)
    source[5, 5] = target[2, 36]  # lands on an identical pixel: not a change
    pasted, mask = paste_patch(target, source, (3, 3, 13, 9), (34, 0))
    np.testing.assert_array_equal(mask, np.any(pasted != target, axis=-1))
    assert not mask[2, 36]
    assert mask[:6, 34:].sum() == 6 * 6 - 1 and not mask[6:].any() and not mask[:, :34].any()
    np.testing.assert_array_equal(pasted[0, 34], source[3, 3])


def test_paste_refuses_a_box_outside_the_source():
    with pytest.raises(ValueError, match="does not lie inside"):
        paste_patch(_image(), _image(), (0, 0, 41, 5), (0, 0))
    _, mask = paste_patch(_image(), np.zeros((4, 4, 3), np.uint8), (0, 0, 4, 4), (-10, -10))
    assert not mask.any()  # entirely outside the target


def test_outline_rings_the_region_from_outside():
    image = np.zeros((9, 9, 3), np.uint8)
    mask = np.zeros((9, 9), bool)
    mask[4, 2:7] = True
    drawn = outline(image, mask, (0, 255, 255), width=1)
    ring = drawn.any(axis=-1)
    assert not (ring & mask).any()  # the region itself is left as painted
    assert ring[3, 2:7].all() and ring[5, 2:7].all() and ring[4, 1] and ring[4, 7]
    assert not ring[2].any() and not ring[3, 0]


def test_mask_box_and_hex_colour():
    mask = np.zeros((10, 10), bool)
    assert mask_box(mask) is None
    mask[2:5, 3:8] = True
    assert mask_box(mask) == (3, 2, 8, 5)
    assert hex_colour("#ff8000") == (255, 128, 0)
    with pytest.raises(ValueError, match="colour"):
        hex_colour("#fff")


def test_region_of_fills_boxes_and_lassos_and_ignores_points_then():
    from app.views.learn import region_of

    box = region_of({"box": [{"x": [12, 2], "y": [3, 6]}], "points": [{"x": 0, "y": 0}]}, 10, 16)
    assert box.shape == (10, 16)
    assert box[3:7, 2:13].all() and box.sum() == 4 * 11  # both ends inclusive; points ignored
    triangle = region_of({"lasso": [{"x": [0, 9, 0], "y": [0, 0, 9]}]}, 10, 10)
    assert triangle[1, 1] and not triangle[9, 9]
    assert region_of({"box": [], "lasso": [], "points": []}, 10, 10) is None


def test_region_of_a_click_is_a_disc_of_the_brush_width():
    from app.views.learn import region_of

    spot = region_of({"points": [{"x": 10, "y": 5}]}, 20, 20, brush=5)
    rows, columns = np.nonzero(spot)
    assert spot[5, 10] and rows.min() == 3 and rows.max() == 7 and columns.min() == 8


def test_paint_region_and_centre_of():
    from app.views.learn import centre_of, paint_region

    image = np.zeros((8, 8, 3), np.uint8)
    region = np.zeros((8, 8), bool)
    region[2:4, 1:7] = True
    painted, changed = paint_region(image, region, (200, 10, 10))
    assert (changed == region).all() and (painted[region] == (200, 10, 10)).all()
    assert not image.any()  # the original is left as it was
    assert centre_of(region) == (4, 3)


def test_canvas_figure_is_the_image_with_selectable_points_on_pixel_axes():
    from app.views.learn import canvas_figure

    figure = canvas_figure(np.zeros((16, 24, 3), np.uint8), step=4)
    picture, points = figure.data
    assert picture.type == "image" and len(points.x) == 4 * 6
    assert max(points.x) < 24 and max(points.y) < 16
    assert figure.layout.dragmode == "lasso"
    assert list(figure.layout.yaxis.range) == [15.5, -0.5]  # rows grow downwards
