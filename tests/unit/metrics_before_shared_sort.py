"""rd/metrics.py as it was before the shared sort (issue 12), frozen: the reference that
tests/unit/test_metrics.py holds the shared-sort report to (every number within 1e-6)."""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn import metrics as skm

# MVTec's evaluation uses 8-connectivity for ground-truth regions. The 3-D variant labels a whole
# (N, H, W) stack in one call without ever joining regions of neighbouring images.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


def _labels_and_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D image-level inputs; return (bool labels, float64 scores)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"labels and scores must be 1-D of equal length; got {y.shape} and {s.shape}"
        )
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    y = y > 0.5
    _require_both_classes(y, "labels")
    return y, s


def _masks_and_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) pixel-level inputs; return (bool masks, float maps).

    The maps keep their floating dtype (float32 halves sort time and memory on big test sets).
    """
    m = np.asarray(masks)
    a = np.asarray(maps)
    if a.ndim != 3 or m.shape != a.shape:
        raise ValueError(
            f"masks and maps must both be (N, H, W) with equal shapes; got {m.shape} and {a.shape}"
        )
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("maps contain NaN or infinite values")
    return m > 0.5, a


def _require_both_classes(y: np.ndarray, what: str) -> None:
    """ROC-type metrics are undefined unless both normal and defective samples exist."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        only = "defective" if n_pos else "normal"
        raise ValueError(
            f"{what} contain only {only} samples; the metric needs both normal and defective ones"
        )


def _distinct_descending(neg_sorted: np.ndarray, pos_sorted: np.ndarray) -> np.ndarray:
    """Distinct values of two ascending arrays, descending.

    A stable sort of two concatenated sorted runs is a linear-time merge, far cheaper than
    np.union1d re-sorting millions of pixels.
    """
    merged = np.concatenate((neg_sorted, pos_sorted))
    merged.sort(kind="stable")
    keep = np.empty(merged.size, dtype=bool)
    keep[:1] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return merged[keep][::-1]


