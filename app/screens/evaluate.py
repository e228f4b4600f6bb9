"""Evaluate: ROC curves, AUROC / AU-PRO per defect type, and the threshold every page uses."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from app import state
from app.views.curves import (
    SMALL_CLASS,
    auroc_label,
    confusion_at,
    novelty_summary,
    operating_point,
    roc_figure,
    score_histogram,
    small_classes,
)
from rd.data import DataError
from rd.errors import RDError
from rd.manifest import ManifestError, ModelEntry, all_models, models_for

SUGGESTIONS = {"f1": "F1-optimal", "fpr_0.01": "FPR ≤ 1%", "fpr_0.05": "FPR ≤ 5%",
               "fpr_0.1": "FPR ≤ 10%"}
SLIDER_STEPS = 1000
NO_VALUE = "—"


def _pct(value: float | None) -> str:
    """A rate as a percentage; a metric that could not be computed as a dash."""
    return NO_VALUE if value is None else f"{100 * value:.1f}"


def _labels_scores(report: dict[str, Any], defect: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of the test images; with ``defect``, the normal images plus that
    defect type only (the subset its per-class ROC curve was computed on)."""
    images = [i for i in report["images"]
              if defect is None or i["label"] == 0 or i["defect"] == defect]
    return (np.array([i["label"] for i in images], dtype=int),
            np.array([i["score"] for i in images], dtype=np.float64))


def _set_threshold(key: str, value: float) -> None:
    """Button callback: runs before the page, so the slider is drawn at the new value."""
    st.session_state[key] = value


def _copy_slider(slider_key: str, key: str) -> None:
    """Slider callback: the moved value becomes the shared threshold."""
    st.session_state[key] = st.session_state[slider_key]


def _threshold_controls(chosen: state.Selection, report: dict[str, Any], scores: np.ndarray
                        ) -> float:
    """The slider and the suggestion buttons; both write the threshold shared by every page.

    The slider has its own key, loaded from the shared one before it is drawn: Streamlit drops
    a widget's state on pages that do not draw it, and Inspect and Review must keep reading it.
    """
    key = state.threshold_key(chosen)
    slider_key = f"{key}::slider"
    suggested = {name: float(report["thresholds"][name]["threshold"])
                 for name in SUGGESTIONS if name in report["thresholds"]}
    current = float(st.session_state[key])
    top = max(float(scores.max()), current, *suggested.values())
    bottom = min(float(scores.min()), current)
    margin = 0.05 * (top - bottom) or 1.0
    low, high = min(bottom, max(0.0, bottom - margin)), top + margin
    st.session_state[slider_key] = current
    st.slider("Threshold (raw score: flagged defective when score ≥ threshold)", low, high,
              step=(high - low) / SLIDER_STEPS, format="%.4f", key=slider_key,
              on_change=_copy_slider, args=(slider_key, key))
    st.caption("Suggested by the test set:")
    columns = st.columns(len(suggested))
    for column, (name, value) in zip(columns, suggested.items(), strict=True):
        details = report["thresholds"][name]
        help_text = f"threshold {value:.4f}; " + ", ".join(
            f"{k} {v:.3f}" for k, v in details.items() if k != "threshold")
        column.button(SUGGESTIONS[name], key=f"suggest::{name}", help=help_text,
                      on_click=_set_threshold, args=(key, value), width="stretch",
                      type="primary" if np.isclose(value, current, rtol=0, atol=1e-12)
                      else "secondary")
    return current


def _confusion(counts: dict[str, float]) -> None:
    """The confusion matrix as metrics, so the counts change visibly with the slider."""
    first = st.columns(4)
    first[0].metric("TP · defects caught", counts["tp"])
    first[1].metric("FN · defects missed", counts["fn"])
    first[2].metric("FP · false alarms", counts["fp"])
    first[3].metric("TN · normal passed", counts["tn"])
    second = st.columns(4)
    second[0].metric("Precision", f"{counts['precision']:.3f}",
                     help="Of the flagged images, the share that is defective.")
    second[1].metric("Recall (TPR)", f"{counts['recall']:.3f}",
                     help="Of the defective images, the share flagged.")
    second[2].metric("FPR", f"{counts['fpr']:.3f}",
                     help="Of the normal images, the share flagged.")
    second[3].page_link("screens/review.py", label="Review these decisions",
                        icon=":material/fact_check:")


