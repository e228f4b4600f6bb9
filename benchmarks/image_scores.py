"""Which image score separates defective from normal images: the paper's max and others (issue 11).

The paper scores an image by the maximum of its fused, blurred map. On textured parts one hot
spot of the normal floor can outrank a faint defect, so this compares, on the maps each
checkpoint gives at the images' original size (``Detector.predict_native``: any ``--resize``):

- ``max``: the paper's score;
- ``top 0.1 %`` / ``top 1 %``: the mean of the highest 0.1 % / 1 % of the map's pixels;
- ``mean``: the whole map's mean;
- ``max, σ 16``: the maximum after a wider blur of the summed layers;
- ``max, layer k``: one layer's map alone (σ 4).

Image AUROC over the whole test set and per defect kind (its images and the normal ones).

    python -m benchmarks.image_scores --data /tmp/robust_r9/hard --category casting \\
        --checkpoints /tmp/robust_r9/models/casting-tile-111.safetensors
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.common import checkpoints_on_category, print_table
from rd.data import MVTecCategory
from rd.detector import load
from rd.maps import gaussian_blur
from rd.metrics import image_auroc


def scores(fused: torch.Tensor, layers: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image score of (N, H, W) fused maps and their (N, 3, H, W) per-layer maps."""
    flat = fused.flatten(1)
    top = {f"top {share * 100:g} %": flat.topk(max(1, int(share * flat.shape[1])), 1).values
           for share in (0.001, 0.01)}
    result = {"max": flat.max(1).values, **{k: v.mean(1) for k, v in top.items()},
              "mean": flat.mean(1),
              "max, σ 16": gaussian_blur(layers.sum(1), 16.0).flatten(1).max(1).values}
    for layer in range(layers.shape[1]):
        result[f"max, layer {layer + 1}"] = gaussian_blur(layers[:, layer], 4.0).flatten(
            1).max(1).values
    return result


def measure(checkpoint: Path, data: MVTecCategory) -> tuple[list[str], list[list[object]]]:
    """(defect kinds, rows of score name, image AUROC overall and per kind)."""
    detector = load(checkpoint, "cpu")
    test = list(data.test_samples())
    maps = [detector.predict_native(sample.path) for sample in test]
    fused = torch.stack([m.fused.float() for m in maps])
    layers = torch.stack([m.layer_maps.float() for m in maps])
    labels = np.array([sample.label for sample in test])
    defects = np.array([sample.defect for sample in test])
    kinds = sorted({d for d, label in zip(defects, labels, strict=True) if label})
    rows = []
    for name, values in scores(fused, layers).items():
        values = values.numpy()
        row: list[object] = [name, image_auroc(labels, values)]
        for kind in kinds:
            chosen = (labels == 0) | (defects == kind)
            row.append(image_auroc(labels[chosen], values[chosen]))
        rows.append(row)
    return kinds, rows


def main(argv: list[str] | None = None) -> int:
    data, checkpoints = checkpoints_on_category(__doc__.splitlines()[0], argv)
    for checkpoint in checkpoints:
        kinds, rows = measure(checkpoint, data)
        print_table(f"{data.category}: image AUROC by image score, {checkpoint.name}",
                    ["score", "all", *kinds], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
