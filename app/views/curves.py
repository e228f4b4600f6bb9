"""Numbers and figures behind the Evaluate and Review pages: confusion counts at a threshold,
ROC curves with their operating point, score histograms and the review galleries.

Pure functions (no Streamlit) so they are tested directly. Everywhere, ``score >= threshold``
means "flagged defective" (``rd.decision.is_defective``, the one rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from numpy.typing import ArrayLike

from rd.decision import is_defective

PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692",
           "#b6e880", "#ff97ff", "#fecb52")
NORMAL_COLOUR = "#2a9d8f"
DEFECTIVE_COLOUR = "#e76f51"
THRESHOLD_COLOUR = "#222222"
ROC_HOVER = "threshold %{customdata:.4f}<br>TPR %{y:.3f}<br>FPR %{x:.3f}"

# Gallery keys in display order: mistakes first, the costliest (a missed defect) at the top.
GROUPS = ("FN", "FP", "TP", "TN")
SMALL_CLASS = 5  # fewer images than this in a class: its AUROC is too coarse to compare


def confusion_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Counts and rates when images scoring >= threshold are flagged defective.

    Rates whose denominator is zero (no flagged image, no defective or no normal image) are 0
    rather than NaN, so the page can always print them.
    """
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    flagged = is_defective(s, threshold)
    tp = int((flagged & y).sum())
    fp = int((flagged & ~y).sum())
    fn = int((~flagged & y).sum())
    tn = int((~flagged & ~y).sum())

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "tpr": ratio(tp, tp + fn), "fpr": ratio(fp, fp + tn)}


def operating_point(roc: Mapping[str, Sequence[float]], threshold: float) -> dict[str, float]:
    """Where ``threshold`` sits on a stored ROC curve {fpr, tpr, thresholds (descending)}.

    Flagging ``score >= threshold`` gives the same decisions as the curve's lowest listed
    threshold that is still >= threshold, so that point is taken (exact on a full curve; on a
    thinned one, such as the report's pixel ROC, the nearest listed point on the safe side).
    Above every listed threshold nothing is flagged: (0, 0).
    """
    thresholds = np.asarray(roc["thresholds"], dtype=np.float64)
    at_or_above = np.flatnonzero(thresholds >= threshold)
    if at_or_above.size == 0:
        return {"fpr": 0.0, "tpr": 0.0, "threshold": float(threshold)}
    index = int(at_or_above[-1])
    return {"fpr": float(roc["fpr"][index]), "tpr": float(roc["tpr"][index]),
            "threshold": float(threshold)}


def _marker(point: Mapping[str, float], name: str, colour: str) -> go.Scatter:
    return go.Scatter(x=[point["fpr"]], y=[point["tpr"]], customdata=[point["threshold"]],
                      mode="markers", name=name,
                      hovertemplate=ROC_HOVER + f"<extra>{name}</extra>",
                      marker={"size": 13, "color": colour, "symbol": "circle",
                              "line": {"width": 2, "color": "white"}})


def roc_figure(curves: Mapping[str, Mapping[str, Sequence[float]]],
               operating_point: Mapping[str, float] | None = None,
               title: str = "") -> go.Figure:
    """ROC curves overlaid on one plot; hovering a point shows its threshold, TPR and FPR.

    ``operating_point`` ({fpr, tpr, threshold}) is drawn as one dark marker.
    """
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                                line={"dash": "dot", "color": "#bbbbbb", "width": 1},
                                hoverinfo="skip", showlegend=False))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(curves)}
    for name, roc in curves.items():
        figure.add_trace(go.Scatter(
            x=list(roc["fpr"]), y=list(roc["tpr"]), customdata=list(roc["thresholds"]),
            mode="lines", name=name, line={"color": colours[name], "width": 2},
            hovertemplate=ROC_HOVER + f"<extra>{name}</extra>"))
    if operating_point is not None:
        figure.add_trace(_marker(operating_point, "operating point", THRESHOLD_COLOUR))
    figure.update_layout(
        title=title or None, xaxis_title="false-positive rate", yaxis_title="true-positive rate",
        xaxis={"range": [-0.01, 1.01], "constrain": "domain"},
        yaxis={"range": [-0.01, 1.01], "scaleanchor": "x", "scaleratio": 1},
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10}, height=420,
        legend={"x": 0.98, "y": 0.02, "xanchor": "right", "yanchor": "bottom"},
        hovermode="closest")
    return figure


