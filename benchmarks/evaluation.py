"""Evaluation speed: a full report for a generated 110-image category, and AU-PRO alone.

Ours is ``rd.evaluation.evaluate`` with ``legacy_pro=True`` and the default runtime of a CPU
(our exported graph in ONNX Runtime, rd.runtime): batched inference, then every metric
of the report (image and pixel AUROC, standard AU-PRO, legacy per-image PRO, ROC curves,
thresholds, score statistics, and the same per defect type). The baseline is the reference's
test loop (``benchmarks.baseline.reference_inference`` then ``reference_metrics``): one image at
a time read and run through the reference model, pixel lists, scikit-learn AUROC and the
per-image PRO loop — three numbers where our report has dozens. So the metrics are also timed
for the reference's three numbers alone, computed our way. Both use the same weights; the numbers
they share must agree (AUROC to 1e-6, PRO to 1e-3).

The category is the generated ``hex_nut`` part (rd.data.synthetic) at 256 px: 40 normal and
5 × 14 defective test images. The model is efficientnet_lite0 with its ImageNet teacher when the
weights package is installed (random otherwise) and a student from a fixed seed: its maps are
not those of a trained model, but the work done is the same.

    python -m benchmarks.evaluation
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.baseline import (
    ReferenceRD,
    reference_image_pro,
    reference_inference,
    reference_metrics,
    reference_predict,
    threshold_loop_au_pro,
)
from benchmarks.common import (
    apply_threads,
    base_parser,
    detector_metadata,
    machine,
    print_table,
    write_json,
)
from benchmarks.inference import onnx_detector
from rd import metrics
from rd.backbones import WeightsError
from rd.data import ImageDataset, MVTecCategory, generate_dataset
from rd.detector import Detector
from rd.evaluation import evaluate, predict_samples
from rd.model import build_model

BACKBONE = "efficientnet_lite0"


def _model(seed: int = 0):
    torch.manual_seed(seed)
    try:
        return build_model(BACKBONE, pretrained=True), "ImageNet teacher, seeded random student"
    except WeightsError:
        torch.manual_seed(seed)
        return build_model(BACKBONE, pretrained=False), "random teacher and student"


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/evaluation.json")
    parser.add_argument("--data", type=Path, help="where to generate the category (default: a "
                        "temporary folder)")
    parser.add_argument("--normal", type=int, default=40, help="normal test images")
    parser.add_argument("--per-defect", type=int, default=14, help="test images per defect kind")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0,
                        help="evaluate's image-decoding processes (rd evaluate --workers)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.normal, args.per_defect, args.size = 4, 2, 64
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as scratch:
        root = generate_dataset(args.data or Path(scratch), ["hex_nut"], n_train=1,
                                n_test_good=args.normal, n_per_defect=args.per_defect)
        samples = MVTecCategory(root, "hex_nut").test_samples()
        model, weights = _model()
        torch_detector = Detector(model, detector_metadata(BACKBONE, args.size), device)
        # what `rd evaluate` runs by default on a CPU: the exported graph in ONNX Runtime
        detector = onnx_detector(torch_detector, Path(scratch))
        reference = ReferenceRD(model)
        dataset = ImageDataset(samples, detector.preprocess)

        # ours: the whole report, and the share of it that is inference
        predict_samples(detector, samples[:4])  # warm-up: first-call set-up costs
        ours_total, report = _timed(lambda: evaluate(detector, samples, legacy_pro=True,
                                                     workers=args.workers))
        ours_inference = report["seconds"]["inference"]
        maps, masks, scores = predict_samples(detector, samples)
        labels = [s.label for s in samples]
        same_s, _ = _timed(lambda: (metrics.image_auroc(labels, scores),
                                    metrics.pixel_auroc(masks, maps),
                                    metrics.legacy_pro(masks, maps)))

        # baseline: the reference's loop (reading images included), inference and metrics
        # timed apart
        reference_predict(reference, dataset[0]["image"][None])  # warm-up
        base_inference, (base_maps, _, _) = _timed(
            lambda: reference_inference(reference, dataset))
        base_metrics_s, base = _timed(lambda: reference_metrics(labels, masks, base_maps))
        base_total = base_inference + base_metrics_s

        # AU-PRO alone, on our maps
        au_pro_s, au_pro = _timed(lambda: metrics.au_pro(masks, maps))
        loop_s, loop_au_pro = _timed(lambda: threshold_loop_au_pro(masks, maps))
        legacy_s, legacy = _timed(lambda: metrics.legacy_pro(masks, maps))
        anomalous = [i for i, m in enumerate(masks) if m.any()]
        per_image_s, per_image = _timed(lambda: float(np.mean(
            [reference_image_pro(masks[i], maps[i]) for i in anomalous])))

    n = len(samples)
    results: dict[str, Any] = {
        "machine": machine(device), "images": n, "size": args.size, "weights": weights,
        "report": {
            "ours_s": ours_total, "ours_inference_s": ours_inference,
            "ours_metrics_s": ours_total - ours_inference,
            "baseline_s": base_total, "baseline_inference_s": base_inference,
            "baseline_metrics_s": base_metrics_s,
            "ratio": base_total / ours_total,
            "ratio_metrics": base_metrics_s / (ours_total - ours_inference),
            "ratio_inference": base_inference / ours_inference,
            "ours_same_metrics_s": same_s, "ratio_same_metrics": base_metrics_s / same_s,
        },
        "numbers": {
            "image_auroc": (report["image_auroc"], base["image_auroc"]),
            "pixel_auroc": (report["pixel_auroc"], base["pixel_auroc"]),
            "legacy_pro": (report["legacy_pro"], base["legacy_pro"]),
        },
        "max_map_diff": float(np.abs(maps - base_maps).max()),
        "au_pro": {
            "standard_s": au_pro_s, "standard": au_pro,
            "threshold_loop_s": loop_s, "threshold_loop": loop_au_pro,
            "legacy_s": legacy_s, "legacy": legacy,
            "reference_per_image_s": per_image_s, "reference_per_image": per_image,
        },
    }
    r, num, pro = results["report"], results["numbers"], results["au_pro"]
    print_table(
        f"Evaluation report, {n} images at {args.size} px, {BACKBONE}, CPU: seconds",
        ["part", "ours s", "baseline s", "ratio"],
        [["inference", r["ours_inference_s"], r["baseline_inference_s"], r["ratio_inference"]],
         ["metrics: the whole report", r["ours_metrics_s"], r["baseline_metrics_s"],
          r["ratio_metrics"]],
         ["metrics: the reference's 3 numbers", same_s, r["baseline_metrics_s"],
          r["ratio_same_metrics"]],
         ["whole report (inference + all metrics)", r["ours_s"], r["baseline_s"],
          r["ratio"]]])
    print_table(
        "Same numbers (ours, baseline, |difference|)",
        ["metric", "ours", "baseline", "|Δ|"],
        [[k, a, b, abs(a - b)] for k, (a, b) in num.items()]
        + [["maps (max over pixels)", None, None, results["max_map_diff"]]])
    print_table(
        "AU-PRO alone (on our maps): seconds",
        ["what", "ours s", "baseline s", "ratio", "ours", "baseline", "|Δ|"],
        [["standard AU-PRO (exact) vs 200-threshold loop", pro["standard_s"],
          pro["threshold_loop_s"], pro["threshold_loop_s"] / pro["standard_s"], pro["standard"],
          pro["threshold_loop"], abs(pro["standard"] - pro["threshold_loop"])],
         ["legacy per-image PRO vs reference loop", pro["legacy_s"],
          pro["reference_per_image_s"], pro["reference_per_image_s"] / pro["legacy_s"],
          pro["legacy"], pro["reference_per_image"],
          abs(pro["legacy"] - pro["reference_per_image"])]])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
