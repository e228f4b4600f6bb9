"""One training loop: the paper's recipe by default, resumable exactly, teacher features cached.

The recipe (REFERENCE.md §2): 256 px, no augmentation, Adam lr 0.005 betas (0.5, 0.999), batch 16,
200 epochs, seed 111. Training never looks at the test set.

Exact resume: every ``checkpoint_every`` epochs the student, the optimizer state and the epoch
are written (atomically) to ``<out>.resume.safetensors``; the shuffling order of epoch ``e`` is
drawn from a generator seeded by ``(seed, e)``, so a resumed run follows the same path as an
uninterrupted one.

Weight average (``--ema E``, beyond the paper): an exponential moving average of the student's
weights and batch-norm statistics, with a half-life of E epochs, is updated after every step and is
what the checkpoints hold (the resume state keeps both, so a resumed run stays exact). It damps
the constant rate's loss spikes without lowering the rate the way a cosine schedule does.

Graceful stop: SIGTERM (or ``request_stop()``) lets the current step finish, writes the resume
state at that step (mid-epoch: the position and the epoch's loss sums so far) and raises
``TrainingStopped``, which ends ``python -m rd train`` with exit code 75 (``STOPPED_EXIT``);
``--resume`` then continues from that very step.

Distributed data parallel (``torchrun --nproc-per-node N -m rd train ...``; gloo on the CPU,
nccl on GPUs, one GPU per process): ``--batch-size`` is the *global* batch. Every process draws
the same ``epoch_order``, cuts it into global batches and takes every N-th image of each
(``DistributedSampler``'s split, without its padding), so a global batch holds the same images as
in one process, and the same learning rate applies. Each local loss is weighted by its share of
the global batch, so the gradients DDP averages equal the one-process gradient of that batch; the
differences are BatchNorm's batch statistics (computed over each process's part) and float
summation order: equal in expectation, not bit for bit. A last global batch smaller than N is
skipped. Each process caches the teacher's features of the whole training set for itself (the
cache is read in a different order every epoch). Rank 0 alone writes the log, the resume state
and the checkpoints; the logged loss is the mean over all processes' images.

A final batch of one image at 32 px: the one-class embedding is then 1x1, and batch norm cannot
normalise a single value per channel. At that size (only) a last batch that would give a process
a single image is merged into the batch before it (e.g. 17 images at batch 16: one step of 17).
Every other size keeps the paper's batches unchanged.

Safety: one run at a time writes an output (``output_lock``: a second run with the same ``out``
is refused); non-finite settings are refused before any work; a loss that turns NaN or infinite
stops training with ``TrainingError``, leaving the last checkpoint and resume state written
before it untouched; sizes whose training clearly cannot fit in memory are refused up front.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rd.adapt import ADAPT_MODES, adapt_teacher
from rd.alignment import calibrate as calibrate_aligned
from rd.alignment import fit_aligned_statistics
from rd.augment import (
    TRANSFORMS,
    augmentation,
    judge_turns,
    parse_augment,
    select_transforms,
)
from rd.backbones import DEFAULT_BACKBONE, get_backbone
from rd.checkpoints import (
    CheckpointError,
    CheckpointMetadata,
    load_checkpoint,
    load_student,
    save_checkpoint,
)
from rd.data import ImageDataset, Preprocess, Sample, read_image
from rd.errors import RDError
from rd.files import atomic_write, die_with_parent
from rd.geometry import Geometry, masked_distillation_loss, predict_native, training_dataset
from rd.losses import reverse_distillation_loss
from rd.model import ReverseDistillation, build_model, resolve_device
from rd.position import (
    calibrate,
    calibrate_envelope,
    calibrate_score,
    fit_envelope_statistics,
    fit_position_statistics,
    in_place_decision,
)

CACHE_MODES = ("auto", "on", "off")
# "auto" caches the teacher's features when they fit in this many bytes.
AUTO_CACHE_BYTES = 4 << 30
# Exit code of a training stopped on request (EX_TEMPFAIL: try again later, i.e. --resume).
STOPPED_EXIT = 75
# TrainConfig fields beyond the paper's recipe (recorded in the recipe only when set)
BEYOND_PAPER_OPTIONS = ("resize", "tile_scale", "teacher_adapt", "augment", "lr_schedule",
                        "ema", "position_stats", "position_score", "aligned_stats",
                        "turn_average")
# constant: the paper; cosine: the rate falls from --lr toward 0 over the epochs, so that the
# saved student does not land on one of the loss spikes of a constant 0.005 (docs/results.md)
LR_SCHEDULES = ("constant", "cosine")
# --preset NAME: named settings of those options, each what won the study of docs/results.md
# ("Beyond the paper") where it applies. "robust" (parts of any kind) beat the paper's recipe on
# all six datasets of the study, ahead in pixel AUROC and AU-PRO, never behind in image AUROC
# (round 22); "fixtured" (parts that lie in place: metal_strip, casting, transistor) beat it on
# each of those in every metric, or tied it at 1.000 (rounds 10 and 11).
PRESETS: dict[str, dict[str, Any]] = {
    "robust": {"resize": "multiscale", "augment": "auto", "ema": 1.0,
               "position_stats": "adaptive", "position_score": True, "aligned_stats": "auto",
               "turn_average": "auto"},
    "fixtured": {"resize": "multiscale", "augment": "auto", "ema": 1.0, "position_stats": True,
                 "position_score": True},
}
# --position-stats values besides on and off (rd.position)
POSITION_MODES = ("auto", "envelope", "adaptive")
# --aligned-stats values besides on and off (rd.alignment)
ALIGNED_MODES = ("auto",)
# --turn-average values besides on and off (ReverseDistillation.rd_maps, rd.augment.judge_turns)
TURN_MODES = ("auto",)
# At most this many normal training images weigh the position statistics against RD's map at
# each save (rd.position): a bounded cost, however many images train.
POSITION_CALIBRATION_IMAGES = 64
# Largest --image-size accepted (16x the paper's 256 px); larger inputs need tiling.
MAX_IMAGE_SIZE = 4096
# A lower bound of a training step's memory, in multiples of the teacher's three feature maps of
# the batch (features, their rebuilt copies, the cosine maps, gradients): used only to refuse
# sizes that cannot fit, so it errs low.
STEP_MEMORY_FACTOR = 4

_STOP = threading.Event()


class TrainingError(RDError, RuntimeError):
    """Training cannot start or continue; the message says what to change."""


class TrainingStopped(SystemExit):
    """Training stopped on request after a step, its resume state written.

    A SystemExit, so that ``python -m rd train`` (and each torchrun process) ends with
    ``STOPPED_EXIT`` without a traceback, and the job runner can tell a stop from a failure.
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(STOPPED_EXIT)
        self.epoch, self.step = epoch, step


