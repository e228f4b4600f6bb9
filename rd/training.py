"""One training loop: the paper's recipe by default, resumable exactly, teacher features cached.

The recipe (REFERENCE.md §2): 256 px, no augmentation, Adam lr 0.005 betas (0.5, 0.999), batch 16,
200 epochs, seed 111. Training never looks at the test set.

Exact resume: every ``checkpoint_every`` epochs the student, the optimizer state and the epoch
are written (atomically) to ``<out>.resume.safetensors``; the shuffling order of epoch ``e`` is
drawn from a generator seeded by ``(seed, e)``, so a resumed run follows the same path as an
uninterrupted one.

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
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rd.backbones import DEFAULT_BACKBONE, get_backbone
from rd.checkpoints import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_student,
    save_checkpoint,
)
from rd.data import ImageDataset, Preprocess, Sample
from rd.losses import reverse_distillation_loss
from rd.model import ReverseDistillation, build_model, resolve_device

CACHE_MODES = ("auto", "on", "off")
# "auto" caches the teacher's features when they fit in this many bytes.
AUTO_CACHE_BYTES = 4 << 30
# Exit code of a training stopped on request (EX_TEMPFAIL: try again later, i.e. --resume).
STOPPED_EXIT = 75

_STOP = threading.Event()


class TrainingError(RuntimeError):
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


def die_with_parent() -> None:
    """Linux: be killed when the parent process dies, so that killing a job's launcher (torchrun,
    or the job process above it) never leaves orphans training on. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


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

    def validate(self) -> None:
        get_backbone(self.backbone)
        checks = [
            (self.image_size >= 32 and self.image_size % 32 == 0,
             f"image size must be a multiple of 32 and at least 32, got {self.image_size}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}"),
            (self.cache_teacher in CACHE_MODES,
             f"cache_teacher must be one of {CACHE_MODES}, got {self.cache_teacher!r}"),
            (self.checkpoint_every >= 1, "checkpoint_every must be at least 1"),
            (self.workers >= 0, "workers must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)

    def recipe(self) -> dict[str, Any]:
        """The settings that determine the result (recorded in checkpoints, checked on resume)."""
        keys = ("backbone", "image_size", "epochs", "batch_size", "lr", "betas", "seed", "amp",
                "init", "normalize")
        values = asdict(self)
        return {k: list(values[k]) if k == "betas" else values[k] for k in keys}


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


def resume_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".resume.safetensors")


def log_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".log.jsonl")


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
    device = resolve_device(config.device)
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
        return _fit(samples, config, out, metadata, resume, progress, on_epoch, device, place)
    finally:
        restore()
        _STOP.clear()
        if joined:
            dist.destroy_process_group()


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
    dataset = ImageDataset(samples, preprocess)
    dataset.check()

    torch.manual_seed(config.seed)
    model = build_model(config.backbone, pretrained=True, teacher_weights=config.teacher_weights)
    if config.init:
        _init_from(model, config)
    model.to(device)
    optimizer = torch.optim.Adam(
        [*model.bottleneck.parameters(), *model.decoder.parameters()],
        lr=config.lr, betas=config.betas)

    position = _Position()
    if resume:
        position = _load_resume_state(model, optimizer, config, out)
        if not place.main:  # the saved loss sums are the total: counted once, on rank 0
            position = replace(position, loss_sum=0.0, images=0)
    elif place.main and resume_path(out).exists():
        resume_path(out).unlink()  # a fresh run: a stale resume state must not be picked up
    student: Callable[[list[torch.Tensor]], list[torch.Tensor]] = model.student
    if place.size > 1:
        student = DistributedDataParallel(
            nn.Sequential(model.bottleneck, model.decoder),
            device_ids=[device.index] if device.type == "cuda" else None)

    cache = _teacher_cache(model, dataset, config, device)
    base_metadata = {
        "preprocess": preprocess.to_dict(),
        "fusion": "sum",
        "recipe": config.recipe(),
        "train_images": len(samples),
        **(metadata or {}),
    }
    result = TrainResult(model, position.epoch, rank=place.rank)
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
        run = _run_epoch(student, model, optimizer, dataset, cache, config, epoch, device, place,
                         position)
        loss_sum, images, trained = _sum_over_processes(
            place, device, run.loss_sum, run.images, run.trained)
        if run.stopped:
            if place.main:
                _save_resume_state(model, optimizer, config,
                                   _Position(epoch - 1, run.step, loss_sum, int(images)), out)
                print(f"stopped on request at epoch {epoch}, step {run.step}: resume state "
                      f"{resume_path(out)}", file=sys.stderr)
            raise TrainingStopped(epoch - 1, run.step)
        position = _Position(epoch)
        loss = loss_sum / images
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "loss": loss, "seconds": round(seconds, 3),
                  "images_per_s": round(trained / seconds, 2), "lr": config.lr}
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
            _save_resume_state(model, optimizer, config, position, out)
            save_checkpoint(model, out, {**base_metadata, "epochs_trained": epoch})
    result.seconds = time.perf_counter() - started
    return result


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
    """Fine-tune: start from an existing student of the same backbone and image size."""
    expect = {"backbone": config.backbone, "image_size": config.image_size}
    source, _ = load_checkpoint(config.init, config.teacher_weights, expect=expect)
    model.load_state_dict(source.state_dict())


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
    for batch in loader:
        with _autocast(config, device):
            features = model.teacher(batch["image"].to(device))
        for part, feature in zip(parts, features, strict=True):
            part.append(feature)
    return [torch.cat(part) for part in parts]


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


