"""``python -m rd predict``: score images or whole folders, one row per image, and write
overlays and raw maps (rd.scoring); ``torchrun --nproc-per-node N -m rd predict ...`` shares
the images between N processes and merges their rows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rd.cli.common import add_inference_options, inference_options
from rd.files import file_sha256
from rd.results import ResultsStore
from rd.runtime import describe, load_runtime
from rd.scoring import (
    SAVE_MAPS,
    Inputs,
    ScoringError,
    check_output,
    collect_inputs,
    init_distributed,
    leave_distributed,
    rank_zero_first,
    score,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict", help="score images or folders (and write heat maps)",
        description="Score image files, folders (searched recursively) and glob patterns. "
        "Without --csv/--jsonl print one line per image (path, score, verdict); with them write "
        "one row per image as it completes (path, score, verdict, width, height, seconds, "
        "error), resumable with --resume. With --out write overlay PNGs and raw fused maps "
        "(<name>.npy, float32, S×S at the model's input size), each at the image's path "
        "relative to the images' common folder.")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("images", nargs="*", help="image files, folders or quoted glob patterns")
    p.add_argument("--list", type=Path, dest="list_file",
                   help="a text file of image paths, one per line")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    rows.add_argument("--jsonl", type=Path, help="write the rows to this JSON-lines file")
    p.add_argument("--resume", action="store_true",
                   help="continue an output file: skip the images already in it")
    p.add_argument("--threshold", type=float,
                   help="verdict threshold (default: the checkpoint's F1 threshold)")
    p.add_argument("--out", type=Path, help="folder for overlays and raw maps")
    p.add_argument("--save-maps", choices=SAVE_MAPS,
                   help="which images get maps in --out (default: all when --out is given)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int,
                   help="image-decoding processes (0: decode in the main process; default: "
                        "with ONNX Runtime on a CPU each of the model's threads decodes its "
                        "own images, else 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-store", action="store_true",
                   help="neither read nor keep scores in the results store of the data home "
                        "(by default an image scored before under this checkpoint, e.g. in "
                        "the studio, gets that score: one score and verdict everywhere)")
    p.add_argument("--teacher-weights", type=Path)
    add_inference_options(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    out = args.csv or args.jsonl
    output_format = "csv" if args.csv else "jsonl" if args.jsonl else None
    if out is not None:
        check_output(out, output_format, args.resume)
    save_maps = args.save_maps or ("all" if args.out else "none")
    if save_maps != "none" and args.out is None:
        raise ValueError("--save-maps needs --out DIR, the folder for the maps")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}")
    inputs = collect_inputs(args.images, args.list_file)
    rank, world = init_distributed()
    try:
        _score_as_rank(args, out, output_format, save_maps, inputs, rank, world)
    finally:
        leave_distributed()  # every rank, also after an error
    return 0


def _score_as_rank(args: argparse.Namespace, out: Path | None, output_format: str | None,
                   save_maps: str, inputs: Inputs, rank: int, world: int) -> None:
    device = args.device
    if world > 1 and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    detector, choice = rank_zero_first(lambda: load_runtime(
        args.checkpoint, device, args.runtime, args.teacher_weights,
        **inference_options(args)))  # rank 0 writes the ONNX cache, the others read it
    detector.batch_size = args.batch_size
    summary = score(detector, inputs, out, output_format, resume=args.resume,
                    threshold=args.threshold, save_maps=save_maps,
                    maps_dir=args.out if save_maps != "none" else None,
                    workers=args.workers,
                    progress=not args.quiet and rank == 0 and sys.stderr.isatty(),
                    print_row=print, static_batches=args.compile,
                    overwrite=args.overwrite,
                    store=None if args.no_store else ResultsStore(),
                    model=None if args.no_store else file_sha256(args.checkpoint))
    if summary.scored and summary.errors == summary.scored:
        raise ScoringError(f"no image could be read; the first: {summary.first_error}")
    if rank == 0:
        skipped = f", {summary.skipped} already in {out}" if summary.skipped else ""
        print(f"scored {summary.scored} images ({summary.errors} unreadable, "
              f"{summary.defective} defective) in {summary.seconds:.1f} s, "
              f"{summary.images_per_second:.1f} images/s{skipped}; {describe(choice)}",
              file=sys.stderr)
        if args.threshold is None and detector.metadata.threshold("f1") is None:
            print("note: the checkpoint has no threshold (no verdicts); overlays use each "
                  "image's own range", file=sys.stderr)
