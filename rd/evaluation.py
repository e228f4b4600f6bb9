"""Dataset -> maps -> metrics -> one JSON-ready report (REFERENCE.md §4)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rd import metrics
from rd.data import ImageDataset, Sample, read_mask, resize_mask
from rd.detector import Detector
from rd.errors import RDError
from rd.files import atomic_write
from rd.model import Prediction
from rd.runtime import OnnxDetector

TARGET_FPRS = (0.01, 0.05, 0.1)
# Where pixel metrics are computed: "model" S×S maps and masks (the paper's), or "native": the
# images' original size (maps upsampled, masks as stored).
EVAL_SIZES = ("model", "native")


class EvaluationError(RDError, ValueError):
    """The test set cannot be evaluated as asked."""


ProgressCallback = Callable[[int, int], None]  # (images done, images in all)


def predict_samples(detector: Detector, samples: Sequence[Sample], progress: bool = False,
                    workers: int = 0, on_progress: ProgressCallback | None = None,
                    eval_size: str = "model") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused maps (N, S, S), masks (N, S, S) bool and scores (N,) of ``samples``; with
    ``eval_size="native"`` (or a letterbox / tile checkpoint) maps and masks come at the
    images' size (``native``) or are resized to S×S (``model``)."""
    if eval_size not in EVAL_SIZES:
        raise EvaluationError(f"--eval-size must be one of {EVAL_SIZES}, got {eval_size!r}")
    if eval_size == "native" or not detector.geometry.is_paper:
        return _predict_native(detector, samples, progress, on_progress, eval_size)
    dataset = ImageDataset(samples, detector.preprocess)
    steps = (_in_lanes(detector, dataset) if isinstance(detector, OnnxDetector) and not workers
             else _through_loader(detector, dataset, workers))
    maps, masks, scores = [], [], []
    with tqdm(total=len(dataset), desc="evaluate", unit="image", disable=not progress,
              file=sys.stderr) as bar:
        for prediction, step_masks in steps:
            maps.append(prediction.fused.cpu().numpy())
            scores.append(prediction.scores.cpu().numpy())
            masks.append(step_masks)
            bar.update(len(step_masks))
            if on_progress:
                on_progress(sum(len(m) for m in maps), len(dataset))
    return np.concatenate(maps), np.concatenate(masks), np.concatenate(scores)


def _through_loader(detector: Detector, dataset: ImageDataset, workers: int
                    ) -> Iterator[tuple[Prediction, np.ndarray]]:
    """Batches read by a DataLoader (``workers`` processes, or this one) and scored."""
    for batch in DataLoader(dataset, batch_size=detector.batch_size, num_workers=workers):
        yield detector.predict_tensor(batch["image"]), batch["mask"][:, 0].numpy() > 0.5


