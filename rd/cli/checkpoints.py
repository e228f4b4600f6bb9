"""Checkpoint commands: ``import-reference``, ``info``, ``export``, ``add-position-stats``,
``add-aligned-stats`` and ``add-turn-average``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rd.backbones import list_backbones
from rd.checkpoints import import_reference, read_metadata
from rd.cli.common import add_data_options, open_data
from rd.detector import load
from rd.export import (
    DEFAULT_OPSET,
    FORMATS,
    OUTPUT_NAMES,
    TOLERANCE,
    ExportError,
    export_onnx,
    verify_onnx,
)
from rd.model import parameter_counts
from rd.outputs import check_outputs
from rd.training import (
    add_aligned_statistics,
    add_position_statistics,
    add_turn_average,
    check_image_size,
)


def add_import_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("import-reference", help="convert a reference-code checkpoint",
                            description="Read {'bn': ..., 'decoder': ...} (weights_only) and "
                            "write our safetensors checkpoint.")
    p.add_argument("reference", type=Path)
    p.add_argument("--backbone", required=True, choices=list_backbones())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--category")
    p.add_argument("--teacher-weights", type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_import_reference)


def cmd_import_reference(args: argparse.Namespace) -> int:
    check_image_size(args.image_size)  # a size predict cannot use must not be imported
    check_outputs([args.out], [args.reference, args.teacher_weights], args.overwrite)
    meta = import_reference(args.reference, args.backbone, args.out, args.image_size,
                            args.teacher_weights, args.category)
    print(f"imported {args.reference} -> {args.out} ({meta['backbone']}, "
          f"{meta['preprocess']['size']} px)")
    return 0


def _refit_parser(commands: argparse._SubParsersAction, name: str, help: str,
                  description: str) -> argparse.ArgumentParser:
    """The options every add-* command takes: the data, the checkpoint, where to write it."""
    p = commands.add_parser(name, help=help, description=description)
    add_data_options(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    return p


def add_position_parser(commands: argparse._SubParsersAction) -> None:
    p = _refit_parser(
        commands, "add-position-stats", help="fit position statistics onto a trained checkpoint",
        description="For parts that lie in place: write the checkpoint again with a "
        "per-position normal model of the teacher's features fitted on the normal training "
        "images (what train --position-stats gives, without training again). Evaluate the "
        "new checkpoint afterwards: its stored metrics are left out.")
    p.add_argument("--position-score", action="store_true",
                   help="count them in the image score too (what train --position-score gives)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--envelope", action="store_const", const="envelope", dest="mode",
                      default=True,
                      help="fit them with the copies of the transforms the checkpoint's "
                      "--augment kept and map only what exceeds every normal image there "
                      "(what train --position-stats envelope gives)")
    kind.add_argument("--adaptive", action="store_const", const="adaptive", dest="mode",
                      help="the plain statistics if the normal images say the parts lie in "
                      "place, the envelope otherwise (what train --position-stats adaptive "
                      "gives)")
    p.set_defaults(func=cmd_add_position)


def cmd_add_position(args: argparse.Namespace) -> int:
    check_outputs([args.out], [args.checkpoint], args.overwrite)
    data = open_data(args)
    info = add_position_statistics(args.checkpoint, data.train_samples(), args.out,
                                   args.device, score=args.position_score,
                                   mode=args.mode)
    scored = f", score weight {info['score_weight']:.4g}" if info.get("score") else ""
    kind = "position envelope" if info.get("mode") == "envelope" else "position statistics"
    print(f"wrote {args.out}: {kind} of {info['images']} normal images, "
          f"weight {info['weight']:.4g}{scored} (evaluate it for its metrics and thresholds)")
    return 0


def add_aligned_parser(commands: argparse._SubParsersAction) -> None:
    p = _refit_parser(
        commands, "add-aligned-stats", help="fit aligned statistics onto a trained checkpoint",
        description="For parts that turn and shift a little: write the checkpoint again with "
        "a per-pixel colour model of the normal training images registered onto one template "
        "(what train --aligned-stats gives, without training again). Evaluate the new "
        "checkpoint afterwards: its stored metrics are left out.")
    p.set_defaults(func=cmd_add_aligned)


def cmd_add_aligned(args: argparse.Namespace) -> int:
    check_outputs([args.out], [args.checkpoint], args.overwrite)
    data = open_data(args)
    info = add_aligned_statistics(args.checkpoint, data.train_samples(), args.out, args.device)
    print(f"wrote {args.out}: aligned statistics of {info['images']} normal images, weight "
          f"{info['weight']:.4g}; {info['why']} (evaluate it for its metrics and thresholds)")
    return 0


def add_turn_average_parser(commands: argparse._SubParsersAction) -> None:
    p = _refit_parser(
        commands, "add-turn-average", help="average a trained checkpoint's maps over quarter turns",
        description="For parts that lie at any angle: write the checkpoint again with the "
        "paper's maps averaged over each image's four quarter turns (what train --turn-average "
        "gives, without training again; its position or aligned statistics are weighed again "
        "against the averaged map). Evaluate the new checkpoint afterwards: its stored "
        "metrics are left out.")
    p.set_defaults(func=cmd_add_turn_average)


def cmd_add_turn_average(args: argparse.Namespace) -> int:
    check_outputs([args.out], [args.checkpoint], args.overwrite)
    data = open_data(args)
    info = add_turn_average(args.checkpoint, data.train_samples(), args.out, args.device)
    print(f"wrote {args.out}: maps averaged over quarter turns; auto would "
          f"{'' if info['kept'] else 'not '}have: {info['why']} (evaluate it for its metrics "
          "and thresholds)")
    return 0


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export", help="export a checkpoint's whole inference graph (ONNX)",
        description="Write teacher + student + maps + blur + score as one ONNX file with a "
        "dynamic batch axis; input 'images' (N, 3, S, S) preprocessed as the checkpoint says "
        "(see the file's rd.preprocess metadata), outputs layer_maps, fused, scores.")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", type=Path, required=True, help="file to write (.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--verify", action="store_true",
                   help="run the file with onnxruntime and compare with torch (max diff 1e-4)")
    p.add_argument("--device", default="cpu", help="device to trace on (default cpu)")
    p.add_argument("--teacher-weights", type=Path)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    check_outputs([args.out], [args.checkpoint, args.teacher_weights], args.overwrite)
    detector = load(args.checkpoint, args.device, args.teacher_weights)
    path = export_onnx(detector, args.out, args.opset)
    print(f"exported {args.checkpoint} -> {path} ({path.stat().st_size / 2**20:.1f} MiB, "
          f"opset {args.opset}, input 'images' (N, 3, {detector.image_size}, "
          f"{detector.image_size}), outputs {', '.join(OUTPUT_NAMES)})")
    if args.verify:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(3, 3, detector.image_size, detector.image_size, generator=generator)
        differences = verify_onnx(path, detector, sample)
        worst = max(differences.values())
        print("onnxruntime vs torch, max abs difference: " +
              ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))
        if worst > TOLERANCE:
            raise ExportError(f"the exported graph differs from torch by {worst:.2e} "
                              f"(> {TOLERANCE:g})")
    return 0


def add_info_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("info", help="parameter counts, or a checkpoint's metadata",
                            description="info --backbone B: parameter counts (no weights "
                            "needed); info CKPT: the checkpoint's metadata.")
    p.add_argument("checkpoint", nargs="?", type=Path)
    p.add_argument("--backbone", choices=list_backbones())
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    if args.checkpoint is None and args.backbone is None:
        raise ValueError("give a checkpoint file or --backbone B")
    if args.checkpoint is not None:
        print(json.dumps(read_metadata(args.checkpoint).to_dict(), indent=1, sort_keys=True))
        return 0
    counts = parameter_counts(args.backbone)
    labels = {"teacher_network": "teacher (whole network)",
              "teacher_used": "teacher (layers used)",
              "bottleneck": "OCBE bottleneck", "decoder": "decoder"}
    for key, label in labels.items():
        print(f"{label:<26}{counts[key]:>14,}")
    print(f"{'student (OCBE + decoder)':<26}{counts['bottleneck'] + counts['decoder']:>14,}")
    return 0