def _metrics_table(report: dict[str, Any], threshold: float) -> pd.DataFrame:
    """AUROC / AU-PRO overall and per defect type, with the recall at the threshold."""
    def caught(defect: str | None) -> str:
        labels, scores = _labels_scores(report, defect)
        counts = confusion_at(labels, scores, threshold)
        return f"{counts['tp']}/{counts['tp'] + counts['fn']}"

    rows = [{"defect": name, "images": entry["n"], "image AUROC": _pct(entry["image_auroc"]),
             "pixel AUROC": _pct(entry.get("pixel_auroc")), "AU-PRO": _pct(entry.get("au_pro")),
             "caught": caught(name)}
            for name, entry in report["per_defect"].items()]
    rows.append({"defect": "all defects", "images": report["n_defective"],
                 "image AUROC": _pct(report["image_auroc"]),
                 "pixel AUROC": _pct(report["pixel_auroc"]), "AU-PRO": _pct(report["au_pro"]),
                 "caught": caught(None)})
    return pd.DataFrame(rows)


def _image_curve_and_table(report: dict[str, Any], threshold: float,
                           counts: dict[str, float]) -> None:
    """What moves with the threshold besides the histogram: the image ROC's operating point,
    the pixels flagged, and each defect type's images caught."""
    left, right = st.columns(2)
    with left:
        st.markdown("**Image level**: one score per image; the marker sits at the threshold")
        point = {"fpr": counts["fpr"], "tpr": counts["tpr"], "threshold": threshold}
        st.plotly_chart(roc_figure({"image ROC": report["image_roc"]}, operating_point=point),
                        key="roc_image")
    with right:
        st.markdown("**Per defect type** at this threshold")
        st.dataframe(_metrics_table(report, threshold), hide_index=True)
        st.caption(f"AUROC and AU-PRO in %; AU-PRO integrates up to FPR 30%. Pixel metrics "
                   f"show {NO_VALUE} where masks are missing. 'caught': defective images "
                   "flagged at the current threshold.")
        if report.get("pixel_roc"):
            pixels = operating_point(report["pixel_roc"], threshold)
            st.markdown(f"Pixels at this threshold: **{_pct(pixels['tpr'])} %** of the defect "
                        f"pixels and **{_pct(pixels['fpr'])} %** of the normal ones flagged.")


def _curves(report: dict[str, Any]) -> None:
    """The pixel ROC and the per-defect ROC curves. They do not move with the threshold (the
    table beside the image ROC gives each defect's images caught there), so a threshold move
    redraws two figures, not four: under a training job that was ≈0.72 s → 0.46 s a move."""
    left, right = st.columns(2)
    with left:
        st.markdown("**Per defect type**: each defect's images against all the normal images")
        per_defect = {auroc_label(name, entry["image_auroc"]): entry["image_roc"]
                      for name, entry in report["per_defect"].items()}
        st.plotly_chart(roc_figure(per_defect), key="roc_per_defect")
        _warn_small({"normal": report["n_normal"]}
                    | {name: entry["n"] for name, entry in report["per_defect"].items()})
    with right:
        st.markdown("**Pixel level**: every pixel of the fused map against the masks")
        if report.get("pixel_roc"):
            st.plotly_chart(roc_figure({"pixel ROC": report["pixel_roc"]}), key="roc_pixel")
        else:
            st.info(f"Pixel AUROC and AU-PRO: {NO_VALUE}. Some defective test images have no "
                    "ground-truth mask, so pixel-level metrics cannot be computed.")


def _warn_small(counts: dict[str, int]) -> None:
    """A warning naming the classes too small for their AUROC to be compared."""
    small = small_classes(counts)
    if small:
        st.warning(f"Fewer than {SMALL_CLASS} images in: " + ", ".join(
            f"{name} ({counts[name]})" for name in small) + ". One image more or less moves "
            "their AUROC by a large step: do not compare them closely.")


