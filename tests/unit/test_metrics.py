"""Metric tests: sklearn parity, AU-PRO against a slow direct reference, threshold helpers."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from rd.metrics import (
    au_pro,
    f1_optimal_threshold,
    image_auroc,
    legacy_pro,
    pixel_auroc,
    pixel_roc_curve,
    pro_curve,
    roc_curve_points,
    score_statistics,
    threshold_at_fpr,
)


def _random_case(seed: int, n: int = 5, size: int = 12, levels: int | None = None):
    """Masks with several blobs per defective image, one or more normal images, noisy maps.

    levels quantises the maps so that many scores tie.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 stays normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, 4, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


def _slow_au_pro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Direct AU-PRO: binarise at every distinct score, measure each region, clip the integral."""
    regions = []  # (image index, region mask)
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = np.count_nonzero(predicted & normal) / np.count_nonzero(normal)
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((fpr, float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


# --- AUROC -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_image_auroc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # coarse rounding: many ties
    assert image_auroc(labels, scores) == skm.roc_auc_score(labels, scores)


def test_image_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="only normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only defective"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 10), (2, 3)])
def test_pixel_auroc_equals_sklearn(seed, levels):
    masks, maps = _random_case(seed, n=6, size=16, levels=levels)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert pixel_auroc(masks.astype(np.uint8), maps.astype(np.float64)) == pytest.approx(
        expected, abs=1e-9
    )


def test_pixel_auroc_errors():
    masks, maps = _random_case(0)
    with pytest.raises(ValueError, match="only normal"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="equal shapes"):
        pixel_auroc(masks, maps[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, np.where(masks, np.nan, maps))


# --- AU-PRO ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, None), (2, 8), (3, 4), (4, 2)])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_au_pro_matches_direct_reference(seed, levels, limit):
    masks, maps = _random_case(seed, levels=levels)
    expected = _slow_au_pro(masks, maps, limit)
    assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_pro_curve_shape():
    masks, maps = _random_case(5, levels=6)
    fpr, pro = pro_curve(masks, maps)
    assert fpr[0] == pro[0] == 0.0
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert fpr.size == np.unique(maps).size + 1


def test_pro_regions_are_eight_connected():
    # An L of three pixels plus one pixel touching it only diagonally: one region of four
    # pixels with 8-connectivity (two regions, of 3 and 1, with 4-connectivity).
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 1] = masks[0, 2, 2] = masks[0, 3, 3] = True
    maps = np.zeros(masks.shape)
    maps[0, 3, 3] = 1.0  # only the diagonal pixel is detected at the top threshold
    fpr, pro = pro_curve(masks, maps)
    assert fpr[1] == 0.0
    assert pro[1] == pytest.approx(0.25)  # 4-connectivity would give (0 + 1) / 2


def test_au_pro_perfect_inverted_and_random():
    masks, _ = _random_case(6, n=8, size=20)
    perfect = masks + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert au_pro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert au_pro(masks, 1.0 - perfect) == 0.0
    random_map = np.random.default_rng(1).random(masks.shape)
    assert au_pro(masks, random_map) < 0.3  # about 0.15 expected by chance


def test_au_pro_errors():
    masks, maps = _random_case(0)
    with pytest.raises(ValueError, match="no anomalous region"):
        au_pro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        au_pro(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        au_pro(masks[0], maps[0])


# --- legacy per-image PRO ----------------------------------------------------------------------


def _hand_checkable_image():
    """One region; map values 0/1/2 so the 200 thresholds fall in just two regimes.

    Thresholds are 0, 0.01, ..., 1.99. Below 1: normal pixels scored 1 fire (FPR 2/10 = 0.2) and
    the whole region fires (PRO 1). From 1 on: FPR 0 and half the region fires (PRO 0.5). After
    rescaling the FPR axis runs 1 -> 0, so the area is the trapezoid (1 + 0.5) / 2 = 0.75.
    """
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = mask[1, :2] = True  # one 2x2 region; 12 normal pixels
    amap = np.zeros((4, 4))
    amap[0, :2] = 2.0
    amap[1, :2] = 1.0
    amap[3, :2] = 1.0  # 2 of the 12 normal pixels: FPR 1/6 < 0.3 below threshold 1
    return mask, amap


def test_legacy_pro_hand_checked():
    mask, amap = _hand_checkable_image()
    assert legacy_pro(mask[None], amap[None]) == pytest.approx(0.75)


def test_legacy_pro_skips_normal_images_and_averages():
    mask, amap = _hand_checkable_image()
    rng = np.random.default_rng(0)
    perfect_mask = np.zeros((4, 4), dtype=bool)
    perfect_mask[2:, 2:] = True
    perfect_map = rng.random((4, 4)) + 2.0 * perfect_mask  # continuous, perfectly separating
    masks = np.stack([np.zeros((4, 4), dtype=bool), mask, perfect_mask])
    maps = np.stack([rng.random((4, 4)), amap, perfect_map])
    assert legacy_pro(masks[2:], maps[2:]) == pytest.approx(1.0)
    assert legacy_pro(masks, maps) == pytest.approx((0.75 + 1.0) / 2)


def _slow_legacy_pro(masks: np.ndarray, maps: np.ndarray) -> float:
    """Direct per-image legacy PRO: binarise the image at each of its 200 thresholds."""
    areas = []
    for mask, amap in zip(masks, maps, strict=True):
        if not mask.any():
            continue
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        step = (amap.max() - amap.min()) / 200
        fprs, pros = [], []
        for k in range(200):
            predicted = amap > amap.min() + k * step
            fprs.append(np.count_nonzero(predicted & ~mask) / np.count_nonzero(~mask))
            pros.append(np.mean([predicted[labelled == r].mean() for r in range(1, n + 1)]))
        fprs, pros = np.array(fprs), np.array(pros)
        kept = fprs < 0.3
        areas.append(skm.auc(fprs[kept] / fprs[kept].max(), pros[kept]))
    return float(np.mean(areas))


@pytest.mark.parametrize("seed", range(3))
def test_legacy_pro_matches_direct_reference(seed):
    masks, maps = _random_case(seed, n=5, size=16)
    expected = _slow_legacy_pro(masks, maps)
    assert legacy_pro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_legacy_pro_differs_from_au_pro_but_is_bounded():
    masks, maps = _random_case(7, n=6, size=16)
    value = legacy_pro(masks, maps)
    assert 0.0 <= value <= 1.0
    assert value != pytest.approx(au_pro(masks, maps))


def test_legacy_pro_errors():
    masks, maps = _random_case(0)
    with pytest.raises(ValueError, match="no anomalous image"):
        legacy_pro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="num_thresholds"):
        legacy_pro(masks, maps, num_thresholds=1)


# --- curves ------------------------------------------------------------------------------------


def test_roc_curve_points_match_sklearn_with_finite_first_threshold():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(30), np.ones(20)]
    scores = np.round(rng.random(50) + 0.4 * labels, 2)
    curve = roc_curve_points(labels, scores)
    fpr, tpr, thresholds = skm.roc_curve(labels, scores)
    np.testing.assert_array_equal(curve["fpr"], fpr)
    np.testing.assert_array_equal(curve["tpr"], tpr)
    np.testing.assert_array_equal(curve["thresholds"][1:], thresholds[1:])
    assert scores.max() < curve["thresholds"][0] < np.inf
    for t, f, p in zip(curve["thresholds"], curve["fpr"], curve["tpr"], strict=True):
        flagged = scores >= t
        assert f == np.mean(flagged[labels == 0]) and p == np.mean(flagged[labels == 1])


def test_pixel_roc_curve_full_matches_sklearn():
    masks, maps = _random_case(8, levels=20)
    curve = pixel_roc_curve(masks, maps, max_points=10_000)
    fpr, tpr, thresholds = skm.roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(curve["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(curve["tpr"], tpr, atol=1e-12)
    np.testing.assert_array_equal(curve["thresholds"][1:], thresholds[1:])
    assert maps.max() < curve["thresholds"][0] < np.inf


def test_pixel_roc_curve_subsampled():
    masks, maps = _random_case(9, n=8, size=24)
    full = pixel_roc_curve(masks, maps, max_points=10**6)
    curve = pixel_roc_curve(masks, maps, max_points=50)
    assert len(full["fpr"]) > 50
    assert 40 <= len(curve["fpr"]) <= 50
    assert (curve["fpr"][0], curve["tpr"][0]) == (0.0, 0.0)
    assert (curve["fpr"][-1], curve["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["tpr"]) >= 0)
    assert np.all(np.diff(curve["thresholds"]) < 0)
    # every kept point is a point of the full curve
    full_points = set(zip(full["fpr"], full["tpr"], full["thresholds"], strict=True))
    assert set(zip(curve["fpr"], curve["tpr"], curve["thresholds"], strict=True)) <= full_points
    with pytest.raises(ValueError, match="max_points"):
        pixel_roc_curve(masks, maps, max_points=1)


# --- thresholds and statistics -----------------------------------------------------------------


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores >= threshold
    return float(np.mean(flagged[labels == 0])), float(np.mean(flagged[labels == 1]))


@pytest.mark.parametrize("seed", range(3))
def test_f1_optimal_threshold_is_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(60) + 0.5 * labels, 2)
    result = f1_optimal_threshold(labels, scores)
    f1s = [skm.f1_score(labels, scores >= t) for t in np.unique(scores)]
    assert result["f1"] == pytest.approx(max(f1s))
    predicted = scores >= result["threshold"]
    assert result["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert result["precision"] == pytest.approx(skm.precision_score(labels, predicted))
    assert result["recall"] == pytest.approx(skm.recall_score(labels, predicted))


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.33, 1.0])
def test_threshold_at_fpr_is_lowest_admissible(target):
    rng = np.random.default_rng(11)
    labels = np.r_[np.zeros(40), np.ones(25)]
    scores = np.round(rng.random(65) + 0.4 * labels, 2)
    result = threshold_at_fpr(labels, scores, target)
    fpr, tpr = _rates(labels, scores, result["threshold"])
    assert fpr <= target
    assert (result["fpr"], result["tpr"]) == (fpr, tpr)
    lower = np.unique(scores)[np.unique(scores) < result["threshold"]]
    if lower.size:
        assert _rates(labels, scores, lower[-1])[0] > target
    else:
        assert fpr == 1.0


def test_threshold_at_fpr_above_max_when_top_score_is_normal():
    result = threshold_at_fpr([0, 1, 0], [0.9, 0.5, 0.1], 0.0)
    assert result["threshold"] > 0.9
    assert (result["fpr"], result["tpr"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr([0, 1], [0.1, 0.2], 1.5)


def test_score_statistics():
    scores = np.arange(1, 101, dtype=float)
    stats = score_statistics(scores)
    assert stats["n"] == 100 and isinstance(stats["n"], int)
    assert stats["mean"] == 50.5 and stats["median"] == 50.5
    assert (stats["min"], stats["max"]) == (1.0, 100.0)
    assert stats["std"] == pytest.approx(np.std(scores))
    assert stats["p95"] == pytest.approx(np.percentile(scores, 95))
    assert stats["p99"] == pytest.approx(np.percentile(scores, 99))
    with pytest.raises(ValueError, match="empty"):
        score_statistics([])


def _grouped_case(seed: int, levels: int | None = None):
    """Normal images (group "") and three defect types of several images each."""
    masks, maps = _random_case(seed, n=13, size=24, levels=levels)
    masks[:4] = False  # four normal images
    groups = np.array(["", "", "", ""] + ["crack", "hole", "scratch"] * 3)
    return masks, maps, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [None, 5])
def test_shared_sort_report_equals_the_functions_before_it(seed, levels):
    """Issue 12: one sort shared by the whole report; every number equal to the old
    per-call functions (tests/unit/metrics_before_shared_sort.py) within 1e-6."""
    from rd.metrics import PixelScores
    from tests.unit import metrics_before_shared_sort as before

    masks, maps, groups = _grouped_case(seed, levels)
    pixels = PixelScores(masks, maps, groups)
    assert pixels.auroc() == pytest.approx(before.pixel_auroc(masks, maps), abs=1e-12)
    assert pixels.au_pro() == pytest.approx(before.au_pro(masks, maps), abs=1e-6)
    new_fpr, new_pro = pixels.pro_curve()
    old_fpr, old_pro = before.pro_curve(masks, maps)
    np.testing.assert_array_equal(new_fpr, old_fpr)
    np.testing.assert_allclose(new_pro, old_pro, atol=1e-6, rtol=0)
    for max_points in (1000, 20):
        new_roc = pixels.roc_curve(max_points=max_points)
        old_roc = before.pixel_roc_curve(masks, maps, max_points=max_points)
        assert new_roc == old_roc
    for defect in ("crack", "hole", "scratch"):
        subset = (groups == "") | (groups == defect)
        assert pixels.auroc(["", defect]) == pytest.approx(
            before.pixel_auroc(masks[subset], maps[subset]), abs=1e-12)
        assert pixels.au_pro(["", defect]) == pytest.approx(
            before.au_pro(masks[subset], maps[subset]), abs=1e-6)
        assert pixels.au_pro([defect, ""], fpr_limit=1.0) == pytest.approx(
            before.au_pro(masks[subset], maps[subset], fpr_limit=1.0), abs=1e-6)


def test_shared_sort_sorts_each_pixel_once(monkeypatch):
    """The report's metrics sort the pixels once (per group), not once per metric; unions of
    groups only merge sorted runs (stable sorts of concatenated runs)."""
    from rd import metrics

    masks, maps, groups = _grouped_case(0)
    calls = []
    real_sort, real_argsort = np.sort, np.argsort

    def counted(real):
        def sort(a, *args, **kwargs):
            if kwargs.get("kind") != "stable":
                calls.append(a.size)
            return real(a, *args, **kwargs)
        return sort

    monkeypatch.setattr(metrics.np, "sort", counted(real_sort))
    monkeypatch.setattr(metrics.np, "argsort", counted(real_argsort))
    pixels = metrics.PixelScores(masks, maps, groups)
    pixels.auroc(), pixels.au_pro(), pixels.roc_curve()
    for defect in ("crack", "hole", "scratch"):
        pixels.auroc(["", defect]), pixels.au_pro(["", defect])
    assert sum(calls) == masks.size


def test_pixel_scores_errors():
    from rd.metrics import PixelScores

    masks, maps, groups = _grouped_case(0)
    with pytest.raises(ValueError, match="one key per image"):
        PixelScores(masks, maps, groups[:3])
    pixels = PixelScores(masks, maps, groups)
    with pytest.raises(ValueError, match="unknown image groups"):
        pixels.auroc(["", "dent"])
    with pytest.raises(ValueError, match="only normal"):
        pixels.auroc([""])
    with pytest.raises(ValueError, match="no anomalous region"):
        pixels.au_pro([""])
