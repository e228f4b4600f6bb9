"""``python -m rd predict``: score images, and write overlays and raw maps."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rd.cli.common import add_inference_options, inference_options
from rd.data import read_image
from rd.detector import load
from rd.files import atomic_write
from rd.outputs import check_outputs, mirrored_outputs
from rd.visualize import colorize, overlay


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="score images (and write heat maps)",
                            description="Print one score per image; with --out write for each "
                            "image an overlay PNG and the raw fused map as <name>.npy "
                            "(float32, S×S at the model's input size).")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="folder for overlays and raw maps; each keeps the "
                   "image's path relative to the images' common folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--teacher-weights", type=Path)
    add_inference_options(p)
    p.set_defaults(func=cmd_predict)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.save would append ".npy" to a name
        np.save(handle, array)


def cmd_predict(args: argparse.Namespace) -> int:
    images = list(dict.fromkeys(args.images))
    planned = mirrored_outputs(images, args.out, (".png", ".npy")) if args.out else []
    check_outputs([path for paths in planned for path in paths.values()],
                  [*images, args.checkpoint, args.teacher_weights], args.overwrite)
    detector = load(args.checkpoint, args.device, args.teacher_weights,
                    **inference_options(args))
    threshold = detector.metadata.get("metrics", {}).get("thresholds", {}).get("f1")
    for index, path in enumerate(images):
        image = read_image(path)
        detection = detector.predict(image)
        score = float(detection.scores[0])
        flag = "" if threshold is None else ("\tdefective" if score >= threshold else "\tnormal")
        print(f"{path}\t{score:.6f}{flag}")
        if args.out:
            fused = detection.fused[0].astype(np.float32)
            top = 2 * threshold if threshold else float(fused.max()) or 1.0
            blended = overlay(image, colorize(fused, 0.0, top))
            outputs = planned[index]
            atomic_write(outputs[".png"], lambda tmp, im=blended: im.save(tmp, format="PNG"))
            atomic_write(outputs[".npy"], lambda tmp, m=fused: _save_npy(tmp, m))
    if args.out and threshold is None:
        print("note: the checkpoint has no threshold; overlays use each image's own range")
    return 0
