import numpy as np
import pytest

from app.views.images import (
    COLOUR_MODES,
    ScaleContext,
    blend,
    colour_bar,
    colour_range,
    contour,
    draw_contour,
    heat_map,
    resize_map,
)

CONTEXT = ScaleContext(category_max=3.0, normal_p99=0.8, threshold=1.0)


def test_fixed_modes_give_the_same_colour_to_the_same_value_on_any_image():
    quiet = np.full((4, 4), 0.5)
    loud = np.array([[0.5, 2.5], [0.1, 0.2]])
    for mode in ("absolute", "calibrated", "threshold"):
        assert (heat_map(quiet, mode, CONTEXT)[0, 0] == heat_map(loud, mode, CONTEXT)[0, 0]).all()
    # per-image stretching does not: that is why it is only an explicit option
    assert not (heat_map(quiet + [[0, 0, 0, 1]] * 4, "per-image", CONTEXT)[0, 0]
                == heat_map(loud, "per-image", CONTEXT)[0, 0]).all()


def test_colour_ranges():
    values = np.array([[0.2, 0.7]])
    assert colour_range("absolute", values, CONTEXT) == (0.0, 3.0)
    assert colour_range("calibrated", values, CONTEXT) == (0.0, 1.6)
    assert colour_range("threshold", values, CONTEXT) == (0.0, 2.0)  # midpoint at threshold
    assert colour_range("per-image", values, CONTEXT) == (0.2, 0.7)
    low, high = colour_range("per-image", np.zeros((2, 2)), CONTEXT)
    assert high > low
    with pytest.raises(ValueError, match="unknown colour mode"):
        colour_range("rainbow", values, CONTEXT)
    assert set(COLOUR_MODES) == {"absolute", "calibrated", "threshold", "per-image"}


def test_blend_and_contours():
    base = np.zeros((6, 6, 3), np.uint8)
    heat = np.full((6, 6, 3), 200, np.uint8)
    assert blend(base, heat, 0.0).max() == 0 and blend(base, heat, 1.0).min() == 200
    assert blend(base, heat, 0.5)[0, 0, 0] == 100
    with pytest.raises(ValueError):
        blend(base, heat, 1.5)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    edge = contour(mask)
    assert edge.sum() == 12 and not edge[2:4, 2:4].any()
    drawn = draw_contour(base, mask, (0, 255, 0))
    assert (drawn[edge] == (0, 255, 0)).all() and drawn[~edge].max() == 0
    assert not contour(np.zeros((3, 3), bool)).any()


def test_colour_bar_and_resize():
    bar = colour_bar(0.0, 1.0, width=64, height=5)
    assert bar.shape == (5, 64, 3) and not (bar[0, 0] == bar[0, -1]).all()
    resized = resize_map(np.arange(16, dtype=np.float32).reshape(4, 4), (8, 6))
    assert resized.shape == (8, 6) and resized.dtype == np.float32
