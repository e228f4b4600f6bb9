"""``python -m rd novelty``: one-class novelty detection (the paper's Table 2)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from rd.backbones import list_backbones
from rd.data.novelty import DATASETS, open_dataset
from rd.novelty import NoveltySettings, run_novelty
from rd.outputs import check_outputs


def add_parser(commands: argparse._SubParsersAction) -> None:
    defaults = NoveltySettings()
    p = commands.add_parser(
        "novelty", help="one-class novelty detection (the paper's Table 2)",
        description="Train on each class in turn and test on the whole test set (that class "
        "normal, all others anomalous); writes OUT/report.md and OUT/report.json (per-class "
        "AUROC and ROC, mean, settings, wall times) and OUT/checkpoints/.")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="mnist: class folders or their .tar.gz; fashion-mnist: gzip IDX files; "
                   "cifar10: cifar-10-batches-bin or class folders; folders: "
                   "ROOT/{train,test}/<class>/")
    p.add_argument("--root", type=Path, required=True, help="where the dataset is")
    p.add_argument("--out", type=Path, required=True, help="folder for the report")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report (and checkpoints) of an earlier run in --out")
    p.add_argument("--classes", nargs="+", help="class names or indices (default: all)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--backbone", default=defaults.backbone, choices=list_backbones(),
                   help="teacher (the paper's: resnet18, needs its ImageNet file)")
    p.add_argument("--image-size", type=int, default=defaults.image_size,
                   help="input size, a multiple of 32 (the paper's: 32)")
    p.add_argument("--train-limit", type=int,
                   help="at most N training images per class, a seeded random subset")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="the teacher's ImageNet normalisation (default: the paper's choice: "
                   "none for mnist and fashion-mnist, on otherwise)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_novelty)


def cmd_novelty(args: argparse.Namespace) -> int:
    settings = NoveltySettings(backbone=args.backbone, image_size=args.image_size,
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, normalize=args.normalize,
                               train_limit=args.train_limit, device=args.device)
    settings.train_config(args.dataset)  # bad options fail before the data is read
    earlier = sorted((args.out / "checkpoints").glob("*")) if args.out.is_dir() else []
    check_outputs([args.out / "report.json", args.out / "report.md", *earlier], [args.root],
                  args.overwrite)
    dataset = open_dataset(args.dataset, args.root)
    print(f"{dataset.name}: {len(dataset.train.labels)} training and {len(dataset.test.labels)} "
          f"test images of {len(dataset.classes)} classes, {dataset.image_shape}", flush=True)

    def show(entry: dict[str, Any]) -> None:
        print(f"class {entry['index']} {entry['class']}: AUROC {100 * entry['auroc']:.1f} "
              f"({entry['seconds']['total']:.0f} s)", flush=True)

    command = shlex.join(["python", "-m", "rd", *getattr(args, "argv", [])])
    report = run_novelty(dataset, settings, args.out, args.classes, progress=not args.quiet,
                         command=command, on_class=show)
    print(f"mean AUROC {100 * report['mean_auroc']:.1f} over {len(report['results'])} classes "
          f"in {report['seconds_total']:.0f} s; report {args.out / 'report.md'}, "
          f"{args.out / 'report.json'}")
    return 0
