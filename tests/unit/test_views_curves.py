"""app/views/curves.py: confusion counts, operating points, figures and review groups."""

from __future__ import annotations

import numpy as np
import pytest

from app.views.curves import (
    GROUPS,
    confusion_at,
    operating_point,
    review_groups,
    roc_figure,
    score_histogram,
)
from rd.metrics import roc_curve_points


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=200)
    scores = rng.normal(loc=labels * 1.5, scale=1.0).round(2)  # rounded: ties on purpose
    return labels, scores


def test_confusion_matches_a_direct_count(scored):
    labels, scores = scored
    for threshold in [-10.0, *np.quantile(scores, [0.1, 0.5, 0.9]), scores[3], 10.0]:
        result = confusion_at(labels, scores, threshold)
        tp = sum(1 for y, s in zip(labels, scores, strict=True) if y == 1 and s >= threshold)
        fp = sum(1 for y, s in zip(labels, scores, strict=True) if y == 0 and s >= threshold)
        fn = sum(1 for y, s in zip(labels, scores, strict=True) if y == 1 and s < threshold)
        tn = sum(1 for y, s in zip(labels, scores, strict=True) if y == 0 and s < threshold)
        assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (tp, fp, fn, tn)
        assert result["recall"] == result["tpr"] == pytest.approx(tp / (tp + fn))
        assert result["fpr"] == pytest.approx(fp / (fp + tn))
        assert result["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)


def test_confusion_counts_a_tie_as_defective_and_never_divides_by_zero():
    assert confusion_at([1, 0], [0.5, 0.2], 0.5)["tp"] == 1
    nothing_flagged = confusion_at([1, 0], [0.1, 0.2], 1.0)
    assert nothing_flagged["precision"] == 0.0 and nothing_flagged["recall"] == 0.0
    only_normal = confusion_at([0, 0], [0.1, 0.9], 0.5)
    assert only_normal["recall"] == 0.0 and only_normal["fpr"] == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        confusion_at([0, 1], [0.3], 0.5)


def test_operating_point_agrees_with_confusion_at_the_curve_thresholds(scored):
    labels, scores = scored
    roc = roc_curve_points(labels, scores)
    for threshold in [*roc["thresholds"], scores.max() + 1, scores.min() - 1]:
        point = operating_point(roc, threshold)
        direct = confusion_at(labels, scores, threshold)
        assert point["threshold"] == threshold
        assert point["fpr"] == pytest.approx(direct["fpr"])
        assert point["tpr"] == pytest.approx(direct["tpr"])


def test_operating_point_takes_the_lowest_listed_threshold_at_or_above():
    roc = {"fpr": [0.0, 0.0, 0.5, 1.0], "tpr": [0.0, 0.5, 1.0, 1.0],
           "thresholds": [0.9, 0.8, 0.4, 0.1]}
    assert operating_point(roc, 0.8) == {"fpr": 0.0, "tpr": 0.5, "threshold": 0.8}
    assert operating_point(roc, 0.5) == {"fpr": 0.0, "tpr": 0.5, "threshold": 0.5}
    assert operating_point(roc, 0.3) == {"fpr": 0.5, "tpr": 1.0, "threshold": 0.3}
    assert operating_point(roc, 2.0) == {"fpr": 0.0, "tpr": 0.0, "threshold": 2.0}
    assert operating_point(roc, 0.0) == {"fpr": 1.0, "tpr": 1.0, "threshold": 0.0}


def test_roc_figure_holds_each_curve_its_thresholds_and_the_operating_point():
    curves = {"image": {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.9, 1.0],
                        "thresholds": [3.0, 1.5, 0.1]},
              "scratch": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "thresholds": [3.0, 0.1]}}
    point = {"fpr": 0.2, "tpr": 0.9, "threshold": 1.5}
    figure = roc_figure(curves, operating_point=point)
    by_name = {trace.name: trace for trace in figure.data}
    image = by_name["image"]
    assert list(image.x) == [0.0, 0.2, 1.0] and list(image.y) == [0.0, 0.9, 1.0]
    assert list(image.customdata) == [3.0, 1.5, 0.1]
    for text in ("threshold %{customdata", "TPR %{y", "FPR %{x"):
        assert text in image.hovertemplate
    marker = by_name["operating point"]
    assert (marker.x[0], marker.y[0], marker.customdata[0]) == (0.2, 0.9, 1.5)
    assert "threshold %{customdata" in marker.hovertemplate
    assert "operating point" not in {t.name for t in roc_figure(curves).data}