def _steps(order: list[int], batch_size: int, place: World) -> list[tuple[list[int], int]]:
    """This process's images of each global batch, with the global batch's size."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [(batch[place.rank::place.size], len(batch)) for batch in batches
            if len(batch) >= place.size]


def _run_epoch(student: Callable[[list[torch.Tensor]], list[torch.Tensor]],
               model: ReverseDistillation, optimizer: torch.optim.Optimizer,
               dataset: ImageDataset, cache: list[torch.Tensor] | None, config: TrainConfig,
               epoch: int, device: torch.device, place: World, position: _Position
               ) -> _EpochRun:
    """Train one epoch from ``position`` (its steps and loss sums, when resuming into it)."""
    model.train()
    steps = _steps(epoch_order(config.seed, epoch, len(dataset)), config.batch_size, place)
    todo = steps[position.step:]
    if cache is None:
        loader = DataLoader(dataset, batch_sampler=[local for local, _ in todo],
                            num_workers=config.workers, pin_memory=device.type == "cuda")
        batches = ((model.teacher, batch["image"].to(device, non_blocking=True))
                   for batch in loader)
    else:
        batches = ((None, [f[torch.tensor(local, device=f.device)] for f in cache])
                   for local, _ in todo)
    run = _EpochRun(position.step, position.loss_sum, position.images)
    for (teacher, inputs), (local, global_size) in zip(batches, todo, strict=True):
        try:
            with _autocast(config, device):
                features = teacher(inputs) if teacher is not None else inputs
                loss = reverse_distillation_loss(features, student(features))
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over processes; weighting by the share of the global batch
            # makes that average the global batch's mean gradient (a factor of 1 in one process).
            (loss * (place.size * len(local) / global_size)).backward()
            optimizer.step()
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of GPU memory at batch size {config.batch_size}: try "
                                f"--batch-size {max(1, config.batch_size // 2)}") from None
        run.loss_sum += loss.item() * len(local)
        run.images += len(local)
        run.trained += len(local)
        run.step += 1
        if _stop_requested(place, device):
            run.stopped = True
            break
    return run


def _stop_requested(place: World, device: torch.device) -> bool:
    """Whether to stop now; under DDP all processes agree (any request stops all at once)."""
    if place.size == 1:
        return _STOP.is_set()
    flag = torch.tensor([float(_STOP.is_set())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _sum_over_processes(place: World, device: torch.device, *values: float) -> list[float]:
    if place.size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _save_resume_state(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                       config: TrainConfig, position: _Position, out: Path) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.student_state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"epoch": str(position.epoch), "step": str(position.step),
            "loss_sum": repr(position.loss_sum), "images": str(position.images),
            "recipe": json.dumps(config.recipe(), sort_keys=True)}
    atomic_write(resume_path(out), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_resume_state(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                       config: TrainConfig, out: Path) -> _Position:
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
    except Exception as error:
        raise TrainingError(f"cannot resume from {path}: {error}") from None
    ours = config.recipe()
    changed = {k: (recipe.get(k), v) for k, v in ours.items()
               if k != "epochs" and recipe.get(k) != v}
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
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})
    return position
