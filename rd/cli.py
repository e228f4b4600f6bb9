"""The command line: ``python -m rd COMMAND``. Thin: it parses, calls the modules, prints."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rd import download, export, jobs, novelty
from rd.backbones import DEFAULT_BACKBONE, WeightsError, list_backbones
from rd.checkpoints import CheckpointError, atomic_write, import_reference, read_metadata
from rd.data import DataError, MVTecCategory, PlainFolders, holdout_view, read_image
from rd.detector import add_inference_options, inference_options
from rd.evaluation import EvaluationError, evaluate, summary_rows
from rd.training import TrainConfig, TrainingError, train

KNOWN_ERRORS = (DataError, CheckpointError, TrainingError, WeightsError, EvaluationError,
                ValueError, OSError)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (an MVTec-layout root, or plain folders)")
    group.add_argument("--data", type=Path, help="MVTec-layout root: <root>/<category>/...")
    group.add_argument("--category", help="category folder under --data")
    group.add_argument("--normal", type=Path, help="plain layout: folder of normal images")
    group.add_argument("--test", type=Path, help="plain layout: folder of test images")
    group.add_argument("--masks", type=Path, help="plain layout: folder of masks (same names)")


def _open_data(args: argparse.Namespace) -> MVTecCategory | PlainFolders:
    if args.data is not None:
        if args.normal is not None:
            raise DataError("give either --data/--category (MVTec layout) or --normal (plain "
                            "folders), not both")
        if not args.category:
            raise DataError("--data needs --category (one of the folders under it)")
        return MVTecCategory(args.data, args.category)
    if args.normal is None:
        raise DataError("no data: give --data ROOT --category C, or --normal DIR [--test DIR]")
    return PlainFolders(args.normal, args.test, args.masks)


def _print_table(report: dict[str, Any]) -> None:
    header = ("defect", "n", "img AUROC", "px AUROC", "AU-PRO")
    rows = [header, *summary_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    if "legacy_pro" in report:
        print(f"legacy per-image PRO (reference code): {100 * report['legacy_pro']:.1f}")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.save would append ".npy" to a name
        np.save(handle, array)


def _metrics_summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("image_auroc", "pixel_auroc", "au_pro", "n_images", "n_normal", "n_defective")
    return {**{k: report[k] for k in keys},
            "thresholds": {k: v["threshold"] for k, v in report["thresholds"].items()}}


# ------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    data = _open_data(args)
    config = TrainConfig(
        backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, betas=tuple(args.betas), seed=args.seed,
        device=args.device, amp=args.amp, cache_teacher=args.cache_teacher,
        checkpoint_every=args.checkpoint_every, workers=args.workers,
        teacher_weights=str(args.teacher_weights) if args.teacher_weights else None,
        init=str(args.init) if args.init else None, normalize=args.normalize)
    config.validate()
    if args.out.exists() and not (args.resume or args.overwrite):
        raise TrainingError(f"{args.out} exists: pass --overwrite to replace it, or --resume")
    metadata = {"category": getattr(data, "category", None), "data": repr(data),
                "command": shlex.join(["python", "-m", "rd", *args.argv])}
    result = train(data.train_samples(), config, args.out, metadata, resume=args.resume,
                   progress=not args.quiet)
    if result.rank:
        return 0  # under torchrun, rank 0 alone reports and evaluates
    print(f"trained {result.epochs_trained} epochs in {result.seconds:.1f} s; "
          f"final loss {result.losses[-1] if result.losses else float('nan'):.4f}; "
          f"checkpoint {args.out}")
    if args.no_evaluate:
        return 0
    try:
        test = data.test_samples()
    except DataError as error:
        print(f"not evaluated: {error}")
        return 0
    from rd.checkpoints import update_metadata
    from rd.detector import Detector

    detector = Detector(result.model, read_metadata(args.out), config.device)
    try:
        report = evaluate(detector, test, progress=not args.quiet)
    except EvaluationError as error:
        print(f"not evaluated: {error}")
        return 0
    _print_table(report)
    update_metadata(args.out, {"metrics": _metrics_summary(report),
                               "normal_scores": report["normal_scores"]})
    report_path = args.out.with_name(args.out.name.removesuffix(".safetensors") + ".report.json")
    _write_json(report_path, report)
    print(f"report {report_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rd.detector import load

    data = _open_data(args)
    test = data.test_samples()
    detector = load(args.checkpoint, args.device, args.teacher_weights,
                    **inference_options(args))
    detector.batch_size = args.batch_size
    report = evaluate(detector, test, legacy_pro=args.legacy_pro, progress=not args.quiet,
                      workers=args.workers)
    report["checkpoint"] = str(args.checkpoint)
    report["category"] = getattr(data, "category", None)
    _print_table(report)
    if args.json:
        _write_json(args.json, report)
        print(f"report {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rd.detector import load
    from rd.visualize import colorize, overlay

    detector = load(args.checkpoint, args.device, args.teacher_weights,
                    **inference_options(args))
    threshold = detector.metadata.get("metrics", {}).get("thresholds", {}).get("f1")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = read_image(path)
        detection = detector.predict(image)
        score = float(detection.scores[0])
        flag = "" if threshold is None else ("\tdefective" if score >= threshold else "\tnormal")
        print(f"{path}\t{score:.6f}{flag}")
        if args.out:
            fused = detection.fused[0].astype(np.float32)
            top = 2 * threshold if threshold else float(fused.max()) or 1.0
            blended = overlay(image, colorize(fused, 0.0, top))
            stem = Path(path).stem
            atomic_write(args.out / f"{stem}.png",
                         lambda tmp, im=blended: im.save(tmp, format="PNG"))
            atomic_write(args.out / f"{stem}.npy", lambda tmp, m=fused: _save_npy(tmp, m))
    if args.out and threshold is None:
        print("note: the checkpoint has no threshold; overlays use each image's own range")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    meta = import_reference(args.reference, args.backbone, args.out, args.image_size,
                            args.teacher_weights, args.category)
    print(f"imported {args.reference} -> {args.out} ({meta['backbone']}, "
          f"{meta['preprocess']['size']} px)")
    return 0


def cmd_holdout(args: argparse.Namespace) -> int:
    out = holdout_view(args.data, args.category, args.count, args.out)
    print(f"{out / args.category}: {args.count} training images held out as normal test images")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    import shutil

    from rd.manifest import register, user_manifest

    meta = read_metadata(args.checkpoint)
    category = args.category or meta.get("category")
    if not category:
        raise ValueError("the checkpoint names no category: pass --category")
    manifest = args.manifest or user_manifest()
    target = args.checkpoint
    if not args.checkpoint.resolve().is_relative_to(manifest.resolve().parent):
        target = manifest.parent / args.dataset / category / f"{meta['backbone']}.safetensors"
        atomic_write(target, lambda tmp: shutil.copyfile(args.checkpoint, tmp))
    entry = register(manifest, target, args.dataset, category, meta["backbone"],
                     command=meta.get("command", ""), report=meta.get("metrics", {}))
    print(f"registered {args.dataset}/{category}/{entry.backbone} -> {target} in {manifest}")
    return 0


def cmd_builtin(args: argparse.Namespace) -> int:
    from rd.data.synthetic import ensure_builtin_dataset

    print(ensure_builtin_dataset())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rd.model import parameter_counts

    if args.checkpoint is None and args.backbone is None:
        raise ValueError("give a checkpoint file or --backbone B")
    if args.checkpoint is not None:
        print(json.dumps(read_metadata(args.checkpoint), indent=1, sort_keys=True))
        return 0
    counts = parameter_counts(args.backbone)
    labels = {"teacher_network": "teacher (whole network)",
              "teacher_used": "teacher (layers used)",
              "bottleneck": "OCBE bottleneck", "decoder": "decoder"}
    for key, label in labels.items():
        print(f"{label:<26}{counts[key]:>14,}")
    print(f"{'student (OCBE + decoder)':<26}{counts['bottleneck'] + counts['decoder']:>14,}")
    return 0


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    p = commands.add_parser("train", help="train a student on normal images",
                            description="Train with the paper's recipe (options change it).")
    _add_data_options(p)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=list_backbones())
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--betas", type=float, nargs=2, default=list(defaults.betas))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--cache-teacher", default="auto", choices=["auto", "on", "off"],
                   help="compute the frozen teacher's features once (exact; auto: if they fit)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--teacher-weights", type=Path, help="teacher weights file (state dict)")
    p.add_argument("--init", type=Path, help="fine-tune from this checkpoint's student")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the teacher's mean/std to the input (default); "
                   "--no-normalize feeds pixels in [0, 1]")
    p.add_argument("--resume", action="store_true", help="continue a stopped run of --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-evaluate", action="store_true", help="skip the final test-set report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="metrics of a checkpoint on a test set",
                            description="Print a metrics table; --json writes the full report.")
    _add_data_options(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--legacy-pro", action="store_true",
                   help="also compute the reference code's per-image PRO")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--teacher-weights", type=Path)
    p.add_argument("--quiet", action="store_true")
    add_inference_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("predict", help="score images (and write heat maps)",
                            description="Print one score per image; with --out write for each "
                            "image an overlay PNG and the raw fused map as <name>.npy "
                            "(float32, S×S at the model's input size).")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="folder for overlays and raw maps")
    p.add_argument("--device", default="auto")
    p.add_argument("--teacher-weights", type=Path)
    add_inference_options(p)
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("import-reference", help="convert a reference-code checkpoint",
                            description="Read {'bn': ..., 'decoder': ...} (weights_only) and "
                            "write our safetensors checkpoint.")
    p.add_argument("reference", type=Path)
    p.add_argument("--backbone", required=True, choices=list_backbones())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--category")
    p.add_argument("--teacher-weights", type=Path)
    p.set_defaults(func=cmd_import_reference)

    p = commands.add_parser("holdout", help="hold out normal training images as test images",
                            description="Make a symlinked view of a category in which the "
                            "last COUNT training images are extra normal test images.")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--out", type=Path, required=True, help="new root folder for the view")
    p.set_defaults(func=cmd_holdout)

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

    p = commands.add_parser("builtin", help="print the built-in dataset's folder",
                            description="Generate the built-in dataset on first use and print "
                            "its root folder.")
    p.set_defaults(func=cmd_builtin)

    download.add_parser(commands)
    jobs.add_parser(commands)
    novelty.add_parser(commands)
    export.add_parser(commands)

    p = commands.add_parser("info", help="parameter counts, or a checkpoint's metadata",
                            description="info --backbone B: parameter counts (no weights "
                            "needed); info CKPT: the checkpoint's metadata.")
    p.add_argument("checkpoint", nargs="?", type=Path)
    p.add_argument("--backbone", choices=list_backbones())
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KNOWN_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