def score_histogram(normal_scores: ArrayLike, defective_scores: ArrayLike, threshold: float,
                    bins: int = 30) -> go.Figure:
    """Overlaid histograms of normal and defective image scores on shared bins, with the
    threshold as a vertical line: how well one cut separates the two.

    The bins come from the scores alone, so they stay put while the threshold moves; the axis
    widens to keep a threshold outside the scores in view.
    """
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    defective = np.asarray(defective_scores, dtype=np.float64).ravel()
    scores = np.concatenate([normal, defective])
    low, high = float(scores.min()), float(scores.max())
    size = (high - low) / bins if high > low else 1.0
    xbins = {"start": low, "end": high + size, "size": size}
    figure = go.Figure()
    for name, values, colour in (("normal", normal, NORMAL_COLOUR),
                                 ("defective", defective, DEFECTIVE_COLOUR)):
        figure.add_trace(go.Histogram(
            x=values, name=f"{name} ({values.size})", xbins=xbins, marker_color=colour,
            opacity=0.65, hovertemplate="score %{x}<br>%{y} images<extra>" + name + "</extra>"))
    figure.add_vline(x=threshold, line={"color": THRESHOLD_COLOUR, "width": 2, "dash": "dash"},
                     annotation_text=f"threshold {threshold:.4f}",
                     annotation_position="bottom right")
    margin = size / 2
    figure.update_layout(barmode="overlay", xaxis_title="image score (raw units)",
                         xaxis={"range": [min(low, threshold) - margin,
                                          max(high + size, threshold) + margin]},
                         yaxis_title="images", height=320,
                         margin={"l": 10, "r": 10, "t": 40, "b": 10},
                         legend={"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"})
    return figure


def auroc_label(name: str, auroc: float | None) -> str:
    """A legend entry that carries its curve's AUROC (in %), so no table is needed beside it."""
    return f"{name} · AUROC {'—' if auroc is None else f'{100 * auroc:.1f}'}"


def small_classes(counts: Mapping[str, int], minimum: int = SMALL_CLASS) -> list[str]:
    """The classes with fewer than ``minimum`` images: their AUROC moves by a large step with
    each image, so the page warns before anyone compares them."""
    return [name for name, count in counts.items() if count < minimum]


def review_groups(images: Sequence[Mapping[str, Any]], threshold: float
                  ) -> dict[str, list[dict[str, Any]]]:
    """The test images split into FN, FP, TP, TN (in that order) at ``threshold``.

    Each item is a copy of the image record with ``margin`` added: how far its score lies on
    the correct side of the threshold (negative when wrong). Every group is sorted by margin,
    ascending: the most confidently wrong first among mistakes, the closest calls first among
    correct decisions.
    """
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name in GROUPS}
    for image in images:
        flagged = is_defective(image["score"], threshold)
        defective = bool(image["label"])
        distance = image["score"] - threshold
        margin = distance if defective else -distance
        key = ("T" if flagged == defective else "F") + ("P" if flagged else "N")
        groups[key].append({**image, "margin": float(margin)})
    for items in groups.values():
        items.sort(key=lambda item: item["margin"])
    return groups


def novelty_summary(report: Mapping[str, Any]) -> tuple[list[dict[str, Any]],
                                                         dict[str, Mapping[str, Sequence[float]]]]:
    """Per-class rows (ours beside the paper) and per-class ROC curves of a report written by
    ``python -m rd novelty``; ValueError when the file is not such a report."""
    try:
        paper = report.get("paper") or {}
        paper_auroc = paper.get("auroc") or []
        rows, curves = [], {}
        for result in report["results"]:
            name = f"{result['index']} {result['class']}"
            reference = (paper_auroc[result["index"]]
                         if result["index"] < len(paper_auroc) else None)
            rows.append({"class": name, "AUROC %": round(100 * result["auroc"], 1),
                         "paper %": reference, "train images": result["n_train"]})
            curves[auroc_label(name, result["auroc"])] = result["roc"]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a novelty report of python -m rd novelty (missing {error})") \
            from None
    if not rows:
        raise ValueError("the novelty report has no finished class yet")
    return rows, curves
