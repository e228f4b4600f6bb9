"""Anomaly-detection metrics: image/pixel AUROC, AU-PRO, legacy PRO, curves and thresholds.

Pure numpy/scipy/scikit-learn so that evaluation and reports never need torch. Conventions used
throughout: a higher score means "more anomalous", a sample is predicted defective when
``score >= threshold``, masks/labels count as defective where their value is > 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class _SortedPixels:
    """Pixel scores of some images, sorted: the normal pixels, and the defective pixels with the
    PRO weight of each (1 / size of its region)."""

    neg: np.ndarray
    pos: np.ndarray
    weights: np.ndarray
    n_regions: int


def _merge(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two ascending arrays in linear time; returns (merged, True where from ``b``).

    Each element of ``b`` lands before the equal elements of ``a``; the binary search costs
    len(b) * log(len(a)): ``b`` is the shorter array (the defective pixels).
    """
    from_b = np.zeros(a.size + b.size, dtype=bool)
    from_b[np.searchsorted(a, b, side="left") + np.arange(b.size)] = True
    merged = np.empty(from_b.size, dtype=np.result_type(a, b))
    merged[from_b] = b
    merged[~from_b] = a
    return merged, from_b


def _union(parts: Sequence[_SortedPixels]) -> _SortedPixels:
    """The sorted pixels of several disjoint groups of images, merged without sorting again.

    A stable sort of concatenated ascending runs is a merge (timsort finds the runs): linear in
    the number of pixels for the few groups a report has.
    """
    if len(parts) == 1:
        return parts[0]
    neg = np.concatenate([p.neg for p in parts])
    neg.sort(kind="stable")
    pos = np.concatenate([p.pos for p in parts])
    order = np.argsort(pos, kind="stable")
    weights = np.concatenate([p.weights for p in parts])[order]
    return _SortedPixels(neg, pos[order], weights, sum(p.n_regions for p in parts))


