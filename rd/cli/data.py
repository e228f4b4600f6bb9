"""Data and model-listing commands: ``holdout``, ``register``, ``builtin`` and ``download``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rd.data import ensure_builtin_dataset, generate_dataset, holdout_view
from rd.data.synthetic import HARD_CATEGORIES
from rd.download import ARCHIVES, BASE_URL_ENV, LICENCE, download_mvtec, total_size
from rd.pipeline import register_model


def add_holdout_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("holdout", help="hold out normal training images as test images",
                            description="Make a symlinked view of a category in which the "
                            "last COUNT training images are extra normal test images.")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--out", type=Path, required=True, help="new root folder for the view")
    p.set_defaults(func=cmd_holdout)


def cmd_holdout(args: argparse.Namespace) -> int:
    out = holdout_view(args.data, args.category, args.count, args.out)
    print(f"{out / args.category}: {args.count} training images held out as normal test images")
    return 0


def add_register_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("register", help="make a checkpoint available to the app",
                            description="Copy a checkpoint into the user's model folder and "
                            "list it in the user manifest under a dataset name.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--dataset", required=True,
                   help="data source name as the app shows it (builtin, mvtec_subset, or the "
                   "folder name of an MVTec root you added)")
    p.add_argument("--category", help="default: the category stored in the checkpoint")
    p.add_argument("--manifest", type=Path,
                   help="manifest to add it to (default: the user's); a checkpoint outside the "
                   "manifest's folder is copied into it")
    p.set_defaults(func=cmd_register)


def cmd_register(args: argparse.Namespace) -> int:
    entry = register_model(args.checkpoint, args.dataset, args.category, args.manifest)
    print(f"registered {entry.dataset}/{entry.category}/{entry.backbone} -> {entry.path} in "
          f"{entry.manifest}")
    return 0


def add_builtin_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("builtin", help="print the built-in dataset's folder",
                            description="Generate the built-in dataset on first use and print "
                            "its root folder.")
    p.add_argument("--hard", type=Path, metavar="FOLDER",
                   help="instead, generate the opt-in hard categories (non-square grey parts "
                   f"with hairline cracks, unevenness and fine scratches: "
                   f"{', '.join(HARD_CATEGORIES)}) into FOLDER and print it")
    p.set_defaults(func=cmd_builtin)


def cmd_builtin(args: argparse.Namespace) -> int:
    if args.hard:
        print(generate_dataset(args.hard, list(HARD_CATEGORIES), n_train=20, n_test_good=10,
                               n_per_defect=6))
        return 0
    print(ensure_builtin_dataset())
    return 0


def add_download_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "download", help="fetch MVTec AD (CC BY-NC-SA 4.0, non-commercial)",
        description="Download, verify (SHA-256) and unpack MVTec AD categories into "
        "ROOT/<category>. A broken download resumes when run again. " + LICENCE)
    p.add_argument("dataset", choices=["mvtec"])
    p.add_argument("--category", action="extend", nargs="+", metavar="C",
                   help=f"some of: {', '.join(ARCHIVES)} (default: all 15, about "
                   f"{total_size(ARCHIVES)})")
    p.add_argument("--root", type=Path, required=True, help="folder to unpack into")
    p.add_argument("--archive", type=Path, help="unpack this already downloaded archive (a "
                   "category's, or mvtec_anomaly_detection.tar.xz) instead of downloading")
    p.add_argument("--base-url", help="a mirror serving <category>.tar.xz (also "
                   f"${BASE_URL_ENV})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    paths = download_mvtec(args.root, args.category, args.base_url, not args.quiet,
                           args.archive)
    print(f"MVTec AD in {args.root}: {', '.join(p.name for p in paths)}; train with "
          f"python -m rd train --data {args.root} --category {paths[0].name}")
    return 0
