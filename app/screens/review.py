"""Review: every test image sorted into missed defects, false alarms, hits and passes at the
shared threshold, worst mistakes first, with each image's layer-by-layer maps on request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from app import state
from app.views.curves import review_groups
from app.views.detail import LAYER_NAMES, layer_context
from app.views.images import (
    COLOUR_MODES,
    CONTOUR_PREDICTED,
    CONTOUR_TRUTH,
    ScaleContext,
    blend,
    draw_contour,
    heat_map,
    to_rgb_array,
)
from rd.data import DataError, read_image, read_mask
from rd.decision import is_defective

GRID_COLUMNS = 6
TILE_BATCH = 4  # detections computed together (rd.detector.CPU_CHUNK)
TILE_LIMITS = (12, 24, 48, 0)  # 0: all
TITLES = {"FN": "Missed defects (false negatives)", "FP": "False alarms (false positives)",
          "TP": "Caught defects (true positives)", "TN": "Passed normal images (true negatives)"}
VERDICTS = {"FN": "missed defect", "FP": "false alarm", "TP": "caught defect",
            "TN": "normal image passed"}
EXPLAIN = {
    "FN": "Defective images scoring below the threshold; lowest score first (most confidently "
          "missed).",
    "FP": "Normal images scoring at or above the threshold; highest score first (most "
          "confident false alarm).",
    "TP": "Defective images flagged; closest to the threshold first (nearly missed).",
    "TN": "Normal images passed; closest to the threshold first (nearly flagged).",
}


@st.cache_data(show_spinner=False, max_entries=4096)
def _picture(path: str, mtime: float, mask_path: str | None, size: int
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as the model saw it and its ground-truth mask at the same size (cached)."""
    del mtime
    base = to_rgb_array(read_image(path), size)
    return base, read_mask(mask_path, (size, size)) if mask_path else None


def _maps(chosen: state.Selection, detector, items: list[dict[str, Any]]
          ) -> dict[str, state.ImageDetection]:
    """Detections of the tiles on screen only, computed in batches of a few (uncached ones
    together), with a progress bar."""
    bar = st.progress(0.0, text="Computing heat maps…")
    maps = {}
    for start in range(0, len(items), TILE_BATCH):
        chunk = items[start: start + TILE_BATCH]
        try:
            found = state.detect_many(chosen, detector, [Path(i["path"]) for i in chunk])
            maps.update({i["path"]: f for i, f in zip(chunk, found, strict=True)})
        except (DataError, OSError):  # one unreadable image: the others one by one
            for item in chunk:
                try:
                    maps[item["path"]] = state.detect(chosen, detector, Path(item["path"]))
                except (DataError, OSError) as error:
                    st.warning(f"{Path(item['path']).name}: {error}")
        done = min(len(items), start + TILE_BATCH)
        bar.progress(done / len(items), text=f"Computing heat maps… {done}/{len(items)}")
    bar.empty()
    return maps


def _overlay(picture: tuple[np.ndarray, np.ndarray | None], fused: np.ndarray,
             options: dict[str, Any], context: ScaleContext) -> np.ndarray:
    """A tile: the heat map over the image, ground truth outlined in green."""
    base, mask = picture
    image = blend(base, heat_map(fused, options["mode"], context), options["opacity"])
    if options["predicted"]:
        image = draw_contour(image, is_defective(fused, context.threshold), CONTOUR_PREDICTED, 1)
    if mask is not None:
        image = draw_contour(image, mask, CONTOUR_TRUTH, 2)
    return image


def _peaks(values: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    """A map's highest value, and inside / outside the ground truth when there is one."""
    peaks = {"peak": float(values.max())}
    if mask is not None and mask.any() and (~mask).any():
        peaks["peak in defect"] = float(values[mask].max())
        peaks["peak elsewhere"] = float(values[~mask].max())
    return peaks


@st.dialog("Layer by layer", width="large")
def _layers(key: str, item: dict[str, Any], picture: tuple[np.ndarray, np.ndarray | None],
            found: state.ImageDetection, options: dict[str, Any], context: ScaleContext
            ) -> None:
    """The three per-layer maps and the fused one: which layer saw the defect, which missed."""
    _, mask = picture
    side = "above" if found.is_defective(context.threshold) else "below"
    st.markdown(f"**{item['defect']}/{Path(item['path']).name}** · {VERDICTS[key]} · score "
                f"{item['score']:.4f}, {abs(item['score'] - context.threshold):.4f} {side} "
                f"the threshold {context.threshold:.4f}")
    columns = st.columns(5)
    columns[0].image(_overlay(picture, found.fused, options, context), output_format="PNG",
                     caption="overlay", width="stretch")
    per_layer = layer_context(context)
    for column, layer, name in zip(columns[1:4], found.layer_maps, LAYER_NAMES, strict=True):
        column.image(heat_map(layer, options["mode"], per_layer), caption=name,
                     output_format="PNG", width="stretch")
    fused = found.fused
    columns[4].image(heat_map(fused, options["mode"], context), caption="fused",
                     output_format="PNG", width="stretch")
    rows = [{"map": name, **_peaks(layer, mask)}
            for name, layer in zip(LAYER_NAMES, found.layer_maps, strict=True)]
    rows.append({"map": "fused (sum, smoothed)", **_peaks(fused, mask)})
    st.dataframe(pd.DataFrame(rows), hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.4f")
                                for c in rows[0] if c != "map"})
    st.caption(("A layer whose peak lies inside the ground truth found the defect; one whose "
                "peak lies elsewhere was drawn to something else. " if len(rows[0]) > 2
                else "No ground-truth region for this image. ")
               + "Layer colours use a third of the fused scale (the fused map sums the three).")


