"""One training loop: the paper's recipe by default, resumable exactly, teacher features cached.

The recipe (REFERENCE.md §2): 256 px, no augmentation, Adam lr 0.005 betas (0.5, 0.999), batch 16,
200 epochs, seed 111. Training never looks at the test set.

Exact resume: every ``checkpoint_every`` epochs the student, the optimizer state and the epoch
are written (atomically) to ``<out>.resume.safetensors``; the shuffling order of epoch ``e`` is
drawn from a generator seeded by ``(seed, e)``, so a resumed run follows the same path as an
uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
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


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says what to change."""


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
                "init")
        values = asdict(self)
        return {k: list(values[k]) if k == "betas" else values[k] for k in keys}


@dataclass
class TrainResult:
    model: ReverseDistillation
    epochs_trained: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


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
    each epoch's log record.
    """
    config.validate()
    out = Path(out)
    if not samples:
        raise TrainingError("no training images: the normal-image folder is empty")
    device = resolve_device(config.device)
    if config.amp and device.type != "cuda":
        raise TrainingError("--amp needs a CUDA device; leave it off on the CPU")
    spec = get_backbone(config.backbone)
    preprocess = Preprocess(config.image_size, spec.mean, spec.std)
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

    start_epoch = 0
    if resume:
        start_epoch = _load_resume_state(model, optimizer, config, out)
    elif resume_path(out).exists():
        resume_path(out).unlink()  # a fresh run: a stale resume state must not be picked up

    cache = _teacher_cache(model, dataset, config, device)
    base_metadata = {
        "preprocess": preprocess.to_dict(),
        "fusion": "sum",
        "recipe": config.recipe(),
        "train_images": len(samples),
        **(metadata or {}),
    }
    result = TrainResult(model, start_epoch)
    started = time.perf_counter()
    epochs = range(start_epoch + 1, config.epochs + 1)
    bar = tqdm(epochs, desc="train", unit="epoch", disable=not progress, file=sys.stderr,
               initial=start_epoch, total=config.epochs)
    log_file = log_path(out)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        log_file.write_text("")
    for epoch in bar:
        epoch_start = time.perf_counter()
        loss = _run_epoch(model, optimizer, dataset, cache, config, epoch, device)
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "loss": loss, "seconds": round(seconds, 3),
                  "images_per_s": round(len(dataset) / seconds, 2), "lr": config.lr}
        with log_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        result.losses.append(loss)
        result.epochs_trained = epoch
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_epoch:
            on_epoch(record)
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            _save_resume_state(model, optimizer, config, epoch, out)
            save_checkpoint(model, out, {**base_metadata, "epochs_trained": epoch})
    result.seconds = time.perf_counter() - started
    return result


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


def _run_epoch(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
               dataset: ImageDataset, cache: list[torch.Tensor] | None, config: TrainConfig,
               epoch: int, device: torch.device) -> float:
    model.train()
    order = epoch_order(config.seed, epoch, len(dataset))
    if cache is None:
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=order,
                            num_workers=config.workers, pin_memory=device.type == "cuda")
        batches = ((model.teacher, batch["image"].to(device, non_blocking=True))
                   for batch in loader)
    else:
        index = torch.tensor(order, device=cache[0].device)
        batches = ((None, [f[chunk] for f in cache])
                   for chunk in index.split(config.batch_size))
    total, count = 0.0, 0
    for teacher, inputs in batches:
        try:
            with _autocast(config, device):
                features = teacher(inputs) if teacher is not None else inputs
                loss = reverse_distillation_loss(features, model.student(features))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of GPU memory at batch size {config.batch_size}: try "
                                f"--batch-size {max(1, config.batch_size // 2)}") from None
        size = features[0].shape[0]
        total += loss.item() * size
        count += size
    return total / count


def _save_resume_state(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                       config: TrainConfig, epoch: int, out: Path) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.student_state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"epoch": str(epoch), "recipe": json.dumps(config.recipe(), sort_keys=True)}
    atomic_write(resume_path(out), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_resume_state(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                       config: TrainConfig, out: Path) -> int:
    path = resume_path(out)
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist (start without --resume)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        epoch, recipe = int(meta["epoch"]), json.loads(meta["recipe"])
    except Exception as error:
        raise TrainingError(f"cannot resume from {path}: {error}") from None
    ours = config.recipe()
    changed = {k: (recipe.get(k), v) for k, v in ours.items()
               if k != "epochs" and recipe.get(k) != v}
    if changed:
        raise TrainingError(f"cannot resume {path}: settings differ from the stopped run "
                            f"(setting: (stopped run, now)): {changed}")
    if epoch >= config.epochs:
        raise TrainingError(f"{path} already reached epoch {epoch}; raise --epochs to continue")
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
    return epoch
