"""Whether `multiscale`'s two views keep what each finds when each has a student of its own.

Round 14 found that on the MVTec subset's 256² images the half-scale view (``--resize
multiscale`` at tile scale 0.5) is what lifts transistor's ``misplaced`` and what costs
hazelnut's cuts, and guessed that the student shared by both views learns to rebuild the cuts.
This probe (inference only, besides one training) tests that: it trains a student on the
half-scale view alone (``--resize tile --tile-scale 0.5``, the same augmentation and moving
average as the whole-view model), takes the study's whole-view model (squashed, the paper's
geometry) and scores the test set with each view alone and with several ways of combining the
two students' maps:

- ``whole`` / ``half``: one student's map, blurred at its own scale (``predict_native``);
- ``mean``: the two blurred maps averaged, as ``multiscale`` combines its views;
- ``0.7 whole + 0.3 half``: the whole view weighted more;
- ``max, normalised``: the larger of the two maps, each divided by the mean maximum of its
  maps on 20 normal training images;
- ``whole + half's layer 3``: the whole view's three layer maps plus the half-scale view's
  deepest one (a missing part is a context the deepest layer sees), blurred once;
- ``whole, layer 3 ∨ half's``: the whole view's layers 1 and 2 plus the larger of the two
  views' layer 3.

    OMP_NUM_THREADS=2 python -m benchmarks.view_fusion --work /tmp/robust60 --dataset hazelnut \\
        --seed 111 --whole-row "augment geometric + ema" --augment hflip,rot90,rotate,shift
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table
from rd.data import MVTecCategory, read_mask
from rd.detector import Detector, load
from rd.maps import gaussian_blur
from rd.metrics import PixelScores, image_auroc
from rd.training import TrainConfig, train

TRAIN_IMAGES_FOR_SCALE = 20


def half_scale_model(work: Path, data: MVTecCategory, dataset: str, seed: int, epochs: int,
                     augment: str) -> Path:
    """The student of the half-scale view alone, trained once and kept beside the study's
    (a kept one is used only if its checkpoint records the same recipe)."""
    out = work / "models" / f"{dataset}-half_view-{augment.replace(',', '_')}-{seed}.safetensors"
    config = TrainConfig(epochs=epochs, seed=seed, device="cpu", resize="tile", tile_scale=0.5,
                         augment=augment, ema=1.0)
    if out.exists():
        recorded = load(out, "cpu").metadata.get("recipe")
        if recorded != json.loads(json.dumps(config.recipe())):
            raise SystemExit(f"{out} was trained with another recipe ({recorded}); move it away "
                             "or pass the options it was trained with")
    else:
        started = time.perf_counter()
        train(data.train_samples(), config, out, progress=False)
        print(f"trained {out.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


@torch.no_grad()
def _views(detector: Detector, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the blurred map (N, H, W) and the three unblurred layer maps (N, 3, H, W)."""
    maps = [detector.predict_native(path) for path in paths]
    return (torch.stack([m.fused.float() for m in maps]),
            torch.stack([m.layer_maps.float() for m in maps]))


def fusion_rules(whole: Detector, half: Detector, data: MVTecCategory
                 ) -> dict[str, torch.Tensor]:
    """Every combination of the two students' maps on the test set, by name."""
    test = [s.path for s in data.test_samples()]
    train_paths = [s.path for s in data.train_samples()[:TRAIN_IMAGES_FOR_SCALE]]
    whole_map, whole_layers = _views(whole, test)
    half_map, half_layers = _views(half, test)
    whole_scale = _views(whole, train_paths)[0].flatten(1).amax(1).mean()
    half_scale = _views(half, train_paths)[0].flatten(1).amax(1).mean()
    return {
        "whole": whole_map,
        "half": half_map,
        "mean": (whole_map + half_map) / 2,
        "0.7 whole + 0.3 half": 0.7 * whole_map + 0.3 * half_map,
        "max, normalised": torch.maximum(whole_map / whole_scale, half_map / half_scale),
        "whole + half's layer 3": gaussian_blur(whole_layers.sum(1) + half_layers[:, 2]),
        "whole, layer 3 ∨ half's": gaussian_blur(
            whole_layers[:, :2].sum(1) + torch.maximum(whole_layers[:, 2], half_layers[:, 2])),
    }


def measure(rules: dict[str, torch.Tensor], data: MVTecCategory
            ) -> tuple[list[str], list[list[str]]]:
    """The header and, per rule, image AUROC / pixel AUROC / AU-PRO and per defect image /
    pixel AUROC."""
    samples = data.test_samples()
    labels = np.array([s.label for s in samples])
    normal = labels == 0
    defects = np.array([s.defect for s in samples])
    kinds = sorted(set(defects[~normal]))
    shape = next(iter(rules.values())).shape[1:]
    masks = np.stack([read_mask(s.mask_path) if s.mask_path else np.zeros(shape, dtype=bool)
                      for s in samples])
    rows = []
    for name, maps in rules.items():
        values = maps.numpy()
        scores = values.reshape(len(values), -1).max(1)
        pixels = PixelScores(masks, values, np.where(normal, "", defects))
        cells = [f"{image_auroc(labels, scores):.3f} / {pixels.auroc():.4f} / "
                 f"{pixels.au_pro():.4f}"]
        for kind in kinds:
            subset = normal | (defects == kind)
            cells.append(f"{image_auroc(labels[subset], scores[subset]):.2f} / "
                         f"{pixels.auroc(['', kind]):.3f}")
        rows.append([name, *cells])
    return ["rule", "image / pixel AUROC / AU-PRO", *kinds], rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="benchmarks.robust_study's work folder")
    parser.add_argument("--dataset", required=True, choices=["hazelnut", "transistor"])
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--whole-row", required=True,
                        help="the study's row whose squashed model is the whole view")
    parser.add_argument("--augment", required=True, help="the half-scale student's --augment")
    args = parser.parse_args(argv)
    work = Path(args.work)
    data = MVTecCategory(work / "holdout", args.dataset)
    whole_path = work / "models" / (f"{args.dataset}-{args.whole_row.replace(' ', '_')}-"
                                    f"{args.seed}.safetensors")
    if not whole_path.exists():
        parser.error(f"{whole_path} not found: run benchmarks.robust_study with --rows "
                     f"\"{args.whole_row}\" --seed {args.seed} first")
    half_path = half_scale_model(work, data, args.dataset, args.seed, args.epochs, args.augment)
    rules = fusion_rules(load(whole_path, "cpu"), load(half_path, "cpu"), data)
    header, rows = measure(rules, data)
    print_table(f"{args.dataset}, seed {args.seed}: whole view ({args.whole_row}) and half-scale "
                f"view (--augment {args.augment}), each with its own student", header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
