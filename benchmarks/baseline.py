"""The baseline: what the RD4AD reference code does, re-implemented from its description.

Every benchmark measures our path against this one in the same run, so that each figure comes
with a ratio. It is written from REFERENCE.md §1–4 (no reference code is copied) and keeps the
reference's *behaviour*, wasteful parts included, because those are what the speed-ups remove:

- the teacher is the whole source network with gradients on: autograd records its graph, it
  computes ``layer4`` (or, for EfficientNet-Lite0, every later stage and the head) and throws it
  away, and in training the loss's backward pass runs through it too;
- inference takes one image at a time (the reference's map function reads element ``[0, 0]``):
  per layer ``1 - cos`` and bilinear upsampling in torch, then a copy to the CPU, a float64 numpy
  sum and ``scipy.ndimage.gaussian_filter(sigma=4)``, one image after the other;
- metrics: every pixel and label appended to Python lists, scikit-learn's ``roc_auc_score`` on
  them, and the per-image "PRO" of REFERENCE.md §4 (200 thresholds of each anomalous image's own
  range, regions relabelled and visited one by one at every threshold, FPR < 0.3 kept and
  rescaled), without pandas.

Weights are shared with (copied from) one of our models so both paths compute the same maps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score
from torch import nn

from rd.data import ImageDataset
from rd.model import ReverseDistillation
from rd.teacher import build_network

SIGMA = 4
PRO_THRESHOLDS = 200
PRO_MAX_FPR = 0.3
_EIGHT = np.ones((3, 3), dtype=bool)  # the reference labels regions with full connectivity


# ---------------------------------------------------------------------------------- model


class ReferenceTeacher(nn.Module):
    """The teacher as the reference runs it: the whole network, every stage computed.

    Built from a fresh network of the same architecture with our teacher's weights loaded into
    the stages both share; the stages we never compute keep their random initialisation (their
    output is discarded either way). Parameters require gradients, as in the reference.
    """

    def __init__(self, model: ReverseDistillation) -> None:
        super().__init__()
        spec = model.teacher.spec
        self.network = build_network(spec.name)
        unexpected = self.network.load_state_dict(
            model.teacher.extractor.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"teacher weights do not map onto {spec.name}: {unexpected[:3]}")
        self.network.eval().requires_grad_(True)
        self.is_resnet = hasattr(self.network, "layer4")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.network
        if self.is_resnet:
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            f1 = net.layer1(x)
            f2 = net.layer2(f1)
            f3 = net.layer3(f2)
            net.layer4(f3)  # computed and discarded, as the reference does
            return [f1, f2, f3]
        x = net.bn1(net.conv_stem(x))
        features = []
        for index, stage in enumerate(net.blocks):
            x = stage(x)
            if index in (1, 2, 4):  # strides 4, 8, 16
                features.append(x)
        net.bn2(net.conv_head(x))  # the rest of the encoder, discarded
        return features


class ReferenceRD(nn.Module):
    """Reference teacher + a student (OCBE and decoder) with our model's weights."""

    def __init__(self, model: ReverseDistillation, share_student: bool = True) -> None:
        super().__init__()
        self.teacher = ReferenceTeacher(model)
        bottleneck, decoder = model.bottleneck, model.decoder
        if not share_student:  # training needs its own copy to step
            bottleneck, decoder = copy.deepcopy(bottleneck), copy.deepcopy(decoder)
        self.bottleneck = bottleneck
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.teacher(images)
        return features, self.decoder(self.bottleneck(features))


# ------------------------------------------------------------------------------ inference