def _gallery(key: str, items: list[dict[str, Any]], chosen: state.Selection, detector,
             masks: dict[str, Path | None], options: dict[str, Any], context: ScaleContext
             ) -> None:
    """One decision group: header with its count, then its tiles, worst first."""
    st.subheader(f"{TITLES[key]} · {len(items)}")
    st.caption(EXPLAIN[key])
    if not items:
        st.caption("None at this threshold.")
        return
    shown = items[: options["limit"]] if options["limit"] else items
    if len(shown) < len(items):
        st.caption(f"Showing the first {len(shown)} of {len(items)}.")
    maps = _maps(chosen, detector, shown)
    for row in range(0, len(shown), GRID_COLUMNS):
        columns = st.columns(GRID_COLUMNS)
        for column, item in zip(columns, shown[row: row + GRID_COLUMNS], strict=False):
            path = Path(item["path"])
            mask_path = masks.get(item["path"])
            try:
                picture = _picture(item["path"], path.stat().st_mtime,
                                   str(mask_path) if mask_path else None, detector.image_size)
            except (DataError, OSError) as error:
                column.warning(f"{path.name}: {error}")
                continue
            if item["path"] not in maps:
                continue
            fused = maps[item["path"]].fused
            column.image(_overlay(picture, fused, options, context), output_format="PNG",
                         caption=f"{item['defect']}/{path.name} · {item['score']:.3f} "
                                 f"({item['margin']:+.3f})", width="stretch")
            if column.button("Layers", key=f"review::{key}::{item['path']}", width="stretch",
                             icon=":material/layers:"):
                _layers(key, item, picture, maps[item["path"]], options, context)


@st.fragment(run_every=state.POLL_S)
def _wait(chosen: state.Selection, detector, shown: int) -> None:
    """While the test set is being scored: progress, and a full redraw when more is known."""
    found = state.evaluation(chosen, detector)
    if found.complete or len(found.scores) >= shown + GRID_COLUMNS:
        st.rerun()
    st.progress(found.done / max(1, found.total),
                text=f"Scoring the test set… {found.done}/{found.total} images (galleries "
                     "fill in as scores arrive; the results are kept)")


def _items(chosen: state.Selection, scores: dict[str, float]) -> list[dict[str, Any]]:
    """The test images that have a stored score, as review records."""
    return [{"path": str(s.path), "defect": s.defect, "label": int(s.label),
             "score": scores[str(s.path)]}
            for s in state.test_samples(chosen) if str(s.path) in scores and s.label >= 0]


def main() -> None:
    st.title("Review")
    chosen, detector = state.require_model()
    found = state.evaluation(chosen, detector)
    if found.error and not found.scores:
        st.error(f"Cannot score {chosen.category}: {found.error}")
        st.stop()
    threshold = state.current_threshold(chosen, detector, found.report)
    head = st.columns([4, 1])
    head[0].caption(f"{chosen.source.name} / {chosen.category} · {chosen.backbone} · "
                    f"threshold {threshold:.4f} · tile captions: score (margin on the correct "
                    "side of the threshold; negative = wrong)")
    head[1].page_link("screens/evaluate.py", label="Change the threshold",
                      icon=":material/tune:")
    if not found.complete:
        _wait(chosen, detector, len(found.scores))

    controls = st.columns([3, 1, 1, 1])
    modes = list(COLOUR_MODES)
    mode = controls[0].radio("Colour scale", modes, index=modes.index("threshold"),
                             horizontal=True, key="review_colour_mode")
    controls[0].caption(COLOUR_MODES[mode])
    options = {
        "mode": mode,
        "opacity": controls[1].slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05,
                                      key="review_opacity"),
        "limit": controls[2].selectbox("Tiles per gallery", TILE_LIMITS, key="review_limit",
                                       format_func=lambda n: str(n) if n else "all"),
        "predicted": controls[3].toggle("Predicted", value=False,
                                        key="review_predicted",
                                        help="magenta: fused map ≥ threshold; green (always): "
                                             "ground truth"),
    }
    items = _items(chosen, found.scores)
    if not items:
        st.stop()
    normal = (detector.metadata.normal_scores
              or (found.report or {}).get("normal_scores") or {})
    category_max = max(item["score"] for item in items)
    context = ScaleContext(category_max, normal.get("p99"), threshold)
    masks = {str(s.path): s.mask_path for s in state.test_samples(chosen)}
    for key, group in review_groups(items, threshold).items():
        _gallery(key, group, chosen, detector, masks, options, context)


main()
