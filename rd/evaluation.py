"""Dataset -> maps -> metrics -> one JSON-ready report (REFERENCE.md §4)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rd import metrics
from rd.data import ImageDataset, Sample
from rd.detector import Detector

TARGET_FPRS = (0.01, 0.05, 0.1)


class EvaluationError(ValueError):
    """The test set cannot be evaluated as asked."""


ProgressCallback = Callable[[int, int], None]  # (images done, images in all)


def predict_samples(detector: Detector, samples: Sequence[Sample], progress: bool = False,
                    workers: int = 0, on_progress: ProgressCallback | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused maps (N, S, S), masks (N, S, S) bool and scores (N,) of ``samples``."""
    dataset = ImageDataset(samples, detector.preprocess)
    loader = DataLoader(dataset, batch_size=detector.batch_size, num_workers=workers)
    maps, masks, scores = [], [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress,
                      file=sys.stderr):
        prediction = detector.predict_tensor(batch["image"])
        maps.append(prediction.fused.cpu().numpy())
        scores.append(prediction.scores.cpu().numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        if on_progress:
            on_progress(sum(len(m) for m in maps), len(dataset))
    return np.concatenate(maps), np.concatenate(masks), np.concatenate(scores)


def evaluate(detector: Detector, samples: Sequence[Sample], legacy_pro: bool = False,
             progress: bool = False, workers: int = 0,
             on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Every metric of one test set, per defect type too, in one JSON-serialisable dict."""
    if not samples:
        raise EvaluationError("the test set is empty")
    labels = np.array([s.label for s in samples])
    if (labels < 0).any():
        raise EvaluationError("some test images have no label (plain folder without masks or "
                              "good/ subfolder): evaluation needs normal and defective labels")
    if labels.min() == labels.max():
        raise EvaluationError("the test set needs both normal and defective images to compute "
                              f"AUROC; it has only {'defective' if labels[0] else 'normal'} ones")
    started = time.perf_counter()
    maps, masks, scores = predict_samples(detector, samples, progress, workers, on_progress)
    inference_seconds = time.perf_counter() - started
    has_masks = all(s.mask_path is not None for s in samples if s.label == 1)
    defects = np.array([s.defect for s in samples])
    normal = labels == 0

    report: dict[str, Any] = {
        "backbone": detector.backbone,
        "image_size": detector.image_size,
        "teacher_weights": detector.metadata.get("teacher_weights"),
        "n_images": len(samples),
        "n_normal": int(normal.sum()),
        "n_defective": int((~normal).sum()),
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": None,
        "au_pro": None,
        "image_roc": metrics.roc_curve_points(labels, scores),
        "pixel_roc": None,
        "thresholds": {
            "f1": metrics.f1_optimal_threshold(labels, scores),
            **{f"fpr_{target:g}": metrics.threshold_at_fpr(labels, scores, target)
               for target in TARGET_FPRS},
        },
        "normal_scores": metrics.score_statistics(scores[normal]),
        "defective_scores": metrics.score_statistics(scores[~normal]),
    }
    if has_masks:
        report["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        report["au_pro"] = metrics.au_pro(masks, maps)
        report["pixel_roc"] = metrics.pixel_roc_curve(masks, maps)
        if legacy_pro:
            report["legacy_pro"] = metrics.legacy_pro(masks, maps)
    report["per_defect"] = {}
    for defect in sorted(set(defects[~normal])):
        subset = normal | (defects == defect)
        entry = {
            "n": int((defects == defect).sum()),
            "image_auroc": metrics.image_auroc(labels[subset], scores[subset]),
            "image_roc": metrics.roc_curve_points(labels[subset], scores[subset]),
        }
        if has_masks:
            entry["pixel_auroc"] = metrics.pixel_auroc(masks[subset], maps[subset])
            entry["au_pro"] = metrics.au_pro(masks[subset], maps[subset])
        report["per_defect"][defect] = entry
    report["images"] = [
        {"path": str(s.path), "defect": s.defect, "label": int(s.label), "score": float(score)}
        for s, score in zip(samples, scores, strict=True)
    ]
    report["seconds"] = {"inference": round(inference_seconds, 3),
                         "total": round(time.perf_counter() - started, 3)}
    return report


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Table rows (name, n, image AUROC, pixel AUROC, AU-PRO) for printing."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    rows = [(name, str(entry["n"]), pct(entry["image_auroc"]), pct(entry.get("pixel_auroc")),
             pct(entry.get("au_pro"))) for name, entry in report["per_defect"].items()]
    rows.append(("all", str(report["n_images"]), pct(report["image_auroc"]),
                 pct(report["pixel_auroc"]), pct(report["au_pro"])))
    return rows
