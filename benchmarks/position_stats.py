"""A per-position normal model of the teacher's pooled features beside RD's map (issue 11 probe).

``benchmarks.teacher_sensitivity`` shows the student following casting's large faint regions:
what the one-class embedding carries, the student rebuilds. This probe adds a signal the
embedding does not produce: for parts that lie in place, each position's teacher features,
averaged over a window (layer 1 over 16 cells, layer 2 over 8: 64 px of the S×S view), are
compared with the same position's mean and variance over the normal training images
(a diagonal Gaussian per position, as PaDiM models patches; Defard et al. 2021). The
statistics map (mean squared z-score over channels, the two layers averaged, blurred σ 4) is
upsampled to the image's original size and added to the checkpoint's own map, each divided by
its mean over the training images. Inference only: nothing is trained or stored.

    python -m benchmarks.position_stats --data /tmp/robust_r9/hard --category casting \\
        --checkpoints /tmp/robust120/models/casting-paper-111.safetensors
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import checkpoints_on_category, print_table
from rd.data import MVTecCategory, read_mask
from rd.detector import load
from rd.maps import gaussian_blur
from rd.metrics import image_auroc, pixel_auroc

WINDOWS = {0: 16, 1: 8}  # teacher layer -> pooling window in cells (64 px at 256 px)


def _pooled(detector, paths: list[Path]) -> list[torch.Tensor]:
    """Each pooled layer's features (N, C, h, w) of the squashed S×S views."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in WINDOWS}
    for start in range(0, len(paths), 4):
        features = detector.model.teacher(detector.to_batch(paths[start:start + 4]))
        for layer, window in WINDOWS.items():
            feature = features[layer]
            pooled = F.avg_pool2d(feature, window, 1, window // 2)
            parts[layer].append(pooled[..., :feature.shape[-2], :feature.shape[-1]])
    return [torch.cat(parts[layer]) for layer in WINDOWS]


class PositionStats:
    """Per-position mean and variance of the pooled features over the normal images."""

    def __init__(self, normal: list[torch.Tensor]) -> None:
        self.mean = [f.mean(0) for f in normal]
        self.var = [f.var(0) + 1e-3 * f.var(0).mean() for f in normal]

    def maps(self, pooled: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(N, H, W): mean squared z-score over channels, layers averaged, σ 4, at ``size``."""
        total = 0
        for feature, mean, var in zip(pooled, self.mean, self.var, strict=True):
            distance = ((feature - mean) ** 2 / var).mean(1, keepdim=True)
            total = total + F.interpolate(distance, size=size, mode="bilinear",
                                          align_corners=True)[:, 0]
        return gaussian_blur(total / len(pooled), 4.0)


def _native(square: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(square[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def measure(checkpoint: Path, data: MVTecCategory) -> list[list[object]]:
    """Rows (map, defect, image AUROC, pixel AUROC) at the images' original size."""
    detector = load(checkpoint, "cpu")
    size = detector.preprocess.size
    train = [s.path for s in data.train_samples()]
    test = list(data.test_samples())
    normal = _pooled(detector, train)
    stats = PositionStats(normal)
    rd_train = float(np.mean([float(detector.predict_native(p).fused.float().mean())
                              for p in train]))
    stats_train = float(stats.maps(normal, (size, size)).mean())
    rd_maps = [detector.predict_native(s.path).fused.float() for s in test]
    shape = tuple(rd_maps[0].shape)
    if any(tuple(m.shape) != shape for m in rd_maps):
        raise ValueError("the test images differ in size; this probe needs one size")
    rd_test = torch.stack(rd_maps)
    stats_test = _native(stats.maps(_pooled(detector, [s.path for s in test]), (size, size)),
                         shape)
    variants = {"checkpoint's map": rd_test, "position statistics": stats_test,
                "sum of both, each / its normal mean": rd_test / rd_train
                + stats_test / stats_train}
    labels = np.array([s.label for s in test])
    masks = [read_mask(s.mask_path, shape) if s.label else np.zeros(shape, bool) for s in test]
    rows = []
    for name, maps in variants.items():
        values = maps.numpy()
        rows.append([name, "all", image_auroc(labels, values.reshape(len(values), -1).max(1)),
                     pixel_auroc(np.stack(masks), values)])
        for kind in sorted({s.defect for s in test if s.label}):
            chosen = [i for i, s in enumerate(test) if s.label == 0 or s.defect == kind]
            rows.append([name, kind,
                         image_auroc(labels[chosen],
                                     values[chosen].reshape(len(chosen), -1).max(1)),
                         pixel_auroc(np.stack([masks[i] for i in chosen]), values[chosen])])
    return rows


def main(argv: list[str] | None = None) -> int:
    data, checkpoints = checkpoints_on_category(__doc__.splitlines()[0], argv)
    for checkpoint in checkpoints:
        print_table(f"{data.category}: {checkpoint.name}",
                    ["map", "defect", "image AUROC", "pixel AUROC"],
                    measure(checkpoint, data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