def reference_map(features: Sequence[torch.Tensor], rebuilt: Sequence[torch.Tensor],
                  size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The reference's maps of ONE image: per-layer 1 - cos, upsampled, copied to numpy and
    summed there (float64). Returns the unsmoothed sum and the layer maps."""
    fused = np.zeros((size, size))
    layers = []
    for t, s in zip(features, rebuilt, strict=True):
        distance = 1 - F.cosine_similarity(t, s)
        distance = F.interpolate(distance.unsqueeze(1), size=size, mode="bilinear",
                                 align_corners=True)
        layers.append(distance[0, 0].detach().cpu().numpy())
        fused += layers[-1]
    return fused, layers


def reference_predict(model: ReferenceRD, images: torch.Tensor
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed fused maps (N, S, S) float64 and scores, one image at a time, gradients on."""
    model.eval()
    device = next(model.parameters()).device
    size = images.shape[-1]
    maps, scores = [], []
    with torch.enable_grad():
        for image in images.split(1):
            features, rebuilt = model(image.to(device))
            fused, _ = reference_map(features, rebuilt, size)
            smoothed = ndimage.gaussian_filter(fused, SIGMA)
            maps.append(smoothed)
            scores.append(smoothed.max())
    return np.stack(maps), np.asarray(scores)


# -------------------------------------------------------------------------------- metrics


def _region_coordinates(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pixel coordinates of each 8-connected region (what a regionprops loop visits)."""
    regions, _ = ndimage.label(mask, structure=_EIGHT)
    coordinates = []
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        ys, xs = np.nonzero(regions[box] == index)
        coordinates.append((ys + box[0].start, xs + box[1].start))
    return coordinates


def reference_image_pro(mask: np.ndarray, amap: np.ndarray,
                        num_thresholds: int = PRO_THRESHOLDS) -> float:
    """The reference's PRO area of one anomalous image, threshold by threshold.

    Thresholds ``np.arange(min, max, (max - min) / n)`` of the image's own map; at each one the
    map is binarised (> threshold), the mask's regions are labelled again and visited one by one,
    PRO is their mean overlap and FPR the share of the image's normal pixels flagged. Points with
    FPR < 0.3 are kept, FPR is divided by its largest kept value, the area is the trapezoid rule.
    """
    mask = mask.astype(int)
    inverse = 1 - mask
    low, high = amap.min(), amap.max()
    binary = np.zeros_like(amap, dtype=bool)
    fprs, pros = [], []
    for threshold in np.arange(low, high, (high - low) / num_thresholds):
        binary[amap <= threshold] = False
        binary[amap > threshold] = True
        overlaps = [binary[ys, xs].sum() / ys.size for ys, xs in _region_coordinates(mask)]
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(overlaps))
    fpr, pro = np.asarray(fprs), np.asarray(pros)
    kept = fpr < PRO_MAX_FPR
    fpr, pro = fpr[kept], pro[kept]
    return float(auc(fpr / fpr.max(), pro))


def reference_metrics(labels: Iterable[int], masks: np.ndarray, maps: np.ndarray
                      ) -> dict[str, float]:
    """Image AUROC, pixel AUROC and mean per-image PRO, computed the reference's way."""
    gt_px: list = []
    pr_px: list = []
    gt_sp, pr_sp, pros = [], [], []
    for label, mask, amap in zip(labels, masks, maps, strict=True):
        gt = mask.astype(int)
        if label != 0:
            pros.append(reference_image_pro(gt, amap))
        gt_px.extend(gt.ravel())
        pr_px.extend(amap.ravel())
        gt_sp.append(int(label))
        pr_sp.append(amap.max())
    return {"image_auroc": float(roc_auc_score(gt_sp, pr_sp)),
            "pixel_auroc": float(roc_auc_score(gt_px, pr_px)),
            "legacy_pro": float(np.mean(pros))}


def reference_inference(model: ReferenceRD, dataset: ImageDataset
                        ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The reference's test loop: a DataLoader of batch 1, each image read and mapped in turn.

    Returns smoothed maps (N, S, S), masks (N, S, S) bool and labels, for reference_metrics.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    maps, masks, labels = [], [], []
    for batch in loader:
        amap, _ = reference_predict(model, batch["image"])
        maps.append(amap[0])
        masks.append(batch["mask"][0, 0].numpy() > 0.5)
        labels.append(int(batch["label"][0]))
    return np.stack(maps), np.stack(masks), labels


def threshold_loop_au_pro(masks: np.ndarray, maps: np.ndarray,
                          thresholds: np.ndarray | None = None,
                          num_thresholds: int = PRO_THRESHOLDS,
                          fpr_limit: float = PRO_MAX_FPR) -> float:
    """Standard AU-PRO the common slow way: a loop over global thresholds and regions.

    Global thresholds over the whole set (normal images included), by default ``num_thresholds``
    evenly spaced between the lowest and highest score; PRO is the mean overlap of all regions of
    all images; the curve (FPR, PRO) is integrated up to ``fpr_limit`` (interpolated there) and
    divided by it. With ``thresholds`` = every distinct score the curve is exact.
    """
    masks = np.asarray(masks, dtype=bool)
    if thresholds is None:
        thresholds = np.linspace(maps.min(), maps.max(), num_thresholds)
    per_image = [(i, _region_coordinates(mask)) for i, mask in enumerate(masks) if mask.any()]
    normal = ~masks
    n_normal = normal.sum()
    fprs, pros = [], []
    for threshold in np.sort(thresholds)[::-1]:
        binary = maps > threshold
        overlaps = [binary[i][ys, xs].mean() for i, coords in per_image for ys, xs in coords]
        fprs.append(np.logical_and(binary, normal).sum() / n_normal)
        pros.append(np.mean(overlaps))
    fpr = np.concatenate(([0.0], fprs, [1.0]))
    pro = np.concatenate(([0.0], pros, [1.0]))
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if x[-1] < fpr_limit:
        y_limit = np.interp(fpr_limit, fpr[end - 1:end + 1], pro[end - 1:end + 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


# ------------------------------------------------------------------------------- training


def reference_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]
                   ) -> torch.Tensor:
    """Sum over layers of the batch mean of 1 - cos between each sample's flattened maps."""
    loss = 0
    for t, s in zip(teacher, student, strict=True):
        loss = loss + torch.mean(1 - F.cosine_similarity(t.reshape(t.shape[0], -1),
                                                         s.reshape(s.shape[0], -1)))
    return loss


def reference_optimizer(model: ReferenceRD, lr: float = 0.005) -> torch.optim.Optimizer:
    """Adam over the student only, as the reference (the teacher's gradients pile up unused)."""
    return torch.optim.Adam([*model.bottleneck.parameters(), *model.decoder.parameters()],
                            lr=lr, betas=(0.5, 0.999))


def reference_train_step(model: ReferenceRD, optimizer: torch.optim.Optimizer,
                         images: torch.Tensor) -> float:
    """One reference training step: teacher with graph, loss backward through it, Adam step."""
    model.teacher.eval()
    model.bottleneck.train()
    model.decoder.train()
    features, rebuilt = model(images)
    loss = reference_loss(features, rebuilt)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.item())