def _category_models(chosen: state.Selection) -> dict[str, ModelEntry]:
    """One model per category of the chosen data: the picked one for this category; for the
    others the best of the picked backbone, else the best of any."""
    try:
        categories = state.categories(chosen.source)
        models: dict[str, ModelEntry] = {}
        for category in categories:
            if category == chosen.category:
                if chosen.entry is not None:
                    models[category] = chosen.entry
                continue
            best = (models_for(chosen.source.name, category, chosen.backbone)
                    or models_for(chosen.source.name, category))
            if best:
                models[category] = best[0]
    except (DataError, ManifestError) as error:
        st.warning(f"Cannot list the categories' models: {error}")
        return {}
    return models


def _category_evaluations(chosen: state.Selection) -> dict[str, tuple[ModelEntry,
                                                                         state.Evaluation]]:
    """What is known of each category's model on its test set (missing results are computed
    in the background, one model at a time)."""
    found = {}
    for category, entry in _category_models(chosen).items():
        other = dataclasses.replace(chosen, category=category, backbone=entry.backbone,
                                    entry=entry, models=(entry,))
        try:
            found[category] = (entry, state.stored_evaluation(other))
        except (RDError, OSError, ValueError) as error:
            st.warning(f"{category}: the model cannot be used: {error}")
    return found


@st.fragment(run_every=state.POLL_S)
def _wait_for_categories(chosen: state.Selection) -> None:
    """Rerun the page once every category's results are in."""
    if all(e.complete or e.error for _, e in _category_evaluations(chosen).values()):
        st.rerun()


def _across_categories(chosen: state.Selection) -> None:
    """Per-class ROC curves: every category of the chosen data that has a model, on one
    figure, each legend entry with its AUROC."""
    evaluations = _category_evaluations(chosen)
    curves, counts, rows, pending = {}, {}, [], []
    for category, (entry, found) in evaluations.items():
        report = found.report
        if report is None:
            pending.append(f"{category} ({found.done}/{found.total})" if not found.error
                           else f"{category} (failed: {found.error})")
            continue
        name = f"{category} ({entry.backbone})"
        curves[auroc_label(name, report["image_auroc"])] = report["image_roc"]
        counts[category] = report["n_images"]
        rows.append({"category": category, "backbone": entry.backbone,
                     "test images": report["n_images"],
                     "image AUROC %": _pct(report["image_auroc"]),
                     "pixel AUROC %": _pct(report["pixel_auroc"])})
    if pending:
        st.caption("Still being scored: " + ", ".join(pending) + "; they join the figure when "
                   "done.")
        if any("failed" not in p for p in pending):
            _wait_for_categories(chosen)
    if len(evaluations) < 2:
        st.caption(f"Only {chosen.category} of {chosen.source.name} has a model: train one on "
                   "another category to compare them here.")
        return
    if not curves:
        return
    _warn_small(counts)
    left, right = st.columns(2)
    left.plotly_chart(roc_figure(curves, title=f"Image ROC per category of "
                                               f"{chosen.source.name}"), key="roc_categories")
    right.dataframe(pd.DataFrame(rows), hide_index=True)
    right.caption("Each category with its own model and test set; thresholds are in each "
                  "model's own score units, so only the curves compare.")