def test_score_histogram_splits_the_scores_and_marks_the_threshold():
    figure = score_histogram([0.1, 0.2, 0.3], [0.8, 0.9], threshold=0.5)
    normal, defective = figure.data
    assert list(normal.x) == [0.1, 0.2, 0.3] and list(defective.x) == [0.8, 0.9]
    assert normal.name.startswith("normal") and defective.name.startswith("defective")
    assert normal.xbins.size == defective.xbins.size  # shared bins, comparable bars
    (line,) = figure.layout.shapes
    assert line.x0 == line.x1 == 0.5
    assert "0.5000" in figure.layout.annotations[0].text


def test_score_histogram_bins_do_not_move_with_the_threshold():
    normal, defective = [0.1, 0.2, 0.3], [0.8, 0.9]
    bins = {threshold: score_histogram(normal, defective, threshold).data[0].xbins
            for threshold in (0.05, 0.5, 1.5)}
    assert len({(b.start, b.end, b.size) for b in bins.values()}) == 1
    wide = score_histogram(normal, defective, 1.5).layout.xaxis.range
    assert wide[0] < 0.1 and wide[1] > 1.5  # a threshold beyond the scores stays in view


def test_auroc_labels_and_small_classes():
    from app.views.curves import auroc_label, small_classes

    assert auroc_label("hole", 0.9312) == "hole · AUROC 93.1"
    assert auroc_label("hole", None) == "hole · AUROC —"
    assert small_classes({"hole": 3, "crack": 5, "cut": 4}) == ["hole", "cut"]


def test_review_groups_partition_the_images_sorted_by_margin(scored):
    labels, scores = scored
    images = [{"path": f"{i}.png", "defect": "good" if y == 0 else "bad", "label": int(y),
               "score": float(s)} for i, (y, s) in enumerate(zip(labels, scores, strict=True))]
    threshold = float(np.median(scores))
    groups = review_groups(images, threshold)
    assert tuple(groups) == GROUPS == ("FN", "FP", "TP", "TN")
    paths = [item["path"] for items in groups.values() for item in items]
    assert sorted(paths) == sorted(image["path"] for image in images)
    counts = confusion_at(labels, scores, threshold)
    assert {key: len(items) for key, items in groups.items()} == {
        "FN": counts["fn"], "FP": counts["fp"], "TP": counts["tp"], "TN": counts["tn"]}
    assert all(i["label"] == 1 and i["score"] < threshold for i in groups["FN"])
    assert all(i["label"] == 0 and i["score"] >= threshold for i in groups["FP"])
    for items in groups.values():
        margins = [item["margin"] for item in items]
        assert margins == sorted(margins)
    # Most confidently wrong first: the lowest-scoring defect, the highest-scoring normal image.
    assert groups["FN"][0]["score"] == min(i["score"] for i in groups["FN"])
    assert groups["FP"][0]["score"] == max(i["score"] for i in groups["FP"])
    assert groups["FN"][0]["margin"] == pytest.approx(groups["FN"][0]["score"] - threshold)
    assert "margin" not in images[0]  # the report's records are left untouched


def test_novelty_summary_reads_a_novelty_report():
    from app.views.curves import novelty_summary

    roc = {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 1.0, 1.0], "thresholds": [2.0, 1.0, 0.0]}
    report = {"paper": {"auroc": [99.9, 98.0], "mean": 99.0},
              "results": [{"class": "0", "index": 0, "auroc": 0.97, "n_train": 10, "roc": roc},
                          {"class": "1", "index": 1, "auroc": 0.91, "n_train": 12, "roc": roc}]}
    rows, curves = novelty_summary(report)
    assert [(r["class"], r["AUROC %"], r["paper %"]) for r in rows] == [("0 0", 97.0, 99.9),
                                                                       ("1 1", 91.0, 98.0)]
    assert list(curves) == ["0 0 · AUROC 97.0", "1 1 · AUROC 91.0"]
    assert curves["1 1 · AUROC 91.0"] is roc
    with pytest.raises(ValueError, match="not a novelty report"):
        novelty_summary({"image_auroc": 0.9})
    with pytest.raises(ValueError, match="no finished class"):
        novelty_summary({"results": []})
