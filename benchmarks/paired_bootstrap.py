"""Is one recipe's checkpoint really better than another's on a test set? A paired bootstrap.

The study's differences between recipes (``benchmarks.robust_study``) are often a few
thousandths of pixel AUROC or AU-PRO on test sets of 20–37 images, and a second seed moves
them as much. This script scores two checkpoints of each dataset and seed on the same test
images, then resamples the test images with replacement (normal and defective images apart, so
every resample has both classes in the test set's proportions) and recomputes both models'
image AUROC, pixel AUROC and AU-PRO on each resample: the same resample for both models, so
what the images have in common cancels. It prints the observed difference (candidate minus
baseline), its 95 % percentile interval and the share of resamples in which the candidate is
ahead. An interval that holds 0 means the test set cannot tell the two apart.

    OMP_NUM_THREADS=2 python -m benchmarks.paired_bootstrap --work /tmp/r18/work \\
        --mvtec ../shared/data/mvtec_subset --datasets hazelnut,hex_nut --seeds 111,112 \\
        --baseline "models/{dataset}-paper-{seed}.safetensors" \\
        --candidate "position/{dataset}-augment_auto_+_ema-{seed}.adaptive.safetensors"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, write_json
from benchmarks.robust_study import EVAL_SIZE, prepare
from rd import metrics
from rd.data import MVTecCategory
from rd.detector import load
from rd.evaluation import predict_samples

METRICS = ("image_auroc", "pixel_auroc", "au_pro")
TIE = 1e-9  # two AUROCs of 1.0 can differ in the last bits of their sums


def scored(checkpoint: Path, category: MVTecCategory, eval_size: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused maps, masks and image scores of the category's test images."""
    return predict_samples(load(checkpoint, "cpu"), category.test_samples(),
                           eval_size=eval_size)


def three_metrics(labels: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                  scores: np.ndarray) -> np.ndarray:
    pixels = metrics.PixelScores(masks, maps)
    return np.array([metrics.image_auroc(labels, scores), pixels.auroc(), pixels.au_pro()])


def resamples(labels: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """``count`` index sets drawn with replacement within each class."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    return [np.concatenate([rng.choice(group, len(group)) for group in groups])
            for _ in range(count)]


def compare(labels: np.ndarray, baseline: tuple[np.ndarray, ...],
            candidate: tuple[np.ndarray, ...], count: int, seed: int) -> dict[str, Any]:
    """Observed and resampled differences (candidate minus baseline) of the three metrics."""
    observed = (three_metrics(labels, *candidate) - three_metrics(labels, *baseline))
    deltas = []
    for index in resamples(labels, count, seed):
        deltas.append(three_metrics(labels[index], *(a[index] for a in candidate))
                      - three_metrics(labels[index], *(a[index] for a in baseline)))
    spread = np.array(deltas)
    return {name: {"delta": float(observed[i]),
                   "low": float(np.percentile(spread[:, i], 2.5)),
                   "high": float(np.percentile(spread[:, i], 97.5)),
                   "ahead": float((spread[:, i] > TIE).mean()),
                   "tied": float((abs(spread[:, i]) <= TIE).mean())}
            for i, name in enumerate(METRICS)}


def _signed(value: float) -> str:
    return f"{round(value, 4) + 0.0:+.4f}"  # no "-0.0000" for a rounding error below zero


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="a benchmarks.robust_study work folder (its datasets and models)")
    parser.add_argument("--mvtec", type=Path, help="the MVTec subset (hazelnut, transistor)")
    parser.add_argument("--datasets", required=True, help="comma-separated")
    parser.add_argument("--seeds", default="111", help="comma-separated training seeds")
    parser.add_argument("--baseline", required=True,
                        help="checkpoint path under --work, with {dataset} and {seed}")
    parser.add_argument("--candidate", required=True, help="the same, for the other model")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path("runs/benchmarks/paired_bootstrap.json"))
    args = parser.parse_args(argv)
    roots = prepare(args.work, args.mvtec, 0)
    rows, results = [], []
    for dataset in args.datasets.split(","):
        root, name = roots[dataset]
        category = MVTecCategory(root, name)
        labels = np.array([sample.label for sample in category.test_samples()])
        for seed in map(int, args.seeds.split(",")):
            paths = [args.work / pattern.format(dataset=dataset, seed=seed)
                     for pattern in (args.baseline, args.candidate)]
            started = time.perf_counter()
            baseline, candidate = (scored(path, category, EVAL_SIZE[dataset]) for path in paths)
            found = compare(labels, baseline, candidate, args.resamples, seed)
            results.append({"dataset": dataset, "seed": seed, "baseline": str(paths[0]),
                            "candidate": str(paths[1]), "images": len(labels),
                            "resamples": args.resamples, **found,
                            "seconds": round(time.perf_counter() - started, 1)})
            rows.append([dataset, seed, len(labels)] + [
                f"{_signed(found[m]['delta'])} [{_signed(found[m]['low'])}, "
                f"{_signed(found[m]['high'])}] {found[m]['ahead']:.2f}" for m in METRICS])
    print_table(f"Candidate minus baseline: observed [95 % interval] share of {args.resamples} "
                "resamples ahead",
                ["dataset", "seed", "test images", "image AUROC", "pixel AUROC", "AU-PRO"], rows)
    write_json(args.json, {"comparisons": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
