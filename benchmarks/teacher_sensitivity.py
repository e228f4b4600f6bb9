"""How far each hard defect moves the teacher's features, and the paper model's map (issue 11).

RD sees a defect only through the direction of the teacher's features (``1 - cos``). For every
defective test image of the opt-in categories (generated as in ``benchmarks.robust_study``)
the generator also renders the same scene without the defect, so each defect's own effect can
be measured inside its mask, per teacher layer, at the model's S×S resolution:

- ``teacher shift``: ``1 - cos`` between the teacher's features of the image and of its clean
  twin (what a perfect student could at most see);
- ``map rise``: how much the paper model's per-layer map rises over the clean twin's there;
- ``floor sd``: the spread of the clean twin's map over the same pixels (what the rise must
  stand out from); ``rise / sd`` is that separation in standard deviations.

    python -m benchmarks.teacher_sensitivity --models /tmp/robust120/models
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.common import print_table
from rd.data.synthetic import HARD_CATEGORIES, render_sample
from rd.detector import load
from rd.maps import layer_maps
from rd.metrics import pixel_auroc


def _shift_and_maps(detector, image: np.ndarray, clean: np.ndarray
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, S, S) teacher shift, the image's and the clean twin's per-layer maps."""
    size = detector.preprocess.size
    batch = detector.to_batch([Image.fromarray(image), Image.fromarray(clean)])
    teacher, student = detector.model(batch)
    shift = [1 - F.cosine_similarity(t[:1], t[1:], dim=1) for t in teacher]
    shift = torch.cat([F.interpolate(s[:, None], size=(size, size), mode="bilinear",
                                     align_corners=True)[:, 0] for s in shift])
    maps = layer_maps(teacher, student, (size, size))
    return shift, maps[0], maps[1]


def measure(detector, category: str, count: int, seed: int) -> list[list[object]]:
    """Rows (defect, layer, teacher shift, map rise, floor sd, rise / sd, pixel AUROC of the
    layer's map against the clean twins)."""
    size = detector.preprocess.size
    rows = []
    for kind in HARD_CATEGORIES[category]:
        per_layer: list[list[tuple[float, float, float]]] = [[], [], []]
        masks, defect_maps, clean_maps = [], [], []
        for index in range(count):
            image, mask = render_sample(category, "test", kind, index, seed)
            clean, _ = render_sample(category, "test", kind, index, seed, defect=False)
            inside = np.array(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
            if not inside.any():
                continue
            shift, maps, clean_map = _shift_and_maps(detector, image, clean)
            region = torch.from_numpy(inside)
            for layer in range(3):
                rise = maps[layer][region] - clean_map[layer][region]
                per_layer[layer].append((float(shift[layer][region].mean()), float(rise.mean()),
                                         float(clean_map[layer][region].std())))
            masks += [inside, np.zeros_like(inside)]
            defect_maps.append(maps.numpy())
            clean_maps.append(clean_map.numpy())
        truth = np.stack(masks)
        for layer in range(3):
            shift, rise, spread = np.mean(per_layer[layer], axis=0)
            scored = np.stack([m[layer] for pair in zip(defect_maps, clean_maps, strict=True)
                               for m in pair])
            rows.append([kind, layer + 1, shift, rise, spread, rise / spread,
                         pixel_auroc(truth, scored)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True,
                        help="folder of <category>-paper-<seed>.safetensors (robust_study)")
    parser.add_argument("--seed", type=int, default=111, help="the models' training seed")
    parser.add_argument("--count", type=int, default=6, help="defective images per kind")
    parser.add_argument("--data-seed", type=int, default=0, help="the generator's seed")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for category in HARD_CATEGORIES:
        detector = load(args.models / f"{category}-paper-{args.seed}.safetensors", "cpu")
        print_table(f"{category}: each defect against its clean twin (paper model, seed "
                    f"{args.seed})", ["defect", "layer", "teacher shift", "map rise",
                                      "floor sd", "rise / sd", "pixel AUROC vs twins"],
                    measure(detector, category, args.count, args.data_seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
