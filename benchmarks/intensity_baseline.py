"""How much the hard categories' defects show in plain grey levels: a yardstick for issue 11.

No network: each image is divided by a plane fitted to its part's grey levels (the generator's
global gain and linear lighting gradient), and a pixel's score is its distance from the mean
of the normal training images so divided, after a Gaussian blur of ``sigma``. Pixel AUROC over
every pixel (as the study computes it) and over the part's pixels only, image AUROC from each
image's largest score, per defect kind. Data as ``benchmarks.robust_study`` generates it (20
normal training images, 10 normal and 6 per defect for testing), under ``--work``.

    python -m benchmarks.intensity_baseline --work /tmp/robust
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks.common import print_table
from rd.data import MVTecCategory, read_image, read_mask
from rd.data.synthetic import HARD_CATEGORIES, generate_dataset
from rd.metrics import image_auroc, pixel_auroc

PART_LEVEL = 80  # grey level between the dark table (≈30-40) and the part (≈125-150)
SIGMAS = (0, 4, 8, 16)


def _grey(path: Path) -> np.ndarray:
    return np.asarray(read_image(path).convert("L"), dtype=np.float64)


def _flattened(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image divided by the plane fitted to its part's grey levels, and the part's mask."""
    part = grey > PART_LEVEL
    ys, xs = np.nonzero(part)
    design = np.stack([np.ones_like(ys), ys, xs], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, grey[part], rcond=None)
    rows, cols = np.mgrid[: grey.shape[0], : grey.shape[1]]
    plane = coefficients[0] + coefficients[1] * rows + coefficients[2] * cols
    return grey / plane, part


def measure(root: Path, category: str) -> list[list[object]]:
    """Rows (category, defect, sigma, pixel AUROC all / part, image AUROC)."""
    data = MVTecCategory(root, category)
    normal_mean = np.mean([_flattened(_grey(s.path))[0] for s in data.train_samples()], axis=0)
    test = [(s, *_flattened(_grey(s.path))) for s in data.test_samples()]
    defects = sorted({s.defect for s, _, _ in test if s.label == 1})
    rows = []
    for defect in defects:
        chosen = [(s, flat, part) for s, flat, part in test if s.label == 0 or s.defect == defect]
        masks = [read_mask(s.mask_path, flat.shape) if s.label else np.zeros(flat.shape, bool)
                 for s, flat, _ in chosen]
        for sigma in SIGMAS:
            mean = ndimage.gaussian_filter(normal_mean, sigma) if sigma else normal_mean
            maps = [np.abs((ndimage.gaussian_filter(flat, sigma) if sigma else flat) - mean)
                    for _, flat, _ in chosen]
            on_part = [(m[p], a[p]) for m, a, (_, _, p) in zip(masks, maps, chosen, strict=True)]
            part_auroc = pixel_auroc(np.concatenate([m for m, _ in on_part])[None, None],
                                     np.concatenate([a for _, a in on_part])[None, None])
            rows.append([category, defect, sigma, pixel_auroc(np.stack(masks), np.stack(maps)),
                         part_auroc, image_auroc([s.label for s, _, _ in chosen],
                                                 [a.max() for a in maps])])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="the study's folder (its hard/ data is generated if missing)")
    args = parser.parse_args(argv)
    root = generate_dataset(args.work / "hard", list(HARD_CATEGORIES), n_train=20,
                            n_test_good=10, n_per_defect=6)
    rows = [row for category in HARD_CATEGORIES for row in measure(root, category)]
    print_table("Plain grey levels (plane-flattened, distance from the normal mean)",
                ["category", "defect", "sigma", "pixel AUROC", "pixel AUROC on the part",
                 "image AUROC"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
