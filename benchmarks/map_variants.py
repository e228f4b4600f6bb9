"""Which anomaly map finds the hard categories' defects: variants of the paper's map (issue 11).

Inference only, on a model the study trained (``benchmarks.robust_study``, paper recipe: one
squashed S×S view). Each variant is computed from the same teacher and student features and
scored per defect kind (the kind's images and the normal test images; masks resized to S×S
nearest, so the paper variant lands within a few thousandths of the study's native-size figure):

- ``paper``: the sum of the three layers' ``1 - cos`` maps, blurred with σ = 4 (the reference);
- ``layer k``: one layer's map alone (σ = 4): where the defect's signal is;
- ``sum, σ s``: the paper's map blurred more (a large uneven region's interior filled in);
- ``per-layer σ a/b/c``: each layer blurred at its own scale before the sum;
- ``product``: the layers multiplied (the reference's other fusion);
- ``layers z-scored``: each layer's map in standard deviations of its values on the normal
  training images, then summed: no layer's floor drowns another's signal;
- ``pixels z-scored``: each map pixel in standard deviations of that pixel on the normal
  training images (the parts lie in place): a per-position normal model of the map;
- ``cos + norm``: plus how far the teacher/student feature-norm ratio lies from its mean on
  the normal training images (in their standard deviations), scaled to the cosine term's
  mean: a gain change scales features without turning them, which ``1 - cos`` cannot see.

    python -m benchmarks.map_variants --work /tmp/robust30 --models /tmp/robust30/models
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import print_table
from rd.data import MVTecCategory, read_mask
from rd.data.synthetic import HARD_CATEGORIES, generate_dataset
from rd.detector import load
from rd.maps import gaussian_blur, layer_maps
from rd.metrics import image_auroc, pixel_auroc

VARIANTS = ("paper", "layer 1", "layer 2", "layer 3", "sum, σ 8", "sum, σ 16",
            "per-layer σ 4/8/16", "per-layer σ 4/8/32", "product", "layers z-scored",
            "pixels z-scored", "cos + norm")


def _features(detector, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, S, S) per-layer ``1 - cos`` maps and (L, S, S) log teacher/student norm ratios."""
    size = detector.preprocess.size
    with torch.no_grad():
        teacher, student = detector.model(detector.to_batch([path]))
    ratios = [(t.norm(dim=1) / s.norm(dim=1).clamp_min(1e-12)).log().unsqueeze(1)
              for t, s in zip(teacher, student, strict=True)]
    up = [F.interpolate(r, size=(size, size), mode="bilinear", align_corners=True)
          for r in ratios]
    return layer_maps(teacher, student, (size, size))[0], torch.cat(up, dim=1)[0]


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    return gaussian_blur(maps[None], sigma)[0]


class Normal:
    """Statistics of the normal training images' maps: per layer and per pixel of the
    ``1 - cos`` maps, per layer of the log norm ratios, and the scale that gives the summed
    norm term the cosine sum's mean there."""

    def __init__(self, normal: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        cosines = torch.stack([c for c, _ in normal])  # (N, L, S, S)
        self.layer_mean = cosines.mean(dim=(0, 2, 3)).view(-1, 1, 1)
        self.layer_std = cosines.std(dim=(0, 2, 3)).view(-1, 1, 1)
        self.pixel_mean, self.pixel_std = cosines.mean(0), cosines.std(0) + 1e-3
        ratios = torch.stack([r for _, r in normal])
        self.ratio_mean = ratios.mean(dim=(0, 2, 3)).view(-1, 1, 1)
        self.ratio_std = ratios.std(dim=(0, 2, 3)).view(-1, 1, 1)
        self.scale = float(cosines.sum(1).mean()) / float(
            torch.stack([self.norm_term(r) for _, r in normal]).mean())

    def norm_term(self, ratios: torch.Tensor) -> torch.Tensor:
        return ((ratios - self.ratio_mean).abs() / self.ratio_std).sum(0)


def variant_map(name: str, cosine: torch.Tensor, ratios: torch.Tensor, normal: Normal
                ) -> torch.Tensor:
    if name == "paper":
        return _blur(cosine.sum(0), 4.0)
    if name.startswith("layer "):
        return _blur(cosine[int(name[-1]) - 1], 4.0)
    if name.startswith("sum, σ "):
        return _blur(cosine.sum(0), float(name.split()[-1]))
    if name.startswith("per-layer σ "):
        sigmas = [float(s) for s in name.split()[-1].split("/")]
        return sum(_blur(layer, s) for layer, s in zip(cosine, sigmas, strict=True))
    if name == "product":
        return _blur(cosine.prod(0), 4.0)
    if name == "layers z-scored":
        return _blur(((cosine - normal.layer_mean) / normal.layer_std).sum(0), 4.0)
    if name == "pixels z-scored":
        return _blur(((cosine - normal.pixel_mean) / normal.pixel_std).sum(0), 4.0)
    if name == "cos + norm":
        return _blur(cosine.sum(0) + normal.scale * normal.norm_term(ratios), 4.0)
    raise ValueError(name)


def measure(detector, data: MVTecCategory) -> list[list[object]]:
    """Rows (defect, variant, image AUROC, pixel AUROC)."""
    size = detector.preprocess.size
    normal = Normal([_features(detector, s.path) for s in data.train_samples()])
    test = [(s, *_features(detector, s.path)) for s in data.test_samples()]
    rows = []
    for defect in sorted({s.defect for s, _, _ in test if s.label == 1}):
        chosen = [item for item in test if item[0].label == 0 or item[0].defect == defect]
        masks = np.stack([read_mask(s.mask_path, (size, size)) if s.label
                          else np.zeros((size, size), bool) for s, _, _ in chosen])
        for name in VARIANTS:
            maps = np.stack([variant_map(name, c, r, normal).numpy() for _, c, r in chosen])
            rows.append([defect, name, image_auroc([s.label for s, _, _ in chosen],
                                                   maps.reshape(len(maps), -1).max(1)),
                         pixel_auroc(masks, maps)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the study's folder")
    parser.add_argument("--models", type=Path, required=True,
                        help="folder of <category>-paper-<seed>.safetensors")
    parser.add_argument("--seed", type=int, default=111)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    root = generate_dataset(args.work / "hard", list(HARD_CATEGORIES), n_train=20,
                            n_test_good=10, n_per_defect=6)
    for category in HARD_CATEGORIES:
        detector = load(args.models / f"{category}-paper-{args.seed}.safetensors", "cpu")
        print_table(f"{category}: map variants of the paper model (seed {args.seed})",
                    ["defect", "map", "image AUROC", "pixel AUROC"],
                    measure(detector, MVTecCategory(root, category)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
