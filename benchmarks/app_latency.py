"""The app's time from choosing an image to its maps on screen, efficientnet_lite0 on the CPU.

What the Inspect page does for an image it has not shown before (app/screens/inspect.py), the
model already loaded: read the image, ``Detector.predict`` on its path, read its mask, then the
detail block of app/views/detail.py (the pictures every page shows: fused heat map, overlay with
both contours, three layer maps, colour bar, at the image's own aspect ratio) and the PNG
encoding ``st.image`` does for each picture. Streamlit's
own round trip is not included. The baseline replaces ``Detector.predict`` with the reference's
one-image path (benchmarks.baseline.reference_predict); the colouring is the same.

Images: hazelnut test images of the real subset (256² PNGs) when ``../shared`` is there, else
generated 256² parts. The first image after loading is reported apart (one-off set-up costs).

    python -m benchmarks.app_latency
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from app.views.detail import detail_pictures, png_bytes
from app.views.images import ScaleContext
from benchmarks.baseline import SIGMA, ReferenceRD, reference_map
from benchmarks.common import (
    apply_threads,
    base_parser,
    detector_metadata,
    machine,
    print_table,
    write_json,
)
from benchmarks.evaluation import BACKBONE, _model
from benchmarks.training import HAZELNUT
from rd.data import MVTecCategory, Sample, generate_dataset, read_image, read_mask
from rd.detector import Detector

TARGET_S = 0.5


def show(image: Image.Image, mask: np.ndarray | None, layer_maps: np.ndarray,
         fused: np.ndarray, threshold: float) -> int:
    """The Inspect page's pictures of one image, PNG-encoded; returns the bytes written."""
    context = ScaleContext(category_max=2 * threshold, normal_p99=0.8 * threshold,
                           threshold=threshold)
    pictures = detail_pictures(image, layer_maps, fused, mask, context, "calibrated")
    shown = [pictures.base, pictures.overlay, pictures.heat, pictures.bar, *pictures.layers]
    if pictures.mask is not None:
        shown.append(pictures.mask.astype(np.uint8) * 255)
    return sum(len(png_bytes(picture)) for picture in shown)


def choose(sample: Sample, predict: Callable[[Sample], tuple[np.ndarray, np.ndarray, float]]
           ) -> float:
    """Seconds from choosing ``sample`` to its encoded pictures."""
    start = time.perf_counter()
    image = read_image(sample.path)
    layer_maps, fused, score = predict(sample)
    mask = read_mask(sample.mask_path) if sample.mask_path else None
    show(image, mask, layer_maps, fused, threshold=max(score, 1e-3))
    return time.perf_counter() - start


def _samples(folder: Path, count: int) -> list[Sample]:
    if HAZELNUT.is_dir():
        samples = MVTecCategory(HAZELNUT, "hazelnut").test_samples()
    else:
        root = generate_dataset(folder, ["hex_nut"], n_train=1, n_test_good=4, n_per_defect=4)
        samples = MVTecCategory(root, "hex_nut").test_samples()
    return samples[:count]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/app_latency.json")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.images, args.size = 3, 64
    device = torch.device("cpu")
    model, weights = _model()
    detector = Detector(model, detector_metadata(BACKBONE, args.size), device)
    reference = ReferenceRD(model)

    def ours(sample: Sample) -> tuple[np.ndarray, np.ndarray, float]:
        detection = detector.predict([sample.path])
        return detection.layer_maps[0], detection.fused[0], float(detection.scores[0])

    def baseline(sample: Sample) -> tuple[np.ndarray, np.ndarray, float]:
        batch = detector.to_batch([sample.path])
        with torch.enable_grad():
            features, rebuilt = reference(batch)
            fused, layers = reference_map(features, rebuilt, args.size)
        smoothed = ndimage.gaussian_filter(fused, SIGMA)
        return np.stack(layers), smoothed, float(smoothed.max())

    with tempfile.TemporaryDirectory() as folder:
        samples = _samples(Path(folder), args.images + 1)
        first_ours = choose(samples[0], ours)
        first_base = choose(samples[0], baseline)
        ours_times = [choose(s, ours) for s in samples[1:]]
        base_times = [choose(s, baseline) for s in samples[1:]]
    results: dict[str, Any] = {
        "machine": machine(device), "weights": weights, "images": len(ours_times),
        "size": args.size, "source": "hazelnut" if HAZELNUT.is_dir() else "generated hex_nut",
        "first_s": first_ours, "median_s": statistics.median(ours_times),
        "max_s": max(ours_times), "baseline_first_s": first_base,
        "baseline_median_s": statistics.median(base_times),
        "target_s": TARGET_S, "met": max(ours_times) < TARGET_S,
    }
    print_table(
        f"App: choose an image -> its maps, {BACKBONE}, {args.size} px, CPU: seconds",
        ["path", "first image after load", "median", "max", "target"],
        [["ours", first_ours, results["median_s"], results["max_s"], TARGET_S],
         ["baseline", first_base, results["baseline_median_s"], max(base_times), None]])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