def request_stop() -> None:
    """Ask a running ``train()`` to stop after its current step (what SIGTERM does)."""
    _STOP.set()


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """Read from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                 int(env.get("LOCAL_RANK", 0)))


@dataclass
class TrainConfig:
    """Options of one run; the defaults are the paper's recipe."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = 256
    epochs: int = 200
    batch_size: int = 16
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    device: str = "auto"
    amp: bool = False
    cache_teacher: str = "auto"
    checkpoint_every: int = 10
    workers: int = 0
    teacher_weights: str | None = None
    init: str | None = None
    # False feeds pixels in [0, 1] without the teacher's mean/std (the paper's MNIST handling)
    normalize: bool = True
    # Beyond the paper (issue 11; defaults = the paper): rd.geometry, rd.adapt, rd.augment
    resize: str = "squash"
    tile_scale: float = 1.0
    teacher_adapt: str = "none"
    augment: str = "none"
    lr_schedule: str = "constant"
    # half-life in epochs of the moving average of the student's weights saved; 0 = the last
    # weights (the paper)
    ema: float = 0.0
    # a per-position normal model of the teacher's features added to the map (rd.position);
    # "auto": kept only where the normal images say the parts lie in place; "envelope": fitted
    # with the augmented copies too, only what exceeds every normal image there counts;
    # "adaptive": "auto"'s statistics where the parts lie in place, the envelope elsewhere
    position_stats: bool | str = False
    # ... and in the image score: the larger of RD's and theirs, each against the most
    # surprising normal training image (needs position_stats)
    position_score: bool = False
    # a per-pixel colour model of the normal images registered onto one template, added to the
    # map (rd.alignment); "auto": kept only where the registered normal images are alike
    aligned_stats: bool | str = False
    # RD's maps averaged over each image's four quarter turns at inference (ReverseDistillation.
    # rd_maps); "auto": only where quarter-turned normal images stay normal (rd.augment)
    turn_average: bool | str = False
    # Speed only (issue 12; maps equal within float rounding): NHWC weights and inputs, and
    # torch.compile of the student's step. Recorded in the recipe when set.
    channels_last: bool = False
    compile: bool = False

    def validate(self) -> None:
        """Refuse settings that cannot train (before any work), with the flag to change."""
        try:
            get_backbone(self.backbone)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        integers = {"image_size": self.image_size, "epochs": self.epochs,
                    "batch_size": self.batch_size, "seed": self.seed,
                    "checkpoint_every": self.checkpoint_every, "workers": self.workers}
        for name, value in integers.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrainingError(f"--{name.replace('_', '-')} must be a whole number, got "
                                    f"{value!r}")
        numbers = {"--lr": self.lr, "--betas": self.betas, "--ema": self.ema}
        for flag, value in numbers.items():
            values = value if isinstance(value, tuple | list) else (value,)
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                       for v in values):
                raise TrainingError(f"{flag} must be finite numbers, got {value!r}")
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.image_size > 32 or self.batch_size >= 2,
             "--image-size 32 needs --batch-size 2 or more (batch norm of a 1x1 embedding "
             "needs two images)"),
            (self.lr > 0, f"--lr (learning rate) must be positive, got {self.lr}"),
            (self.ema >= 0, f"--ema (a half-life in epochs) must be 0 (off) or more, got "
                            f"{self.ema}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"--betas must be two numbers in [0, 1), got {self.betas}"),
            (self.cache_teacher in CACHE_MODES,
             f"--cache-teacher must be one of {CACHE_MODES}, got {self.cache_teacher!r}"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.workers >= 0, "--workers must be 0 or more"),
            (isinstance(self.position_stats, bool) or self.position_stats in POSITION_MODES,
             f"--position-stats is on, off, {', '.join(POSITION_MODES[:-1])} or "
             f"{POSITION_MODES[-1]}, got {self.position_stats!r}"),
            (self.position_stats or not self.position_score,
             "--position-score scores with the position statistics: add --position-stats"),
            (self.position_stats != "envelope" or not self.position_score,
             "--position-score does not combine with --position-stats envelope (no normal image "
             "exceeds the envelope, so there is no normal maximum to weigh the scores by)"),
            (isinstance(self.aligned_stats, bool) or self.aligned_stats in ALIGNED_MODES,
             f"--aligned-stats is on, off or auto, got {self.aligned_stats!r}"),
            (isinstance(self.turn_average, bool) or self.turn_average in TURN_MODES,
             f"--turn-average is on, off or auto, got {self.turn_average!r}"),
        ]
        check_image_size(self.image_size)
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        try:
            resolve_device(self.device)
            Geometry(self.resize, self.tile_scale)
            parse_augment(self.augment)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"--lr-schedule must be one of {LR_SCHEDULES}, got "
                                f"{self.lr_schedule!r}")
        if self.teacher_adapt not in ADAPT_MODES:
            raise TrainingError(f"--teacher-adapt must be one of {ADAPT_MODES}, got "
                                f"{self.teacher_adapt!r}")

    def recipe(self) -> dict[str, Any]:
        """The settings that determine the result (recorded in checkpoints, checked on resume)."""
        keys = ("backbone", "image_size", "epochs", "batch_size", "lr", "betas", "seed", "amp",
                "init", "normalize")
        values = asdict(self)
        recipe = {k: list(values[k]) if k == "betas" else values[k] for k in keys}
        # the options beyond the paper appear only when set, so the paper's recipe reads as before
        recipe.update({k: values[k] for k in BEYOND_PAPER_OPTIONS
                       if values[k] != getattr(TrainConfig, k)})
        recipe.update({k: True for k in ("channels_last", "compile") if values[k]})
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Every option as JSON-ready values (what a job's spec stores)."""
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config ``to_dict`` wrote, validated; unknown or ill-typed options are refused."""
        if not isinstance(values, dict):
            raise TrainingError(f"a training configuration is a JSON object, got {values!r}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainingError(f"unknown training option {unknown[0]!r}")
        betas = values.get("betas", cls.betas)
        if not isinstance(betas, list | tuple):
            raise TrainingError(f"--betas must be two numbers, got {betas!r}")
        config = cls(**{**values, "betas": tuple(betas)})
        for name in ("backbone", "device", "cache_teacher"):
            if not isinstance(getattr(config, name), str):
                raise TrainingError(f"{name} must be a string, got {getattr(config, name)!r}")
        for name in ("amp", "normalize", "channels_last", "compile", "position_score"):
            if not isinstance(getattr(config, name), bool):
                raise TrainingError(f"{name} must be true or false, got "
                                    f"{getattr(config, name)!r}")
        for name in ("teacher_weights", "init"):
            if not isinstance(getattr(config, name), str | None):
                raise TrainingError(f"{name} must be a path or null, got "
                                    f"{getattr(config, name)!r}")
        config.validate()
        return config


@dataclass
class TrainResult:
    model: ReverseDistillation
    epochs_trained: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0  # under torchrun, only rank 0 goes on to evaluate and report


@dataclass(frozen=True)
class _Position:
    """Where training stands: epochs completed, steps done into the next one, and that epoch's
    loss sums so far (this process's share)."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    images: int = 0


def check_image_size(size: object) -> None:
    """Refuse an input size the model cannot take: a multiple of 32 from 32 to MAX_IMAGE_SIZE
    (the student's stride-32 embedding must tile the image exactly)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TrainingError(f"--image-size must be a whole number, got {size!r}")
    if size < 32 or size % 32:
        raise TrainingError(f"--image-size must be a multiple of 32 and at least 32, got {size}")
    if size > MAX_IMAGE_SIZE:
        raise TrainingError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {size}")


def resume_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".resume.safetensors")


def log_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".log.jsonl")


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".lock")


_HELD_LOCKS: dict[Path, int] = {}  # lock file -> how many nested output_lock()s hold it here


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold ``<out>.lock`` (``fcntl.flock``) while writing ``out`` and its siblings.

    A second run with the same ``out`` -- another process, or the app's job for the same model
    slot -- is refused at once with ``TrainingError`` instead of interleaving its log and
    checkpoints. Re-entrant within a process (the pipeline holds it around ``train``). The lock
    goes with the process: a killed run never leaves a stale lock behind.
    """
    path = Path(os.path.abspath(lock_path(out)))
    if path in _HELD_LOCKS:
        _HELD_LOCKS[path] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, out)
    _HELD_LOCKS[path] = 1
    try:
        yield
    finally:
        del _HELD_LOCKS[path]
        path.unlink(missing_ok=True)  # still held: no other run can be between open and lock
        os.close(handle)


def _acquire(path: Path, out: str | Path) -> int:
    """Open and lock ``path``; refuse if another process holds it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(handle)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise TrainingError(f"another training run is writing {out} (it holds {path}): "
                                "wait for it to finish, or choose another --out") from None
        try:
            same = os.fstat(handle).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.write(handle, f"{os.getpid()}\n".encode())
            return handle
        os.close(handle)  # the holder removed the file as we opened it: lock the new one


def epoch_lr(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (1-based): --lr throughout (the paper), or a cosine
    from --lr at the first epoch toward 0 after the last. A function of the epoch alone, so a
    resumed run follows the same schedule."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    """The shuffling order of one epoch, independent of what ran before it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def train(samples: Sequence[Sample], config: TrainConfig, out: str | Path,
          metadata: dict[str, Any] | None = None, resume: bool = False,
          progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None
          ) -> TrainResult:
    """Train a student on normal ``samples`` and write the checkpoint ``out``.

    ``metadata`` (category, data source...) is stored in the checkpoint. ``on_epoch`` receives
    each epoch's log record. Under torchrun every process calls this (see the module's notes);
    SIGTERM stops it gracefully (``TrainingStopped``).
    """
    config.validate()
    out = Path(out)
    if not samples:
        raise TrainingError("no training images: the normal-image folder is empty")
    place = current_world()
    if place.size > max(1, min(config.batch_size, len(samples))):
        raise TrainingError(f"{place.size} processes need a batch size and a training set of at "
                            f"least {place.size} images (one per process and step)")
    if config.image_size == 32 and min(len(samples), config.batch_size) < 2 * place.size:
        raise TrainingError("--image-size 32 needs a batch size and a training set of at least "
                            f"{2 * place.size} images (two per process: batch norm of a 1x1 "
                            "embedding)")
    device = resolve_device(config.device)
    check_memory(config, device)
    if config.amp and device.type != "cuda":
        raise TrainingError("--amp needs a CUDA device; leave it off on the CPU")
    if place.size > 1 and device.type == "cuda":
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    joined = place.size > 1 and not dist.is_initialized()
    if joined:
        die_with_parent()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    restore = _stop_on_sigterm()
    try:
        if not place.main:
            return _fit(samples, config, out, metadata, resume, progress, on_epoch, device,
                        place)
        with output_lock(out):
            return _fit(samples, config, out, metadata, resume, progress, on_epoch, device,
                        place)
    finally:
        restore()
        _STOP.clear()
        if joined:
            dist.destroy_process_group()


def step_memory_bytes(config: TrainConfig) -> int:
    """A lower bound of one training step's memory at ``config``'s size and batch."""
    size = config.image_size
    features = sum(c * (size // s) ** 2 for c, s in zip(get_backbone(config.backbone).channels,
                                                        (4, 8, 16), strict=True))
    return features * 4 * config.batch_size * STEP_MEMORY_FACTOR


def available_memory_bytes() -> int | None:
    """Memory the system can still give (MemAvailable on Linux); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _largest_fitting_size(config: TrainConfig, available: int) -> int | None:
    size = config.image_size - 32
    while size >= 32 and step_memory_bytes(replace(config, image_size=size)) > available:
        size -= 32
    return size if size >= 32 else None


def check_memory(config: TrainConfig, device: torch.device) -> None:
    """Refuse, before any work, a CPU run whose step cannot fit in the memory left."""
    if device.type != "cpu":
        return
    available = available_memory_bytes()
    need = step_memory_bytes(config)
    if available is None or need <= available:
        return
    fits = _largest_fitting_size(config, available)
    advice = (f"use --image-size {fits} or less" if fits else "use a smaller --image-size") + (
        f", a smaller --batch-size than {config.batch_size}" if config.batch_size > 1 else "") + (
        ", or --resize tile to keep the detail of large images at a smaller size")
    raise TrainingError(f"training at {config.image_size} px with batch {config.batch_size} "
                        f"needs at least {_gib(need)} of memory, {_gib(available)} are free: "
                        f"{advice}")


def _gib(count: int) -> str:
    return f"{count / 2 ** 30:.1f} GiB"


def _out_of_memory(config: TrainConfig, device: torch.device) -> TrainingError:
    where = "GPU memory" if device.type == "cuda" else "memory"
    smaller = max(1, config.batch_size // 2)
    return TrainingError(f"out of {where} at {config.image_size} px, batch size "
                         f"{config.batch_size} (a step needs at least "
                         f"{_gib(step_memory_bytes(config))}): try --batch-size {smaller}, a "
                         "smaller --image-size, or --resize tile")


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM a stop request while training (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda *_: request_stop())
    return lambda: signal.signal(signal.SIGTERM, previous)


def _fit(samples: Sequence[Sample], config: TrainConfig, out: Path,
         metadata: dict[str, Any] | None, resume: bool, progress: bool,
         on_epoch: Callable[[dict[str, Any]], None] | None, device: torch.device,
         place: World) -> TrainResult:
    spec = get_backbone(config.backbone)
    preprocess = (Preprocess(config.image_size, spec.mean, spec.std) if config.normalize
                  else Preprocess(config.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    geometry = Geometry(config.resize, config.tile_scale)
    dataset = training_dataset(samples, preprocess, geometry)
    dataset.check()

    torch.manual_seed(config.seed)
    model = build_model(config.backbone, pretrained=True, teacher_weights=config.teacher_weights)
    if config.init:
        _init_from(model, config)
    model.to(device, memory_format=_memory_format(config))
    beyond = {} if geometry.is_paper else {"geometry": geometry.to_dict()}
    if config.teacher_adapt != "none":  # before the student sees any teacher feature
        beyond["teacher_adapt"] = adapt_teacher(model.teacher, dataset, config.teacher_adapt,
                                                config.seed, config.batch_size, device)
    if config.augment != "none":
        transforms, beyond["augment"] = augmentation(
            model.teacher, samples, preprocess, geometry, config.augment, device,
            log=(lambda line: print(line, file=sys.stderr)) if place.main else None)
        dataset = training_dataset(samples, preprocess, geometry, transforms)
    if config.turn_average:  # before the statistics, which are weighed against RD's map
        beyond.update(_decide_turn_average(model, samples, preprocess, geometry,
                                           config.turn_average, device, beyond.get("augment")))
        if place.main:
            print(beyond.get("turn_average", beyond.get("turn_average_auto"))["why"],
                  file=sys.stderr)
    if config.position_stats:  # the teacher's, so after its adaptation; fitted once
        beyond.update(_fit_position(model, samples, preprocess, config.batch_size,
                                    config.workers, device, config.position_score,
                                    mode=config.position_stats,
                                    transforms=beyond.get("augment", {}).get("kept")))
        if "position_auto" in beyond and place.main:
            print(beyond["position_auto"]["why"], file=sys.stderr)
    if config.aligned_stats:  # the images' own, so independent of the teacher
        beyond.update(_fit_aligned(model, samples, preprocess, config.batch_size,
                                   config.workers, device, mode=config.aligned_stats))
        if place.main:
            print(beyond.get("aligned_stats", beyond.get("aligned_auto"))["why"],
                  file=sys.stderr)
    optimizer = torch.optim.Adam(
        [*model.bottleneck.parameters(), *model.decoder.parameters()],
        lr=config.lr, betas=config.betas)

    average = None
    if config.ema:
        steps = len(_steps(epoch_order(config.seed, 1, len(dataset)), config.batch_size, place,
                           config.image_size))
        average = _WeightAverage(model, config.ema * steps)
    position = _Position()
    if resume:
        position = _load_resume_state(model, optimizer, average, config, out)
        if not place.main:  # the saved loss sums are the total: counted once, on rank 0
            position = replace(position, loss_sum=0.0, images=0)
    elif place.main and resume_path(out).exists():
        resume_path(out).unlink()  # a fresh run: a stale resume state must not be picked up
    student: Callable[[list[torch.Tensor]], list[torch.Tensor]] = model.student
    if place.size > 1:
        student = DistributedDataParallel(
            nn.Sequential(model.bottleneck, model.decoder),
            device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        student = torch.compile(student)

    cache = _teacher_cache(model, dataset, config, device)
    base_metadata = {
        "preprocess": preprocess.to_dict(),
        "fusion": "sum",
        "recipe": config.recipe(),
        "train_images": len(samples),
        **beyond,
        **(metadata or {}),
    }
    result = TrainResult(model, position.epoch, rank=place.rank)
    saved_epoch = position.epoch if resume else None
    started = time.perf_counter()
    epochs = range(position.epoch + 1, config.epochs + 1)
    bar = tqdm(epochs, desc="train", unit="epoch", disable=not (progress and place.main),
               file=sys.stderr, initial=position.epoch, total=config.epochs)
    log_file = log_path(out)
    if place.main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            _trim_log(log_file, position.epoch)
        else:
            log_file.write_text("")
    for epoch in bar:
        epoch_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        run = _run_epoch(student, model, optimizer, average, dataset, cache, config, epoch,
                         device, place, position)
        if run.bad_loss is not None:
            kept = (f"the checkpoint and resume state of epoch {saved_epoch} are kept"
                    if saved_epoch else "no checkpoint of this run was written")
            raise TrainingError(f"the loss became {run.bad_loss} at epoch {epoch}, step "
                                f"{run.step + 1}: training stopped and {kept}; lower --lr "
                                f"(now {config.lr:g}) and train again")
        loss_sum, images, trained = _sum_over_processes(
            place, device, run.loss_sum, run.images, run.trained)
        if run.stopped:
            if place.main:
                _save_resume_state(model, optimizer, average, config,
                                   _Position(epoch - 1, run.step, loss_sum, int(images)), out)
                print(f"stopped on request at epoch {epoch}, step {run.step}: resume state "
                      f"{resume_path(out)}", file=sys.stderr)
            raise TrainingStopped(epoch - 1, run.step)
        position = _Position(epoch)
        loss = loss_sum / images
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "loss": loss, "seconds": round(seconds, 3),
                  "images_per_s": round(trained / seconds, 2), "lr": epoch_lr(config, epoch)}
        result.losses.append(loss)
        result.epochs_trained = epoch
        bar.set_postfix(loss=f"{loss:.4f}")
        if not place.main:
            continue
        with log_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if on_epoch:
            on_epoch(record)
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            _save_resume_state(model, optimizer, average, config, position, out)
            with _student_replaced(model, average):
                calibrated = _calibrate_fitted(model, samples, preprocess, geometry,
                                               base_metadata, config.batch_size, device)
                save_checkpoint(model, out, {**base_metadata, **calibrated,
                                             "epochs_trained": epoch})
            saved_epoch = epoch
    if average is not None:  # the model returned is the one saved
        model.load_state_dict(average.student_state_dict(), strict=False)
    result.seconds = time.perf_counter() - started
    return result


class _WeightAverage:
    """The exponential moving average of the student's weights and batch-norm statistics
    (``--ema``), by torch's ``AveragedModel``; ``half_life`` is in steps."""

    def __init__(self, model: ReverseDistillation, half_life: float) -> None:
        self.student = nn.ModuleDict({"bottleneck": model.bottleneck, "decoder": model.decoder})
        self.average = AveragedModel(self.student, use_buffers=True,
                                     multi_avg_fn=get_ema_multi_avg_fn(0.5 ** (1 / half_life)))

    def update(self) -> None:
        self.average.update_parameters(self.student)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged student, keyed as ``ReverseDistillation.student_state_dict``."""
        return {k.removeprefix("module."): v for k, v in self.average.state_dict().items()
                if k.startswith("module.")}


@contextmanager
def _student_replaced(model: ReverseDistillation, average: _WeightAverage | None
                      ) -> Iterator[None]:
    """The model with the averaged student for the time of the block (a checkpoint's write)."""
    if average is None:
        yield
        return
    trained = {k: v.clone() for k, v in model.student_state_dict().items()}
    model.load_state_dict(average.student_state_dict(), strict=False)
    try:
        yield
    finally:
        model.load_state_dict(trained, strict=False)


def _trim_log(log_file: Path, epochs: int) -> None:
    """Keep the records of the first ``epochs`` epochs: the resumed run writes the later ones
    again (a killed run may have logged epochs past its last resume state, or a torn line)."""
    lines = log_file.read_text().splitlines() if log_file.exists() else []
    kept = [line for line in lines if _epoch_of(line) <= epochs]
    atomic_write(log_file, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _init_from(model: ReverseDistillation, config: TrainConfig) -> None:
    """Fine-tune: start from an existing student of the same backbone and image size (its
    position and aligned statistics, if any, are not taken: their options fit them anew)."""
    expect = {"backbone": config.backbone, "image_size": config.image_size}
    source, _ = load_checkpoint(config.init, config.teacher_weights, expect=expect)
    model.load_state_dict({k: v for k, v in source.state_dict().items()
                           if not k.startswith(("position.", "aligned."))})


def _fit_position(model: ReverseDistillation, samples: Sequence[Sample],
                  preprocess: Preprocess, batch_size: int, workers: int, device: torch.device,
                  score: bool, mode: bool | str = True,
                  transforms: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit the position statistics (rd.position) on the squashed normal training images;
    ``score``: they count in the image score too (--position-score); ``mode`` "auto": kept
    only if the parts lie in place (``rd.position.in_place_decision``); "envelope": fitted with
    each image's copies by the augmentation's kept ``transforms`` too, as an envelope;
    "adaptive": as "auto", with the envelope (and RD's score) where the parts do not lie in
    place. Returns the checkpoint metadata: ``position_stats`` when kept, and with ``auto`` or
    ``adaptive`` the decision as ``position_auto``."""
    if mode == "envelope":
        return {"position_stats": _fit_envelope(model, samples, preprocess, device, transforms)}
    loader = DataLoader(ImageDataset(samples, preprocess), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    model.position, info = fit_position_statistics(
        model.teacher, lambda: (batch["image"] for batch in loader), preprocess.size, device)
    decision = {}
    if mode in ("auto", "adaptive"):
        decision = {"position_auto": in_place_decision(info)}
        if not decision["position_auto"]["kept"]:
            model.position = None
            if mode == "auto" or decision["position_auto"]["left_out_spread"] is None:
                return decision  # (fewer than three images: no envelope either)
            why = decision["position_auto"]["why"] + "; the envelope instead"
            envelope = _fit_envelope(model, samples, preprocess, device, transforms)
            return {"position_stats": envelope,
                    "position_auto": {**decision["position_auto"], "why": why}}
    if score and info["left_out_max"] is None:
        raise TrainingError("--position-score needs at least three normal training images "
                            f"(the data has {info['images']})")
    return {"position_stats": {**info, "score": True} if score else info, **decision}


def _fit_envelope(model: ReverseDistillation, samples: Sequence[Sample],
                  preprocess: Preprocess, device: torch.device,
                  transforms: Sequence[str] | None) -> dict[str, Any]:
    """Fit envelope statistics (--position-stats envelope) into ``model.position``, with one
    copy of each image per transform (without training augmentation: those ``auto`` would
    keep); returns their metadata."""
    if len(samples) < 3:
        raise TrainingError("--position-stats envelope needs at least three normal "
                            f"training images (the data has {len(samples)})")
    if transforms is None:  # no training augmentation: the copies auto would keep
        transforms = select_transforms(model.teacher, samples, preprocess,
                                       Geometry("squash"), TRANSFORMS, device)["kept"]
    model.position, info = fit_envelope_statistics(
        model.teacher, lambda: _augmented_groups(samples, preprocess, transforms), device,
        transforms)
    return info


def _augmented_groups(samples: Sequence[Sample], preprocess: Preprocess,
                      transforms: Sequence[str]) -> Iterator[torch.Tensor]:
    """Per normal image: it and one copy by each of ``transforms``, preprocessed (seeded by the
    image's index, as ``--augment auto`` judges them)."""
    for index, sample in enumerate(samples):
        image = read_image(sample.path)
        copies = [TRANSFORMS[name](image, index * 1009 + 1 + offset)
                  for offset, name in enumerate(transforms)]
        yield torch.stack([preprocess(member) for member in (image, *copies)])


def add_position_statistics(checkpoint: str | Path, samples: Sequence[Sample],
                            out: str | Path, device: str = "auto", batch_size: int = 16,
                            score: bool = False, mode: bool | str = True) -> dict[str, Any]:
    """Write ``checkpoint`` with position statistics fitted on its normal training images
    ``samples`` to ``out``: the same checkpoint ``--position-stats [mode]`` (and ``score``:
    ``--position-score``) training gives, since they leave the student as it is, without
    training again; the envelope's copies are those of the transforms the checkpoint's
    augmentation kept. ``mode`` "auto" is refused (it may fit nothing). The stored evaluation
    is left out (its metrics no longer hold): evaluate the new checkpoint. Returns its
    ``position_stats`` metadata."""
    if mode not in (True, "envelope", "adaptive"):
        raise TrainingError(f"position statistics to add are on, envelope or adaptive, got "
                            f"{mode!r}")
    if score and mode == "envelope":
        raise TrainingError("--position-score does not combine with the envelope statistics")

    def fit(model: ReverseDistillation, meta: CheckpointMetadata, preprocess: Preprocess,
            target: torch.device) -> dict[str, Any]:
        fitted = _fit_position(model, samples, preprocess, batch_size, 0, target, score,
                               mode=mode, transforms=(meta.get("augment") or {}).get("kept"))
        if "position_stats" not in fitted:
            raise TrainingError(f"no position statistics fitted: "
                                f"{fitted['position_auto']['why']}")
        return fitted

    recipe = {"position_stats": mode, **({"position_score": True} if score else {})}
    return _refit(checkpoint, samples, out, device, batch_size, "position_stats",
                  "already has position statistics", fit, recipe)


# the metadata key of what fitting each option gives, and of an ``auto`` decision against it
_AUTO_DECISIONS = {"position_stats": "position_auto", "aligned_stats": "aligned_auto",
                   "turn_average": "turn_average_auto"}


def _refit(checkpoint: str | Path, samples: Sequence[Sample], out: str | Path, device: str,
           batch_size: int, key: str, already: str,
           fit: Callable[[ReverseDistillation, CheckpointMetadata, Preprocess, torch.device],
                         dict[str, Any]],
           recipe: dict[str, Any]) -> dict[str, Any]:
    """What the add-* commands share: load ``checkpoint``, refuse it when it has ``key``
    already, ``fit`` onto it, calibrate and write it to ``out``. Returns its ``key`` metadata."""
    model, meta = load_checkpoint(checkpoint)
    if meta.get(key):
        raise TrainingError(f"{checkpoint} {already}")
    target = resolve_device(device)
    model.to(target).eval()
    preprocess = Preprocess.from_dict(meta.preprocess)
    fitted = fit(model, meta, preprocess, target)
    calibrated = _save_refitted(model, meta, samples, preprocess, fitted, recipe, batch_size,
                                target, out)
    return {**fitted, **calibrated}[key]


def _save_refitted(model: ReverseDistillation, meta: CheckpointMetadata,
                   samples: Sequence[Sample], preprocess: Preprocess, fitted: dict[str, Any],
                   recipe: dict[str, Any], batch_size: int, device: torch.device,
                   out: str | Path) -> dict[str, Any]:
    """Calibrate what was ``fitted`` onto a trained checkpoint and write it to ``out`` with
    ``recipe`` added to the checkpoint's, its stored evaluation left out (its metrics no longer
    hold), and an earlier ``auto`` decision about what is fitted now too. Returns the calibrated
    metadata."""
    calibrated = _calibrate_fitted(model, samples, preprocess, Geometry.from_metadata(meta),
                                   {**meta.to_dict(), **fitted}, batch_size, device)
    stale = {"metrics", "normal_scores", "created_utc", "software",
             *(_AUTO_DECISIONS[k] for k in fitted if k in _AUTO_DECISIONS)}
    kept = {k: v for k, v in meta.to_dict().items() if k not in stale}
    save_checkpoint(model, out, {**kept, **fitted, **calibrated,
                                 "recipe": {**(meta.get("recipe") or {}), **recipe}})
    return calibrated


@torch.no_grad()
def _calibrate_fitted(model: ReverseDistillation, samples: Sequence[Sample],
                      preprocess: Preprocess, geometry: Geometry,
                      metadata: Mapping[str, Any], batch_size: int, device: torch.device
                      ) -> dict[str, Any]:
    """Weigh the position and aligned statistics against the student as it is now, from RD's
    own maps of up to POSITION_CALIBRATION_IMAGES normal training images, evenly spread: their
    mean weighs the maps; with --position-score, their largest score weighs the scores.
    Returns the checkpoint's ``position_stats`` and ``aligned_stats`` metadata ({} without
    them)."""
    position, aligned = model.position, model.aligned
    if position is None and aligned is None:
        return {}
    step = max(1, math.ceil(len(samples) / POSITION_CALIBRATION_IMAGES))
    chosen = list(samples)[::step]
    was_training = model.training
    model.eval()
    model.position = model.aligned = None  # RD's own map
    try:
        rd_sum, rd_max = 0.0, 0.0
        if geometry.is_paper:
            loader = DataLoader(ImageDataset(chosen, preprocess), batch_size=batch_size)
            for batch in loader:
                prediction = model.predict(batch["image"].to(device))
                rd_sum += float(prediction.fused.sum()) / preprocess.size ** 2
                rd_max = max(rd_max, float(prediction.scores.max()))
        else:
            for sample in chosen:
                native = predict_native(model, sample.path, preprocess, geometry, "sum",
                                        batch_size, device)
                rd_sum += float(native.fused.mean())
                rd_max = max(rd_max, native.score)
        rd_mean = rd_sum / len(chosen)
    finally:
        model.position, model.aligned = position, aligned
        model.train(was_training)
    calibrated: dict[str, Any] = {}
    if aligned is not None:
        info = dict(metadata["aligned_stats"])
        calibrated["aligned_stats"] = {
            **info, "rd_mean": rd_mean, "calibration_images": len(chosen),
            "weight": calibrate_aligned(aligned, rd_mean, info["map_mean"])}
    if position is None:
        return calibrated
    info = dict(metadata["position_stats"])
    if info.get("mode") == "envelope":
        return {**calibrated, "position_stats": {
            **info, "rd_score_max": rd_max, "calibration_images": len(chosen),
            "weight": calibrate_envelope(position, rd_max)}}
    fitted = {**info, "rd_mean": rd_mean, "weight": calibrate(position, rd_mean,
                                                              info["map_mean"]),
              "calibration_images": len(chosen)}
    if info.get("score"):
        fitted.update(rd_score_max=rd_max, score_weight=calibrate_score(
            position, rd_max, info["left_out_max"]))
    return {**calibrated, "position_stats": fitted}


def _fit_aligned(model: ReverseDistillation, samples: Sequence[Sample],
                 preprocess: Preprocess, batch_size: int, workers: int, device: torch.device,
                 mode: bool | str = True) -> dict[str, Any]:
    """Fit the aligned statistics (rd.alignment) on the squashed normal training images into
    ``model.aligned``; ``mode`` "auto": kept only if the registered images are alike. Returns
    the checkpoint metadata ``aligned_stats`` (with the decision), or, when left out,
    ``aligned_auto``."""
    if len(samples) < 3:
        raise TrainingError("--aligned-stats needs at least three normal training images "
                            f"(the data has {len(samples)})")
    loader = DataLoader(ImageDataset(samples, preprocess), batch_size=batch_size,
                        shuffle=False, num_workers=workers)
    statistics, info = fit_aligned_statistics(
        lambda: (batch["image"] for batch in loader), preprocess.size, preprocess.std, device)
    if mode == "auto" and not info["alike"]:
        model.aligned = None
        return {"aligned_auto": {k: info[k] for k in ("median_peak", "alike", "why")}}
    model.aligned = statistics
    return {"aligned_stats": {**info, "mode": "auto" if mode == "auto" else "on"}}


def add_aligned_statistics(checkpoint: str | Path, samples: Sequence[Sample],
                           out: str | Path, device: str = "auto", batch_size: int = 16
                           ) -> dict[str, Any]:
    """Write ``checkpoint`` with aligned statistics (rd.alignment) fitted on its normal
    training images ``samples`` to ``out``: the checkpoint ``--aligned-stats`` training gives,
    since they leave the student as it is, without training again. Fitted whether or not the
    images are alike (what ``auto`` decided is recorded). The stored evaluation is left out:
    evaluate the new checkpoint. Returns its ``aligned_stats`` metadata."""
    return _refit(checkpoint, samples, out, device, batch_size, "aligned_stats",
                  "already has aligned statistics",
                  lambda model, _, preprocess, target: _fit_aligned(
                      model, samples, preprocess, batch_size, 0, target),
                  {"aligned_stats": True})


def _decide_turn_average(model: ReverseDistillation, samples: Sequence[Sample],
                         preprocess: Preprocess, geometry: Geometry, mode: bool | str,
                         device: torch.device, augmented: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
    """Turn ``model.turn_average`` on (``mode`` True) or, with "auto", only where quarter-turned
    normal images stay normal as the teacher sees them (rd.augment.judge_turns; ``augmented``:
    the augmentation's record, which holds that measurement after ``--augment auto``). Returns
    the checkpoint metadata ``turn_average`` (the measurement and why), or
    ``turn_average_auto`` when left out."""
    if len(samples) < 3:
        raise TrainingError("--turn-average needs at least three normal training images "
                            f"(the data has {len(samples)})")
    verdict = judge_turns(model.teacher, samples, preprocess, geometry, device, augmented)
    if mode == "auto" and not verdict["kept"]:
        model.turn_average = False
        return {"turn_average_auto": verdict}
    model.turn_average = True
    return {"turn_average": {**verdict, "mode": "auto" if mode == "auto" else "on"}}


def add_turn_average(checkpoint: str | Path, samples: Sequence[Sample], out: str | Path,
                     device: str = "auto", batch_size: int = 16) -> dict[str, Any]:
    """Write ``checkpoint`` with ``--turn-average`` on to ``out`` (what training with it
    gives, since it leaves the student as it is), its statistics weighed again against the
    averaged map; ``samples``: its normal training images. What ``auto`` would decide is
    recorded. The stored evaluation is left out: evaluate the new checkpoint. Returns its
    ``turn_average`` metadata."""
    return _refit(checkpoint, samples, out, device, batch_size, "turn_average",
                  "already averages its maps over quarter turns",
                  lambda model, meta, preprocess, target: _decide_turn_average(
                      model, samples, preprocess, Geometry.from_metadata(meta), True, target,
                      meta.get("augment")),
                  {"turn_average": True})


def _teacher_cache(model: ReverseDistillation, dataset: ImageDataset, config: TrainConfig,
                   device: torch.device) -> list[torch.Tensor] | None:
    """The teacher's features of every training image, when caching is on (exact: frozen)."""
    if config.cache_teacher == "off":
        return None
    size = config.image_size
    per_image = sum(c * (size // s) ** 2 for c, s in zip(get_backbone(config.backbone).channels,
                                                          (4, 8, 16), strict=True)) * 4
    if config.cache_teacher == "auto" and per_image * len(dataset) > AUTO_CACHE_BYTES:
        return None
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                        num_workers=config.workers)
    parts: list[list[torch.Tensor]] = [[], [], []]
    valid = []  # the valid-pixel masks of letterbox / tile inputs (rd.geometry), cached with them
    for batch in loader:
        with _autocast(config, device):
            features = model.teacher(batch["image"].to(device))
        for part, feature in zip(parts, features, strict=True):
            part.append(feature)
        if "valid" in batch:
            valid.append(batch["valid"].to(device))
    return [torch.cat(part) for part in [*parts, *([valid] if valid else [])]]


def _cached_batch(cache: list[torch.Tensor], local: list[int]
                  ) -> tuple[None, list[torch.Tensor], torch.Tensor | None]:
    """(no teacher, the cached features, their valid masks or None) of the images ``local``."""
    index = torch.tensor(local, device=cache[0].device)
    return None, [f[index] for f in cache[:3]], cache[3][index] if len(cache) > 3 else None


def _autocast(config: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)


@dataclass
class _EpochRun:
    """What one call of ``_run_epoch`` did (sums over this process's images)."""

    step: int
    loss_sum: float
    images: int
    trained: int = 0  # images trained on in this call (a resumed epoch skips the first steps)
    stopped: bool = False
    bad_loss: float | None = None  # a NaN or infinite loss ended the epoch


def _steps(order: list[int], batch_size: int, place: World, image_size: int = 256
           ) -> list[tuple[list[int], int]]:
    """This process's images of each global batch, with the global batch's size.

    At 32 px a last batch that would leave a process one image is merged into the one before
    (batch norm cannot normalise a 1x1 embedding of one image; see the module's notes).
    """
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if (image_size == 32 and len(batches) > 1 and len(batches[-1]) < 2 * place.size):
        batches[-2:] = [batches[-2] + batches[-1]]
    return [(batch[place.rank::place.size], len(batch)) for batch in batches
            if len(batch) >= place.size]


def _run_epoch(student: Callable[[list[torch.Tensor]], list[torch.Tensor]],
               model: ReverseDistillation, optimizer: torch.optim.Optimizer,
               average: _WeightAverage | None, dataset: ImageDataset,
               cache: list[torch.Tensor] | None, config: TrainConfig, epoch: int,
               device: torch.device, place: World, position: _Position
               ) -> _EpochRun:
    """Train one epoch from ``position`` (its steps and loss sums, when resuming into it)."""
    model.train()
    steps = _steps(epoch_order(config.seed, epoch, len(dataset)), config.batch_size, place,
                   config.image_size)
    todo = steps[position.step:]
    if cache is None:
        loader = DataLoader(dataset, batch_sampler=[local for local, _ in todo],
                            num_workers=config.workers, pin_memory=device.type == "cuda")
        batches = ((model.teacher, batch["image"].to(device, non_blocking=True,
                                                      memory_format=_memory_format(config)),
                    batch["valid"].to(device) if "valid" in batch else None)
                   for batch in loader)
    else:
        batches = (_cached_batch(cache, local) for local, _ in todo)
    run = _EpochRun(position.step, position.loss_sum, position.images)
    for (teacher, inputs, valid), (local, global_size) in zip(batches, todo, strict=True):
        try:
            with _autocast(config, device):
                features = teacher(inputs) if teacher is not None else inputs
                rebuilt = student(features)
                loss = (reverse_distillation_loss(features, rebuilt) if valid is None
                        else masked_distillation_loss(features, rebuilt, valid))
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over processes; weighting by the share of the global batch
            # makes that average the global batch's mean gradient (a factor of 1 in one process).
            (loss * (place.size * len(local) / global_size)).backward()
            optimizer.step()
            if average is not None:
                average.update()
        except torch.OutOfMemoryError:
            raise _out_of_memory(config, device) from None
        except RuntimeError as error:
            if "can't allocate memory" not in str(error):
                raise
            raise _out_of_memory(config, device) from None
        value = loss.item()
        stop, bad = _agree(place, device, _STOP.is_set(), not math.isfinite(value))
        if bad:  # every process stops here together
            run.bad_loss = value if not math.isfinite(value) else float("nan")
            break
        run.loss_sum += value * len(local)
        run.images += len(local)
        run.trained += len(local)
        run.step += 1
        if stop:
            run.stopped = True
            break
    return run


def _memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def _agree(place: World, device: torch.device, *flags: bool) -> list[bool]:
    """Each flag set in any process (a stop request, a non-finite loss): under DDP all
    processes agree, so all stop at the same step."""
    if place.size == 1:
        return list(flags)
    total = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return [bool(v) for v in total.tolist()]


def _sum_over_processes(place: World, device: torch.device, *values: float) -> list[float]:
    if place.size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _save_resume_state(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                       average: _WeightAverage | None, config: TrainConfig, position: _Position,
                       out: Path) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.student_state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous()
                        for k, v in average.average.state_dict().items()})
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"epoch": str(position.epoch), "step": str(position.step),
            "loss_sum": repr(position.loss_sum), "images": str(position.images),
            "recipe": json.dumps(config.recipe(), sort_keys=True)}
    atomic_write(resume_path(out), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_resume_state(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                       average: _WeightAverage | None, config: TrainConfig, out: Path
                       ) -> _Position:
    path = resume_path(out)
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist (start without --resume)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        position = _Position(int(meta["epoch"]), int(meta.get("step", 0)),
                             float(meta.get("loss_sum", 0.0)), int(meta.get("images", 0)))
        recipe = json.loads(meta["recipe"])
    except KeyError as error:
        raise TrainingError(f"cannot resume from {path}: it lacks the {error} field of a resume "
                            "state (not written by rd train, or damaged); start again without "
                            "--resume") from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"cannot resume from {path}: {first}; start again without "
                            "--resume") from None
    ours = config.recipe()
    extendable = config.lr_schedule == "constant"  # a cosine's rate depends on --epochs
    # both ways: an option beyond the paper left out now is missing from ours, not equal
    changed = {k: (recipe.get(k), ours.get(k)) for k in sorted(ours.keys() | recipe.keys())
               if (k != "epochs" or not extendable) and recipe.get(k) != ours.get(k)}
    if changed:
        raise TrainingError(f"cannot resume {path}: settings differ from the stopped run "
                            f"(setting: (stopped run, now)): {changed}")
    if position.epoch >= config.epochs:
        raise TrainingError(f"{path} already reached epoch {position.epoch}; raise --epochs to "
                            "continue")
    try:
        load_student(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                     str(path))
    except CheckpointError as error:
        raise TrainingError(str(error)) from None
    if average is not None:
        averaged = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        try:
            average.average.load_state_dict(averaged)
        except RuntimeError:
            raise TrainingError(f"cannot resume {path}: its weight average (--ema) is missing or "
                                "damaged; start again without --resume") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})
    return position
