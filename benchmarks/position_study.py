"""``--position-stats`` measured: each trained checkpoint of a study beside itself with them.

The statistics leave the student as it is (``tests/unit/test_position.py`` checks that fitting
them onto a checkpoint gives the tensors of training with the flag), so every run of a
``benchmarks.robust_study`` folder is measured three times without training again: as it
was, with position statistics fitted on its normal training images
(``rd.training.add_position_statistics``), and with them in the image score too
(``--position-score``). All are evaluated here, in the same run, as the study evaluates (pixel
metrics at the native size of the non-square categories). The second-to-last column is what
``--position-stats auto --position-score`` decides on the run's normal training images (the
spread of their left-out maxima, ``rd.position.in_place_decision``), and so which version it
gives; the last, what ``--position-stats adaptive --position-score`` gives: those statistics
where kept, else the envelope (fitted and evaluated here).

    OMP_NUM_THREADS=2 python -m benchmarks.position_study --work /tmp/robust_r9 \\
        --mvtec ../shared/data/mvtec_subset --datasets casting,metal_strip
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from benchmarks.common import print_table
from benchmarks.robust_study import EVAL_SIZE, prepare
from rd.checkpoints import load_checkpoint, read_metadata
from rd.data import ImageDataset, MVTecCategory, Preprocess, Sample
from rd.detector import load
from rd.evaluation import evaluate
from rd.position import fit_position_statistics, in_place_decision
from rd.training import add_position_statistics


def _metrics(report: dict[str, Any]) -> str:
    return (f"{report['image_auroc']:.3f} / {report['pixel_auroc']:.3f} / "
            f"{report['au_pro']:.3f}")


def auto_decision(checkpoint: Path, added: Path, samples: list[Sample]) -> dict[str, Any]:
    """What ``--position-stats auto`` decides for ``checkpoint``'s teacher and preprocessing
    on its normal training images: from the fit recorded in ``added`` (its version with the
    statistics), or fitted again for a version made before the fit recorded the spread."""
    info = read_metadata(added)["position_stats"]
    if info.get("left_out_spread") is not None:
        return in_place_decision(info)
    model, meta = load_checkpoint(checkpoint)
    preprocess = Preprocess.from_dict(meta.preprocess)
    loader = DataLoader(ImageDataset(samples, preprocess), batch_size=16)
    _, info = fit_position_statistics(model.eval().teacher,
                                      lambda: (batch["image"] for batch in loader),
                                      preprocess.size, "cpu")
    return in_place_decision(info)


def measure(work: Path, mvtec: Path | None, datasets: list[str] | None,
            rows: list[str] | None, hard_train: int) -> list[list[object]]:
    roots = prepare(work, mvtec, 0, hard_train)
    out = work / "position"
    out.mkdir(exist_ok=True)
    table = []
    for record in map(json.loads, (work / "results.jsonl").open()):
        dataset, row = record["dataset"], record["row"]
        if (dataset not in roots or (datasets and dataset not in datasets)
                or (rows and row not in rows)):
            continue
        name = f"{dataset}-{row.replace(' ', '_')}-{record['seed']}"
        checkpoint = work / "models" / f"{name}.safetensors"
        root, category_name = roots[dataset]
        category = MVTecCategory(root, category_name)
        started = time.perf_counter()
        added = out / f"{name}.safetensors"
        if not added.exists():
            add_position_statistics(checkpoint, category.train_samples(), added, "cpu")
        scored = out / f"{name}.score.safetensors"
        if not scored.exists():
            add_position_statistics(checkpoint, category.train_samples(), scored, "cpu",
                                    score=True)
        fit_seconds = time.perf_counter() - started  # of the versions not already fitted
        reports = {}
        for label, path in (("without", checkpoint), ("with", added), ("score", scored)):
            started = time.perf_counter()
            reports[label] = evaluate(load(path, "cpu"), category.test_samples(),
                                      eval_size=EVAL_SIZE[dataset])
            reports[label]["wall"] = time.perf_counter() - started
        defects = ", ".join(
            f"{kind} {reports['without']['per_defect'][kind]['pixel_auroc']:.3f}"
            f"->{values['pixel_auroc']:.3f}"
            for kind, values in reports["with"]["per_defect"].items())
        image = ", ".join(
            f"{kind} {reports['without']['per_defect'][kind]['image_auroc']:.2f}"
            f"->{values['image_auroc']:.2f}"
            for kind, values in reports["score"]["per_defect"].items())
        decision = auto_decision(checkpoint, added, category.train_samples())
        auto = (f"kept ({decision['left_out_spread']:.2f}): "
                f"{_metrics(reports['score'])}" if decision["kept"] else
                f"left out ({decision['left_out_spread']:.2f}): {_metrics(reports['without'])}")
        if decision["kept"]:  # adaptive = the plain statistics with the score, as fitted above
            adaptive = f"statistics: {_metrics(reports['score'])}"
        else:  # the envelope, with the copies of the transforms the run's augmentation kept
            enveloped = out / f"{name}.adaptive.safetensors"
            if not enveloped.exists():
                add_position_statistics(checkpoint, category.train_samples(), enveloped, "cpu",
                                        score=True, mode="adaptive")
            report = evaluate(load(enveloped, "cpu"), category.test_samples(),
                              eval_size=EVAL_SIZE[dataset])
            per_defect = ", ".join(f"{kind} {values['pixel_auroc']:.3f}"
                                   for kind, values in report["per_defect"].items())
            adaptive = f"envelope: {_metrics(report)} ({per_defect})"
        line = [dataset, row, record["seed"], record["epochs"], _metrics(reports["without"]),
                _metrics(reports["with"]), defects,
                f"{reports['score']['image_auroc']:.3f}", image, f"{fit_seconds:.0f}",
                f"{reports['without']['wall']:.0f} / {reports['with']['wall']:.0f}", auto,
                adaptive]
        print(" | ".join(map(str, line)), flush=True)
        table.append(line)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a benchmarks.robust_study folder")
    parser.add_argument("--mvtec", help="the MVTec subset (hazelnut, transistor)")
    parser.add_argument("--datasets", help="comma-separated datasets (default: all)")
    parser.add_argument("--rows", help="comma-separated rows of the study (default: all)")
    parser.add_argument("--hard-train", type=int, default=20)
    args = parser.parse_args(argv)
    rows = measure(Path(args.work), Path(args.mvtec) if args.mvtec else None,
                   args.datasets.split(",") if args.datasets else None,
                   args.rows.split(",") if args.rows else None, args.hard_train)
    print_table(f"--position-stats on the checkpoints of {args.work}",
                ["dataset", "row", "seed", "epochs", "without: image / pixel AUROC / AU-PRO",
                 "with", "per defect pixel AUROC without->with",
                 "image AUROC with --position-score", "per defect image AUROC without->score",
                 "fit + calibrate s (new fits)",
                 "evaluation s without / with",
                 "--position-stats auto --position-score (spread): its metrics",
                 "--position-stats adaptive --position-score: its metrics"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
