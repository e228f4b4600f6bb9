"""Teacher adaptation to the normal images before the student is trained (supplement, App. D).

- ``none`` (the paper): the frozen ImageNet teacher.
- ``bn``: re-estimate the batch-norm statistics of the teacher's *deepest stage only* on the
  normal training images and blend them half and half with the ImageNet statistics. Re-estimating
  every statistic collapsed a teacher to chance on grey images (channels nearly constant on them
  get a tiny variance and are amplified into noise); the blend keeps every variance at least half
  its ImageNet value, and the shallow layers, whose features localise, stay as they were.
- ``ssl``: PANDA-style fine-tuning (Reiss et al., CVPR 2021, the supplement's [11]): the deepest
  stage is trained for a few steps to pull the normal images' pooled features toward their mean
  (compactness loss), with an L2 regulariser toward the ImageNet weights that keeps it from
  collapsing, then frozen again. Batch-norm statistics stay frozen.

The adapted teacher is saved in the checkpoint (``teacher.*`` tensors), so inference and export
use exactly it. Everything here is deterministic for a given seed on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rd.teacher import Teacher

ADAPT_MODES = ("none", "bn", "ssl")
BN_BLEND = 0.5  # share of the normal images' statistics in the adapted ones
SSL_STEPS = 40  # optimizer steps of the compactness fine-tune
SSL_LR = 1e-4
SSL_REGULARISER = 1.0  # weight of the squared distance to the ImageNet weights (per parameter)


def adapt_teacher(teacher: Teacher, dataset: Dataset, mode: str, seed: int = 111,
                  batch_size: int = 16, device: torch.device | None = None) -> dict[str, Any]:
    """Adapt ``teacher`` in place on the normal images of ``dataset``; returns what was done
    (for the checkpoint's metadata and the log)."""
    if mode not in ADAPT_MODES:
        raise ValueError(f"unknown teacher adaptation {mode!r}; choose one of {ADAPT_MODES}")
    if mode == "none":
        return {"method": "none"}
    device = device or next(teacher.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=mode == "ssl",
                        generator=generator)
    stage = teacher.deepest_stage()
    if mode == "bn":
        info = _adapt_batch_norm(teacher, stage, loader, device)
    else:
        info = _fine_tune_compact(teacher, stage, loader, device)
    teacher.adapted = mode
    teacher.requires_grad_(False)
    teacher.eval()
    return {"method": mode, **info}


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _adapt_batch_norm(teacher: Teacher, stage: nn.Module, loader: DataLoader,
                      device: torch.device) -> dict[str, Any]:
    norms = _batch_norms(stage)
    imagenet = [(bn.running_mean.clone(), bn.running_var.clone(), bn.momentum) for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches
        bn.train()
    for batch in loader:
        teacher.extractor(batch["image"].to(device))
    shifts = []
    for bn, (mean, var, momentum) in zip(norms, imagenet, strict=True):
        bn.eval()
        bn.momentum = momentum
        new_mean = BN_BLEND * bn.running_mean + (1 - BN_BLEND) * mean
        new_var = BN_BLEND * bn.running_var + (1 - BN_BLEND) * var
        shifts.append(float(((new_mean - mean).abs() / (var + bn.eps).sqrt()).mean()))
        bn.running_mean.copy_(new_mean)
        bn.running_var.copy_(new_var)
    return {"scope": "deepest stage", "layers": len(norms), "blend": BN_BLEND,
            "mean_shift_in_sd": round(sum(shifts) / max(len(shifts), 1), 4)}


def _pooled(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    return teacher.extractor(images)[-1].mean(dim=(2, 3))


def _fine_tune_compact(teacher: Teacher, stage: nn.Module, loader: DataLoader,
                       device: torch.device) -> dict[str, Any]:
    with torch.no_grad():
        centre = torch.cat([_pooled(teacher, b["image"].to(device)) for b in loader]).mean(0)
    params = [p for p in stage.parameters()]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=SSL_LR)
    teacher.extractor.eval()  # batch-norm statistics stay frozen
    losses: list[float] = []
    step = 0
    while step < SSL_STEPS:
        for batch in loader:
            with torch.enable_grad():
                pooled = _pooled(teacher, batch["image"].to(device))
                compact = ((pooled - centre) ** 2).sum(1).mean() / centre.pow(2).sum()
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
                loss = compact + SSL_REGULARISER * drift
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(compact.item())
            step += 1
            if step >= SSL_STEPS:
                break
    with torch.no_grad():
        drift = float(sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True)))
    return {"scope": "deepest stage", "objective": "compactness (PANDA) + L2 to ImageNet",
            "steps": SSL_STEPS, "lr": SSL_LR, "regulariser": SSL_REGULARISER,
            "compactness_first": round(losses[0], 5), "compactness_last": round(losses[-1], 5),
            "weight_drift": round(drift, 6)}