def _in_lanes(detector: OnnxDetector, dataset: ImageDataset
              ) -> Iterator[tuple[Prediction, np.ndarray]]:
    """Chunks read and scored in the model's lanes (ONNX Runtime on a CPU): reading overlaps
    the model without preempting it (``OnnxDetector.predict_in_lanes``)."""

    def read(index: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, mask = dataset.pixels_and_mask(index)
        return mask, pixels

    for masks, prediction, _ in detector.predict_in_lanes(len(dataset), read):
        yield prediction, np.stack(masks)


def _predict_native(detector: Detector, samples: Sequence[Sample], progress: bool,
                    on_progress: ProgressCallback | None, eval_size: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    size = (detector.image_size, detector.image_size)
    maps, masks, scores = [], [], []
    for sample in tqdm(samples, desc="evaluate", unit="image", disable=not progress,
                       file=sys.stderr):
        native = detector.predict_native(sample.path)
        fused = native.fused.float()
        mask = (read_mask(sample.mask_path) if sample.mask_path is not None
                else np.zeros(tuple(fused.shape), dtype=bool))
        if mask.shape != tuple(fused.shape):
            raise EvaluationError(f"{sample.mask_path}: mask is {mask.shape} but image "
                                  f"{sample.path} is {tuple(fused.shape)} (h, w)")
        if eval_size == "model":
            fused = F.interpolate(fused[None, None], size=size, mode="bilinear",
                                  align_corners=False)[0, 0]
            mask = resize_mask(mask, size)
        maps.append(fused.cpu().numpy())
        masks.append(mask)
        scores.append(native.score)
        if on_progress:
            on_progress(len(maps), len(samples))
    if len({m.shape for m in maps}) > 1:
        raise EvaluationError("--eval-size native needs test images of one size; use "
                              "--eval-size model")
    return np.stack(maps), np.stack(masks), np.array(scores, dtype=np.float32)


def evaluate(detector: Detector, samples: Sequence[Sample], legacy_pro: bool = False,
             progress: bool = False, workers: int = 0,
             on_progress: ProgressCallback | None = None, eval_size: str = "model"
             ) -> dict[str, Any]:
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
    maps, masks, scores = predict_samples(detector, samples, progress, workers, on_progress,
                                          eval_size)
    inference_seconds = time.perf_counter() - started
    has_masks = all(s.mask_path is not None for s in samples if s.label == 1)
    defects = np.array([s.defect for s in samples])
    normal = labels == 0

    report: dict[str, Any] = {
        "backbone": detector.backbone,
        "image_size": detector.image_size,
        **({} if eval_size == "model" else {"eval_size": eval_size}),
        "teacher_weights": detector.metadata.teacher_weights,
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
    if has_masks:  # pixels sorted once per defect type, shared by every pixel metric below
        pixels = metrics.PixelScores(masks, maps, np.where(normal, "", defects))
        report["pixel_auroc"] = pixels.auroc()
        report["au_pro"] = pixels.au_pro()
        report["pixel_roc"] = pixels.roc_curve()
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
            entry["pixel_auroc"] = pixels.auroc(["", defect])
            entry["au_pro"] = pixels.au_pro(["", defect])
        report["per_defect"][defect] = entry
    report["images"] = [
        {"path": str(s.path), "defect": s.defect, "label": int(s.label), "score": float(score)}
        for s, score in zip(samples, scores, strict=True)
    ]
    report["seconds"] = {"inference": round(inference_seconds, 3),
                         "total": round(time.perf_counter() - started, 3)}
    return report


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Table rows (name, n, image AUROC, pixel AUROC, AU-PRO) for printing."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    rows = [(name, str(entry["n"]), pct(entry["image_auroc"]), pct(entry.get("pixel_auroc")),
             pct(entry.get("au_pro"))) for name, entry in report["per_defect"].items()]
    rows.append(("all", str(report["n_images"]), pct(report["image_auroc"]),
                 pct(report["pixel_auroc"]), pct(report["au_pro"])))
    return rows


def format_summary(report: Mapping[str, Any]) -> str:
    """The per-defect metrics as an aligned text table (what ``train`` and ``evaluate`` print)."""
    header = ("defect", "n", "img AUROC", "px AUROC", "AU-PRO")
    rows = [header, *summary_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    if "legacy_pro" in report:
        lines.append(f"legacy per-image PRO (reference code): {100 * report['legacy_pro']:.1f}")
    return "\n".join(lines)


# Headline numbers a report must hold as numbers (or null where a test set has no masks).
_COUNTS = ("n_images", "n_normal", "n_defective")
_RATES = ("image_auroc", "pixel_auroc", "au_pro")


@dataclass(frozen=True)
class EvaluationReport(Mapping[str, Any]):
    """An evaluation report (what ``evaluate`` returns, and ``<checkpoint>.report.json``).

    ``from_dict`` reads today's reports and older ones (fields they lack are None or empty) and
    names a field of the wrong type; ``to_dict`` gives back the same JSON, keys in their order.
    Like CheckpointMetadata it is also a read-only mapping of that JSON.
    """

    n_images: int
    n_normal: int
    n_defective: int
    image_auroc: float | None
    pixel_auroc: float | None = None
    au_pro: float | None = None
    backbone: str | None = None
    image_size: int | None = None
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    normal_scores: dict[str, float] | None = None
    per_defect: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # ROC curves, timings, legacy_pro...
    key_order: tuple[str, ...] = ()  # the keys read, in their order: to_dict writes just those

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "report") -> EvaluationReport:
        if isinstance(values, EvaluationReport):
            return values
        if not isinstance(values, Mapping):
            raise EvaluationError(f"{source}: not an evaluation report (a JSON object expected)")

        def bad(name: str, wanted: str) -> EvaluationError:
            return EvaluationError(f"{source}: {name} must be {wanted}, got "
                                   f"{values.get(name)!r:.60}")

        for name in _COUNTS:
            if not isinstance(values.get(name), int) or isinstance(values[name], bool):
                raise bad(name, "a whole number")
        for name in _RATES:
            value = values.get(name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise bad(name, "a number or null")
        for name in ("thresholds", "per_defect"):
            if not isinstance(values.get(name, {}), Mapping):
                raise bad(name, "an object")
        if not isinstance(values.get("images", []), list):
            raise bad("images", "a list")
        known = {f.name for f in fields(cls)} - {"extra", "key_order"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known},
                   key_order=tuple(values))

    @classmethod
    def read(cls, path: str | Path) -> EvaluationReport:
        """A report file; EvaluationError if it is no readable report."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise EvaluationError(f"cannot read the report {path}: {error}") from None
        return cls.from_dict(values, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON, as ``evaluate`` made it."""
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("extra", "key_order")}
        values.update(self.extra)
        if not self.key_order:  # made here, not read: every field
            return values
        keys = [*self.key_order, *(k for k in self.extra if k not in self.key_order)]
        return {k: values[k] for k in keys if k in values}

    def write(self, path: str | Path) -> None:
        """Write the JSON (indented), atomically."""
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def __getitem__(self, key: str) -> Any:
        return self._stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    @cached_property
    def _stored(self) -> dict[str, Any]:
        return self.to_dict()

    def threshold(self, kind: str = "f1") -> float | None:
        """A suggested decision threshold ("f1", "fpr_0.01"...), None if the report has none."""
        entry = self.thresholds.get(kind) or {}
        value = entry.get("threshold")
        return None if value is None else float(value)

    def summary(self) -> dict[str, Any]:
        """The headline numbers and thresholds, as a checkpoint's metadata stores them."""
        return {**{k: getattr(self, k) for k in (*_RATES, *_COUNTS)},
                "thresholds": {k: v["threshold"] for k, v in self.thresholds.items()}}

    def table(self) -> str:
        return format_summary(self)
