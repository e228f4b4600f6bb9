"""``python -m rd train``: train a student, evaluate it and write its report."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from rd.adapt import ADAPT_MODES
from rd.augment import TRANSFORMS
from rd.backbones import DEFAULT_BACKBONE, list_backbones
from rd.cli.common import add_data_options, open_data, print_table
from rd.geometry import RESIZE_MODES
from rd.pipeline import train_and_evaluate
from rd.training import (
    ALIGNED_MODES,
    BEYOND_PAPER_OPTIONS,
    LR_SCHEDULES,
    POSITION_MODES,
    PRESETS,
    TURN_MODES,
    TrainConfig,
)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = commands.add_parser("train", help="train a student on normal images",
                            description="Train with the paper's recipe (options change it).")
    add_data_options(p)
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
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC weights and inputs (speed; same results within rounding)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student's training step (slow first step)")
    p.add_argument("--cache-teacher", default="auto", choices=["auto", "on", "off"],
                   help="compute the frozen teacher's features once (exact; auto: if they fit)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--teacher-weights", type=Path, help="teacher weights file (state dict)")
    p.add_argument("--init", type=Path, help="fine-tune from this checkpoint's student")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the teacher's mean/std to the input (default); "
                   "--no-normalize feeds pixels in [0, 1]")
    beyond = p.add_argument_group(
        "beyond the paper (off by default; docs/results.md, 'Beyond the paper')")
    beyond.add_argument("--resize", choices=RESIZE_MODES,
                        help="squash to the square (the paper, default), letterbox (keep the "
                        "aspect ratio, padding masked out), tile (overlapping model-size tiles "
                        "near native resolution) or multiscale (tiles and the whole image, "
                        "each view's map blurred at its own scale, then averaged)")
    beyond.add_argument("--tile-scale", type=float,
                        help="with --resize tile: scale the image by this before tiling "
                        "(default 1 = native pixels)")
    beyond.add_argument("--teacher-adapt", choices=ADAPT_MODES,
                        help="adapt the teacher to the normal images first: bn (deepest "
                        "stage's batch-norm statistics, blended with ImageNet's) or ssl "
                        "(compactness fine-tune of the deepest stage); default none")
    beyond.add_argument("--augment", metavar="none|auto|LIST",
                        help="augment the normal images: auto keeps only the transforms that "
                        "stay in distribution; or a comma-separated list of "
                        f"{', '.join(TRANSFORMS)}")
    beyond.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help="constant (the paper, default) or cosine: the learning rate falls "
                        "toward 0 over the epochs, so the saved model does not land on a "
                        "loss spike")
    beyond.add_argument("--ema", type=float, metavar="EPOCHS",
                        help="save a moving average of the student's weights with this "
                        "half-life in epochs (e.g. 1) instead of the last weights, which a "
                        "loss spike may have thrown off; default 0 = off (the paper)")
    beyond.add_argument("--position-stats", nargs="?", const=True, default=None,
                        type=_position_stats, metavar="auto|envelope|adaptive",
                        help="for parts that lie in place: add a per-position normal model "
                        "of the teacher's features to the map (large faint regions, misplaced "
                        "parts); the image score stays the paper's unless --position-score; "
                        "'--position-stats auto' keeps them only if the normal training images "
                        "say the parts lie in place (recorded in the checkpoint); "
                        "'--position-stats envelope' fits them with the --augment copies too and "
                        "maps only what exceeds every normal image there, for parts of unknown "
                        "kind; '--position-stats adaptive' is auto with the envelope where the "
                        "parts do not lie in place; default off")
    beyond.add_argument("--no-position-stats", dest="position_stats", action="store_const",
                        const=False, help="no position statistics (over a --preset)")
    beyond.add_argument("--position-score", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="with --position-stats: score an image by the larger of the "
                        "paper's score and the position statistics', each against the most "
                        "surprising normal training image; default off")
    beyond.add_argument("--aligned-stats", nargs="?", const=True, default=None,
                        type=_aligned_stats, metavar="auto",
                        help="for parts that turn and shift a little: register each image onto "
                        "the normal images' template and add a per-pixel colour model of the "
                        "registered normals to the map (outlines bent or moved, parts "
                        "missing); the image score stays the paper's; '--aligned-stats auto' "
                        "keeps it only if the registered normal images are alike (recorded in "
                        "the checkpoint); default off")
    beyond.add_argument("--no-aligned-stats", dest="aligned_stats", action="store_const",
                        const=False, help="no aligned statistics (over a --preset)")
    beyond.add_argument("--turn-average", nargs="?", const=True, default=None,
                        type=_turn_average, metavar="auto",
                        help="for parts that lie at any angle: average the paper's maps over "
                        "each image's four quarter turns at inference (four passes an image); "
                        "'--turn-average auto' does so only if quarter-turned normal images "
                        "stay normal as the teacher sees them (recorded in the checkpoint); "
                        "default off")
    beyond.add_argument("--no-turn-average", dest="turn_average", action="store_const",
                        const=False, help="no turn average (over a --preset)")
    beyond.add_argument("--preset", choices=sorted(PRESETS),
                        help="fixtured: the combination that won the study on parts that lie "
                        "in place (multiscale, augment auto, ema 1, position statistics in "
                        "map and score); robust: for parts of any kind, what won on every "
                        "dataset of the study (fixtured with the position statistics "
                        "adaptive, aligned statistics auto and turn average auto); explicit "
                        "flags win")
    p.add_argument("--resume", action="store_true", help="continue a stopped run of --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-evaluate", action="store_true", help="skip the final test-set report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
    return p


def _position_stats(value: str) -> str:
    if value not in POSITION_MODES:
        raise argparse.ArgumentTypeError(
            f"{', '.join(repr(mode) for mode in POSITION_MODES)} or nothing, got {value!r}")
    return value


def _aligned_stats(value: str) -> str:
    if value not in ALIGNED_MODES:
        raise argparse.ArgumentTypeError(f"'auto' or nothing, got {value!r}")
    return value


def _turn_average(value: str) -> str:
    if value not in TURN_MODES:
        raise argparse.ArgumentTypeError(f"'auto' or nothing, got {value!r}")
    return value


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the train options describe (validated)."""
    config = TrainConfig(
        backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, betas=tuple(args.betas), seed=args.seed,
        device=args.device, amp=args.amp, cache_teacher=args.cache_teacher,
        channels_last=args.channels_last, compile=args.compile,
        checkpoint_every=args.checkpoint_every, workers=args.workers,
        teacher_weights=str(args.teacher_weights) if args.teacher_weights else None,
        init=str(args.init) if args.init else None, normalize=args.normalize,
        **beyond_paper_options(args))
    config.validate()
    return config


def beyond_paper_options(args: argparse.Namespace) -> dict[str, object]:
    """The options beyond the paper (--resize ... --ema): explicit flags, else the --preset's
    values, else the paper's defaults."""
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    options = {}
    for name in BEYOND_PAPER_OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            value = preset.get(name)
        if value is not None:
            options[name] = value
    if options.get("position_stats") is False and getattr(args, "position_score", None) is None:
        options.pop("position_score", None)  # --no-position-stats over a preset: neither
    return options


def cmd_train(args: argparse.Namespace) -> int:
    data = open_data(args)
    config = train_config(args)
    outcome = train_and_evaluate(
        data, config, args.out, resume=args.resume, overwrite=args.overwrite,
        evaluate_after=not args.no_evaluate, progress=not args.quiet,
        metadata={"command": shlex.join(["python", "-m", "rd", *args.argv])})
    if outcome.result.rank:
        return 0  # under torchrun, rank 0 alone reports and evaluates
    print("\n".join(outcome.summary()))
    if outcome.report is not None:
        print_table(outcome.report)
        print(f"report {outcome.report_path}")
    return 0
