"""Options and printing shared by several commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rd.data import DataError, MVTecCategory, PlainFolders
from rd.detector import AMP_DTYPES
from rd.evaluation import format_summary
from rd.files import atomic_write
from rd.runtime import RUNTIMES


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (an MVTec-layout root, or plain folders)")
    group.add_argument("--data", type=Path, help="MVTec-layout root: <root>/<category>/...")
    group.add_argument("--category", help="category folder under --data")
    group.add_argument("--normal", type=Path, help="plain layout: folder of normal images")
    group.add_argument("--test", type=Path, help="plain layout: folder of test images")
    group.add_argument("--masks", type=Path, help="plain layout: folder of masks (same names)")
    group.add_argument("--allow-missing-masks", action="store_true",
                       help="MVTec layout: a defective test image without a mask counts for "
                       "the image metrics only (default: refused)")


def open_data(args: argparse.Namespace) -> MVTecCategory | PlainFolders:
    """The data the options name: an MVTec category or plain folders."""
    if args.data is not None:
        if args.normal is not None:
            raise DataError("give either --data/--category (MVTec layout) or --normal (plain "
                            "folders), not both")
        if not args.category:
            raise DataError("--data needs --category (one of the folders under it)")
        return MVTecCategory(args.data, args.category,
                             allow_missing_masks=getattr(args, "allow_missing_masks", False))
    if args.normal is None:
        raise DataError("no data: give --data ROOT --category C, or --normal DIR [--test DIR]")
    return PlainFolders(args.normal, args.test, args.masks)


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The Detector's speed options as command-line flags (evaluate, predict)."""
    group = parser.add_argument_group("speed (all off by default)")
    group.add_argument("--amp", choices=sorted(AMP_DTYPES),
                       help="autocast teacher and student on CUDA in this precision; maps and "
                       "scores move by up to about 1e-2")
    group.add_argument("--channels-last", action="store_true",
                       help="NHWC weights and inputs (same maps within 1e-5)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the predict graph (slow first batch)")
    group.add_argument("--runtime", choices=RUNTIMES,
                       help="auto (default): ONNX Runtime on the CPU when installed and the "
                       "model exports (the graph is exported once, cached beside the "
                       "checkpoint), torch otherwise")


def inference_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``rd.detector.load`` that add_inference_options parsed."""
    return {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}


def print_table(report: dict[str, Any]) -> None:
    """An evaluation report's per-defect metrics as an aligned table."""
    print(format_summary(report))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
