"""``python -m rd evaluate``: the metrics of a checkpoint on a test set."""

from __future__ import annotations

import argparse
from pathlib import Path

from rd.cli.common import (
    add_data_options,
    add_inference_options,
    inference_options,
    open_data,
    print_table,
    write_json,
)
from rd.evaluation import EVAL_SIZES, evaluate
from rd.outputs import check_outputs
from rd.runtime import describe, load_runtime


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="metrics of a checkpoint on a test set",
                            description="Print a metrics table; --json writes the full report.")
    add_data_options(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--legacy-pro", action="store_true",
                   help="also compute the reference code's per-image PRO")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0,
                   help="image-decoding processes (default 0: with ONNX Runtime on a CPU each "
                        "of the model's threads decodes its own images, else this process)")
    p.add_argument("--teacher-weights", type=Path)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--eval-size", choices=EVAL_SIZES, default="model",
                   help="pixel metrics on the model's S×S maps (default, the paper's) or at the "
                   "images' native size (maps upsampled, masks as stored)")
    add_inference_options(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.json:
        check_outputs([args.json], [args.checkpoint, args.teacher_weights], args.overwrite)
    data = open_data(args)
    test = data.test_samples()
    detector, choice = load_runtime(args.checkpoint, args.device, args.runtime,
                                    args.teacher_weights, **inference_options(args))
    print(describe(choice))  # stdout: stderr holds only an error, in one line
    detector.batch_size = args.batch_size
    report = evaluate(detector, test, legacy_pro=args.legacy_pro, progress=not args.quiet,
                      workers=args.workers, eval_size=args.eval_size)
    report["checkpoint"] = str(args.checkpoint)
    report["category"] = getattr(data, "category", None)
    print_table(report)
    if args.json:
        write_json(args.json, report)
        print(f"report {args.json}")
    return 0