def _above_threshold_max(scores: np.ndarray) -> float:
    """Finite threshold that flags nothing: the next float above the maximum score.

    Taken in the scores' own dtype, so it stays above the maximum when compared in float32 too.
    """
    top = scores.max()
    return float(np.nextafter(top, np.asarray(np.inf, dtype=top.dtype)))


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC (identical to sklearn's roc_auc_score, with a clearer error)."""
    y, s = _labels_and_scores(labels, scores)
    return float(skm.roc_auc_score(y, s))


def _sorted_pixel_scores(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sorted scores of the normal pixels and of the defective pixels."""
    m, a = _masks_and_maps(masks, maps)
    y = m.ravel()
    _require_both_classes(y, "masks")
    s = a.ravel()
    return np.sort(s[~y]), np.sort(s[y])


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC over all pixels of all images.

    Computed as the Mann-Whitney statistic (ties count one half), which equals sklearn's
    trapezoidal ROC area; two sorts and a binary search are about 10x faster than
    roc_auc_score on millions of pixels.
    """
    neg, pos = _sorted_pixel_scores(masks, maps)
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2.0 * neg.size * pos.size))


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO-vs-FPR curve of the standard MVTec AU-PRO, at every distinct score.

    Thresholds are global over the whole set (normal images included). Each anomalous pixel adds
    1 / (n_regions * size of its 8-connected region) to PRO, so PRO(t) and FPR(t) are cumulative
    sums over pixels sorted by score. Returns (fpr, pro), both non-decreasing, starting at (0, 0)
    (threshold above every score) and ending at (1, 1) (lowest score).
    """
    m, a = _masks_and_maps(masks, maps)
    regions, n_regions = ndimage.label(m, structure=_EIGHT_CONNECTED_PER_IMAGE)
    if n_regions == 0:
        raise ValueError("masks contain no anomalous region; PRO is undefined")
    region_of = regions.ravel()
    s = a.ravel()
    normal = region_of == 0
    n_normal = int(np.count_nonzero(normal))
    if n_normal == 0:
        raise ValueError("masks contain no normal pixel; the false-positive rate is undefined")

    neg = np.sort(s[normal])
    pos_scores = s[~normal]
    order = np.argsort(pos_scores)
    pos = pos_scores[order]
    region_sizes = np.bincount(region_of)
    weights = 1.0 / region_sizes[region_of[~normal][order]]
    cum_weights = np.concatenate(([0.0], np.cumsum(weights)))

    thresholds = _distinct_descending(neg, pos)
    fpr = (n_normal - np.searchsorted(neg, thresholds, side="left")) / n_normal
    pro = (cum_weights[-1] - cum_weights[np.searchsorted(pos, thresholds, side="left")]) / n_regions
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def au_pro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Standard MVTec AU-PRO: area under PRO over FPR in [0, fpr_limit], divided by fpr_limit.

    Trapezoid rule on the exact curve, with the curve linearly interpolated at fpr_limit. This is
    the headline localisation metric; see legacy_pro for the paper's non-standard variant.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:end] <= fpr_limit
    x, y = fpr[:end], pro[:end]
    if x[-1] < fpr_limit:  # then fpr[end] > fpr_limit exists, since the curve ends at FPR 1
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return float(np.clip(trapezoid(y, x) / fpr_limit, 0.0, 1.0))


def _legacy_image_pro(mask: np.ndarray, amap: np.ndarray, num_thresholds: int) -> float:
    """Per-image PRO area of the reference code (see legacy_pro)."""
    regions, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    normal_sorted = np.sort(amap[~mask])
    if normal_sorted.size == 0:
        raise ValueError("an image is defective everywhere; its false-positive rate is undefined")
    low, high = float(amap.min()), float(amap.max())
    thresholds = low + (high - low) / num_thresholds * np.arange(num_thresholds)

    # Pixels strictly above each threshold, counted by binary search instead of binarising.
    n_normal = normal_sorted.size
    fpr = (n_normal - np.searchsorted(normal_sorted, thresholds, side="right")) / n_normal
    overlaps = np.empty((n_regions, num_thresholds))
    for r in range(n_regions):
        region_sorted = np.sort(amap[regions == r + 1])
        above = region_sorted.size - np.searchsorted(region_sorted, thresholds, side="right")
        overlaps[r] = above / region_sorted.size
    pro = overlaps.mean(axis=0)

    kept = fpr < 0.3
    fpr, pro = fpr[kept], pro[kept]
    if fpr.size < 2 or fpr.max() == fpr.min():
        # Zero-width curve: the reference code fails or returns NaN/0 here (binary or constant
        # maps); the mean kept PRO is its natural limit (0 when nothing is kept).
        return float(pro.mean()) if pro.size else 0.0
    return float(skm.auc(fpr / fpr.max(), pro))


def legacy_pro(masks: ArrayLike, maps: ArrayLike, num_thresholds: int = 200) -> float:
    """Per-image "PRO" of the RD4AD reference code, for parity with the paper's table only.

    Not the standard AU-PRO (use au_pro for reporting). For each image with a defect (normal
    images are skipped): thresholds min + k * (max - min) / num_thresholds, k = 0..n-1, of that
    image's own map; a pixel is positive when its score is > the threshold; PRO is the mean overlap
    of the image's 8-connected regions; FPR = false positives / normal pixels of the image. Only
    points with FPR < 0.3 are kept, FPR is divided by the largest kept FPR, the area is taken by
    the trapezoid rule, and the per-image areas are averaged.
    """
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2; got {num_thresholds}")
    m, a = _masks_and_maps(masks, maps)
    per_image = [
        _legacy_image_pro(mask, amap, num_thresholds)
        for mask, amap in zip(m, a, strict=True)
        if mask.any()
    ]
    if not per_image:
        raise ValueError("masks contain no anomalous image; legacy PRO is undefined")
    return float(np.mean(per_image))


def roc_curve_points(labels: ArrayLike, scores: ArrayLike) -> dict[str, list[float]]:
    """Image-level ROC curve as JSON-ready lists {"fpr", "tpr", "thresholds"}.

    sklearn's leading +inf threshold (the (0, 0) point) is replaced by the smallest float above the
    maximum score, so every threshold is finite, in raw score units, and flags nothing at (0, 0).
    Collinear points are dropped (sklearn's drop_intermediate).
    """
    y, s = _labels_and_scores(labels, scores)
    fpr, tpr, thresholds = skm.roc_curve(y, s)
    thresholds = thresholds.astype(np.float64)
    thresholds[0] = _above_threshold_max(s)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def pixel_roc_curve(
    masks: ArrayLike, maps: ArrayLike, max_points: int = 1000
) -> dict[str, list[float]]:
    """Pixel-level ROC curve, subsampled to at most max_points so it fits in a JSON report.

    Same format and first-threshold convention as roc_curve_points. Points are picked evenly
    along the curve's length (keeping the first (0, 0) and last (1, 1) points); a subset of a
    monotone curve stays monotone.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2; got {max_points}")
    neg, pos = _sorted_pixel_scores(masks, maps)
    thresholds = _distinct_descending(neg, pos)
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    tpr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    fpr = np.concatenate(([0.0], fpr))
    tpr = np.concatenate(([0.0], tpr))
    top = _above_threshold_max(np.concatenate((neg[-1:], pos[-1:])))
    thresholds = np.concatenate(([top], thresholds.astype(np.float64)))

    if fpr.size > max_points:
        length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(fpr), np.diff(tpr)))))
        targets = np.linspace(0.0, length[-1], max_points)[:-1]
        keep = np.unique(np.append(np.searchsorted(length, targets), fpr.size - 1))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def f1_optimal_threshold(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """Threshold maximising F1 (predict defective when score >= threshold).

    Gives users a sensible default operating point, since the method itself sets none. Among
    equal F1 values the lowest threshold wins.
    """
    y, s = _labels_and_scores(labels, scores)
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denominator = precision + recall
    f1 = np.divide(
        2.0 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    best = int(np.argmax(f1))
    return {
        "threshold": float(thresholds[best]),
        "f1": float(f1[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
    }


def threshold_at_fpr(labels: ArrayLike, scores: ArrayLike, target_fpr: float) -> dict[str, float]:
    """Lowest threshold whose false-positive rate on normal samples is <= target_fpr.

    Candidates are the observed scores plus one just above the maximum (FPR 0), so the result
    is always attainable; it maximises TPR under the FPR budget.
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1]; got {target_fpr}")
    y, s = _labels_and_scores(labels, scores)
    neg = np.sort(s[~y])
    pos = np.sort(s[y])
    candidates = np.append(np.unique(s), _above_threshold_max(s))  # ascending
    fpr = (neg.size - np.searchsorted(neg, candidates, side="left")) / neg.size
    best = int(np.argmax(fpr <= target_fpr))  # fpr is non-increasing; the last candidate has 0
    tpr = (pos.size - np.searchsorted(pos, candidates[best], side="left")) / pos.size
    return {"threshold": float(candidates[best]), "fpr": float(fpr[best]), "tpr": float(tpr)}


def score_statistics(scores: ArrayLike) -> dict[str, float | int]:
    """Summary of normal-image scores, used to calibrate heat-map colour scales across images.

    std is the population standard deviation (ddof=0); percentiles use linear interpolation.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("scores is empty; statistics are undefined")
    p50, p95, p99 = np.percentile(s, [50, 95, 99])
    return {
        "mean": float(s.mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "max": float(s.max()),
        "median": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "n": int(s.size),
    }
