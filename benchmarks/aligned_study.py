"""``--aligned-stats`` measured: trained checkpoints of a study beside themselves with them.

The aligned statistics (``rd.alignment``) leave the student as it is, so each checkpoint named
by ``--source`` (a path under ``--work`` with ``{dataset}`` and ``{seed}``) is fitted with them
on its normal training images (``rd.training.add_aligned_statistics``, written under
``--work``/aligned) and evaluated with and without, as the study evaluates (pixel metrics at
the native size of the non-square categories). The table gives what ``--aligned-stats auto``
decides (the registered normal images' median correlation peak), the three metrics without
and with, the hard defect kinds' pixel AUROC, and the seconds to fit and to score the test set.
``benchmarks.paired_bootstrap`` then says which differences the test sets can tell apart.

    OMP_NUM_THREADS=2 python -m benchmarks.aligned_study --work /tmp/r18/work \\
        --mvtec ../shared/data/mvtec_subset --datasets hazelnut,hex_nut --seeds 111,112 \\
        --source "models/{dataset}-paper-{seed}.safetensors"
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import print_table, write_json
from benchmarks.robust_study import EVAL_SIZE, prepare
from rd.data import MVTecCategory
from rd.detector import load
from rd.evaluation import evaluate
from rd.training import add_aligned_statistics


@dataclass(frozen=True)
class Refit:
    """What a study adds onto trained checkpoints without training: the function that writes
    the new checkpoint (rd.training.add_*), the folder and suffix it goes to, and how its
    ``auto`` decision reads in the table."""

    add: Callable[..., dict[str, Any]]
    folder: str
    suffix: str
    decision: Callable[[dict[str, Any]], str]


ALIGNED = Refit(add_aligned_statistics, "aligned", ".aligned",
                lambda info: f"{'kept' if info['alike'] else 'left out'} "
                             f"({info['median_peak']:.3f})")


def _metrics(report: dict[str, Any]) -> str:
    return (f"{report['image_auroc']:.3f} / {report['pixel_auroc']:.4f} / "
            f"{report['au_pro']:.4f}")


def measure(work: Path, mvtec: Path | None, datasets: list[str], seeds: list[int],
            source: str, refit: Refit = ALIGNED
            ) -> tuple[list[list[object]], list[dict[str, Any]]]:
    roots = prepare(work, mvtec, 0)
    out = work / refit.folder
    out.mkdir(exist_ok=True)
    rows, results = [], []
    for dataset in datasets:
        root, name = roots[dataset]
        category = MVTecCategory(root, name)
        for seed in seeds:
            checkpoint = work / source.format(dataset=dataset, seed=seed)
            added = out / checkpoint.name.replace(".safetensors", f"{refit.suffix}.safetensors")
            started = time.perf_counter()
            info = refit.add(checkpoint, category.train_samples(), added, "cpu")
            fit_seconds = time.perf_counter() - started
            reports = {}
            for label, path in (("without", checkpoint), ("with", added)):
                started = time.perf_counter()
                reports[label] = evaluate(load(path, "cpu"), category.test_samples(),
                                          eval_size=EVAL_SIZE[dataset])
                reports[label]["wall"] = time.perf_counter() - started
            defects = ", ".join(
                f"{kind} {reports['without']['per_defect'][kind]['pixel_auroc']:.3f}"
                f"->{values['pixel_auroc']:.3f}"
                for kind, values in reports["with"]["per_defect"].items())
            rows.append([dataset, seed, checkpoint.name,
                         refit.decision(info),
                         _metrics(reports["without"]), _metrics(reports["with"]), defects,
                         f"{fit_seconds:.0f}",
                         f"{reports['without']['wall']:.1f} / {reports['with']['wall']:.1f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
            results.append({"dataset": dataset, "seed": seed, "checkpoint": str(checkpoint),
                            refit.folder: str(added), "fitted": info,
                            "fit_seconds": round(fit_seconds, 1),
                            **{label: {k: report[k] for k in
                                       ("image_auroc", "pixel_auroc", "au_pro", "wall")}
                               for label, report in reports.items()}})
    return rows, results


def arguments(doc: str, json_name: str, argv: list[str] | None) -> argparse.Namespace:
    """The options of a refit study (this one, ``benchmarks.turn_study``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="a benchmarks.robust_study work folder (its datasets and models)")
    parser.add_argument("--mvtec", type=Path, help="the MVTec subset (hazelnut, transistor)")
    parser.add_argument("--datasets", required=True, help="comma-separated")
    parser.add_argument("--seeds", default="111", help="comma-separated training seeds")
    parser.add_argument("--source", required=True,
                        help="checkpoint path under --work, with {dataset} and {seed}")
    parser.add_argument("--json", type=Path, default=Path("runs/benchmarks") / json_name)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, "aligned_study.json", argv)
    rows, results = measure(args.work, args.mvtec, args.datasets.split(","),
                            [int(seed) for seed in args.seeds.split(",")], args.source)
    print_table("Aligned statistics fitted onto trained checkpoints: image AUROC / pixel AUROC "
                "/ AU-PRO",
                ["dataset", "seed", "checkpoint", "auto (median peak)", "without", "with",
                 "pixel AUROC per defect", "fit s", "test set s (without / with)"], rows)
    write_json(args.json, {"runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