def _compare(chosen: state.Selection) -> None:
    """Every registered backbone on this category: headline metrics and overlaid ROC curves."""
    try:
        entries = [e for e in all_models()
                   if (e.dataset, e.category) == (chosen.source.name, chosen.category)]
    except ManifestError as error:
        st.warning(f"Cannot list the other models: {error}")
        return
    if len(entries) < 2:
        st.caption(f"Only {chosen.backbone} is trained on {chosen.category}: train another "
                   "backbone on it to compare them here.")
        return
    rows, image_curves, pixel_curves = [], {}, {}
    for entry in sorted(entries, key=lambda e: e.backbone):
        try:
            entry.verify()
        except ManifestError as error:
            st.warning(f"{entry.backbone}: {error}")
            continue
        report = state.report_for(dataclasses.replace(chosen, backbone=entry.backbone,
                                                      entry=entry))
        if report is None:
            continue
        image_curves[entry.backbone] = report["image_roc"]
        if report.get("pixel_roc"):
            pixel_curves[entry.backbone] = report["pixel_roc"]
        per_image = 1000 * report["seconds"]["inference"] / report["n_images"]
        rows.append({"backbone": entry.backbone, "image size": report["image_size"],
                     "image AUROC %": _pct(report["image_auroc"]),
                     "pixel AUROC %": _pct(report["pixel_auroc"]),
                     "AU-PRO %": _pct(report["au_pro"]),
                     "F1 (best)": f"{report['thresholds']['f1']['f1']:.3f}",
                     "ms / image": f"{per_image:.0f}"})
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    left, right = st.columns(2)
    left.plotly_chart(roc_figure(image_curves, title="Image ROC"), key="compare_image")
    if pixel_curves:
        right.plotly_chart(roc_figure(pixel_curves, title="Pixel ROC"), key="compare_pixel")
    st.caption("Thresholds are in each backbone's own score units, so only the curves compare.")


@state.interactive_fragment
def _at_threshold(chosen: state.Selection, report: dict[str, Any]) -> None:
    """Everything that depends on the threshold; moving it reruns this part alone."""
    labels, scores = _labels_scores(report)
    st.subheader("Threshold")
    plot, controls = st.columns([3, 2])
    with controls:
        threshold = _threshold_controls(chosen, report, scores)
    counts = confusion_at(labels, scores, threshold)
    plot.plotly_chart(score_histogram(scores[labels == 0], scores[labels == 1], threshold),
                      key="histogram")
    st.markdown(f"**At threshold {threshold:.4f}** (shared with Inspect and Review)")
    _confusion(counts)
    _image_curve_and_table(report, threshold, counts)


def main() -> None:
    st.title("Evaluate")
    chosen, detector, report = state.require_report()
    state.current_threshold(chosen, detector, report)
    st.caption(f"{chosen.source.name} / {chosen.category} · {chosen.backbone} · "
               f"{report['n_images']} test images ({report['n_normal']} normal, "
               f"{report['n_defective']} defective) · {report['seconds']['total']:.1f} s")

    headline = st.columns(4)
    headline[0].metric("Image AUROC", _pct(report["image_auroc"]))
    headline[1].metric("Pixel AUROC", _pct(report["pixel_auroc"]))
    headline[2].metric("AU-PRO (FPR ≤ 30%)", _pct(report["au_pro"]))
    f1 = report["thresholds"]["f1"]
    headline[3].metric("Best F1", f"{f1['f1']:.3f}", help=f"at threshold {f1['threshold']:.4f}")

    _at_threshold(chosen, report)

    st.subheader("ROC curves")
    _curves(report)

    st.subheader("Per-class ROC curves")
    _across_categories(chosen)

    st.subheader("Backbones on this category")
    _compare(chosen)

    _novelty()


def _novelty() -> None:
    """Per-class ROC curves of a one-class novelty run (``python -m rd novelty``)."""
    with st.expander("One-class novelty detection runs (per-class ROC)"):
        upload = st.file_uploader("report.json written by python -m rd novelty", type=["json"],
                                  key="novelty_report", max_upload_size=20)
        if upload is None:
            st.caption("Each class in turn is the normal one and every other class anomalous; "
                       "one ROC curve per class.")
            return
        try:
            report = json.loads(upload.getvalue())
            rows, curves = novelty_summary(report)
        except (ValueError, UnicodeDecodeError) as error:
            st.error(f"Cannot read this report: {error}")
            return
        paper = (report.get("paper") or {}).get("mean")
        mean = report.get("mean_auroc")
        columns = st.columns(3)
        columns[0].metric("Dataset", str(report.get("dataset", "?")))
        columns[1].metric("Mean AUROC", "—" if mean is None else f"{100 * mean:.1f}")
        columns[2].metric("Paper mean", "—" if paper is None else f"{paper:.1f}")
        st.dataframe(pd.DataFrame(rows), hide_index=True)
        st.plotly_chart(roc_figure(curves, title="one curve per normal class"),
                        key="novelty_roc")


main()
