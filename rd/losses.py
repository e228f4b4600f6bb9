"""The reference training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reverse_distillation_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]
                              ) -> torch.Tensor:
    """Sum over layers of the batch mean of ``1 - cos`` between whole flattened maps.

    This is the reference code's loss (each sample's C×H×W map is one vector), not the paper's
    per-pixel equation, which trains worse.
    """
    loss = teacher[0].new_zeros((), dtype=torch.float32)
    for t, s in zip(teacher, student, strict=True):
        cosine = F.cosine_similarity(t.flatten(1).float(), s.flatten(1).float(), dim=1)
        loss = loss + (1 - cosine).mean()
    return loss