class PixelScores:
    """The pixel scores of a test set sorted once, shared by every pixel-level metric.

    A report asks for pixel AUROC, AU-PRO and the ROC curve of the whole set and again for each
    defect type. Images are sorted per group (``groups``: one key per image, e.g. its defect
    type, normal images sharing one key); the metrics of any union of groups merge the groups'
    sorted runs in linear time, and each metric's counts come from one pass over the merged
    scores instead of binary searches. Regions are 8-connected within each image.
    """

    def __init__(self, masks: ArrayLike, maps: ArrayLike, groups: ArrayLike | None = None
                 ) -> None:
        m, a = _masks_and_maps(masks, maps)
        keys = np.zeros(len(m), dtype=int) if groups is None else np.asarray(groups)
        if keys.shape != (len(m),):
            raise ValueError(f"groups must give one key per image; got {keys.shape} for "
                             f"{len(m)} images")
        regions, _ = ndimage.label(m, structure=_EIGHT_CONNECTED_PER_IMAGE)
        sizes = np.bincount(regions.ravel())

        def sort_group(key: Any) -> _SortedPixels:
            chosen = keys == key
            region_of = regions[chosen].ravel()
            scores = a[chosen].ravel()
            normal = region_of == 0
            pos_scores = scores[~normal]
            order = np.argsort(pos_scores)
            pos_regions = region_of[~normal]
            return _SortedPixels(
                np.sort(scores[normal]), pos_scores[order], 1.0 / sizes[pos_regions[order]],
                int(np.unique(pos_regions).size))

        # numpy's sorts release the GIL: the groups sort in parallel on several cores
        names = list(dict.fromkeys(keys.tolist()))  # first-seen order
        with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
            self._groups: dict[Any, _SortedPixels] = dict(zip(
                names, pool.map(sort_group, names), strict=True))
        self._unions: dict[tuple, _SortedPixels] = {}

    def _select(self, groups: Sequence[Any] | None) -> _SortedPixels:
        keys = tuple(self._groups) if groups is None else tuple(groups)
        unknown = [k for k in keys if k not in self._groups]
        if unknown or not keys:
            raise ValueError(f"unknown image groups {unknown}; known: {list(self._groups)}")
        if keys not in self._unions:
            self._unions[keys] = _union([self._groups[k] for k in keys])
        return self._unions[keys]

    def _both_classes(self, groups: Sequence[Any] | None) -> _SortedPixels:
        chosen = self._select(groups)
        if chosen.pos.size == 0 or chosen.neg.size == 0:
            only = "defective" if chosen.pos.size else "normal"
            raise ValueError(f"masks contain only {only} samples; the metric needs both normal "
                             "and defective ones")
        return chosen

    def auroc(self, groups: Sequence[Any] | None = None) -> float:
        """Pixel AUROC of the chosen groups (all by default): the Mann-Whitney statistic with
        ties counting one half, which equals sklearn's trapezoidal ROC area."""
        chosen = self._both_classes(groups)
        neg, pos = chosen.neg, chosen.pos
        below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
        below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
        return float((below + below_or_tied) / (2.0 * neg.size * pos.size))

    def _counts(self, chosen: _SortedPixels
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Distinct scores (descending) and, at each as a threshold, the normal pixels, the
        defective pixels and the PRO weight at or above it: one pass over the merged scores."""
        merged, is_pos = _merge(chosen.neg, chosen.pos)
        first = np.empty(merged.size, dtype=bool)
        first[:1] = True
        np.not_equal(merged[1:], merged[:-1], out=first[1:])
        index = np.flatnonzero(first)[::-1]
        counter = np.int32 if merged.size < 2**31 else np.int64
        pos_below = (np.cumsum(is_pos, dtype=counter) - is_pos)[index]  # strictly below
        cum_weights = np.concatenate(([0.0], np.cumsum(chosen.weights)))
        return (merged[index], chosen.neg.size - (index - pos_below),
                chosen.pos.size - pos_below, cum_weights[-1] - cum_weights[pos_below])

    def pro_curve(self, groups: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact PRO-vs-FPR curve (see ``pro_curve``) of the chosen groups."""
        chosen = self._select(groups)
        if chosen.n_regions == 0:
            raise ValueError("masks contain no anomalous region; PRO is undefined")
        if chosen.neg.size == 0:
            raise ValueError("masks contain no normal pixel; the false-positive rate is "
                             "undefined")
        _, neg_counts, _, weights = self._counts(chosen)
        fpr = neg_counts / chosen.neg.size
        pro = weights / chosen.n_regions
        return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))

    def au_pro(self, groups: Sequence[Any] | None = None, fpr_limit: float = 0.3) -> float:
        """Standard AU-PRO (see ``au_pro``) of the chosen groups."""
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
        fpr, pro = self.pro_curve(groups)
        end = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:end] <= fpr_limit
        x, y = fpr[:end], pro[:end]
        if x[-1] < fpr_limit:  # then fpr[end] > fpr_limit exists, since the curve ends at 1
            x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x, y = np.append(x, fpr_limit), np.append(y, y_limit)
        return float(np.clip(trapezoid(y, x) / fpr_limit, 0.0, 1.0))

    def roc_curve(self, groups: Sequence[Any] | None = None, max_points: int = 1000
                  ) -> dict[str, list[float]]:
        """Pixel ROC curve (see ``pixel_roc_curve``) of the chosen groups."""
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2; got {max_points}")
        chosen = self._both_classes(groups)
        thresholds, neg_counts, pos_counts, _ = self._counts(chosen)
        fpr = np.concatenate(([0.0], neg_counts / chosen.neg.size))
        tpr = np.concatenate(([0.0], pos_counts / chosen.pos.size))
        top = _above_threshold_max(np.concatenate((chosen.neg[-1:], chosen.pos[-1:])))
        thresholds = np.concatenate(([top], thresholds.astype(np.float64)))
        if fpr.size > max_points:
            length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(fpr), np.diff(tpr)))))
            targets = np.linspace(0.0, length[-1], max_points)[:-1]
            keep = np.unique(np.append(np.searchsorted(length, targets), fpr.size - 1))
            fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
        return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel-level AUROC over all pixels of all images.

    Computed as the Mann-Whitney statistic (ties count one half), which equals sklearn's
    trapezoidal ROC area; two sorts and a binary search are about 10x faster than
    roc_auc_score on millions of pixels.
    """
    return PixelScores(masks, maps).auroc()


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO-vs-FPR curve of the standard MVTec AU-PRO, at every distinct score.

    Thresholds are global over the whole set (normal images included). Each anomalous pixel adds
    1 / (n_regions * size of its 8-connected region) to PRO, so PRO(t) and FPR(t) are cumulative
    sums over pixels sorted by score. Returns (fpr, pro), both non-decreasing, starting at (0, 0)
    (threshold above every score) and ending at (1, 1) (lowest score).
    """
    return PixelScores(masks, maps).pro_curve()


def au_pro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Standard MVTec AU-PRO: area under PRO over FPR in [0, fpr_limit], divided by fpr_limit.

    Trapezoid rule on the exact curve, with the curve linearly interpolated at fpr_limit. This is
    the headline localisation metric; see legacy_pro for the paper's non-standard variant.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    return PixelScores(masks, maps).au_pro(fpr_limit=fpr_limit)


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
    anomalous = [i for i in range(len(m)) if m[i].any()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # sorts free the GIL
        per_image = list(pool.map(
            lambda i: _legacy_image_pro(m[i], a[i], num_thresholds), anomalous))
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
    return PixelScores(masks, maps).roc_curve(max_points=max_points)


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
