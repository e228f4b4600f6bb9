"""Position statistics: a per-position normal model of the teacher's features beside RD's map.

For parts that lie in place (a fixtured casting, a strip on a conveyor), a large faint region
is a defect the student rebuilds along with everything else: the one-class embedding carries
it (docs/results.md, round 9). What the embedding cannot tell, a per-position model can: each
position's teacher features of layers 1 and 2, averaged over a window of a quarter of the
image's side, are compared with that position's mean and variance over the normal training
images (a diagonal Gaussian per position, as PaDiM models patches: Defard et al., 2021). The
map is the mean squared z-score over channels, the two layers averaged at the S×S input,
blurred like RD's map (σ = 4).

``--position-stats`` (off by default: the paper) fits these statistics once on the normal
training images of the squashed S×S view, before the student is trained, and adds
``weight × map`` to RD's smoothed map, ``weight`` being the ratio of the two maps' means over
the normal training images (each map counts as much as the other on normal images; the sum
stays in RD's units). The image score stays RD's own unless ``--position-score`` is also
given: the statistics flag any image whose normal variation moves with position (hazelnut's
rotations: image AUROC 1.0 -> 0.73 with the sum's maximum).

``--position-score`` scores an image by the larger of RD's score and the statistics map's
maximum, each measured against the most surprising normal training image: RD's largest score
over the calibration images, and the statistics' largest maximum with each image *left out* of
the fit that scores it (with 20 images the in-sample maxima run about 30 % low; the left-out
ones match new normal images). ``score_weight`` = RD's reference / the statistics' brings the
second into RD's units. A large faint region then counts at the image level too (casting's
uneven parts, docs/results.md round 11).

``--position-stats auto`` keeps the statistics only where the normal training images say the
parts lie in place: their left-out maxima (above) are alike there, and spread where parts move
or the view is a texture, whose statistics cost the map and the score (``in_place_decision``).

``--position-stats envelope`` is for parts of unknown kind. It fits the statistics on the normal
images *and* their augmented copies (the transforms ``--augment`` keeps, or those ``--augment
auto`` would keep when the student trains without augmentation: the variation measured as
in-distribution, so a part that turns is modelled turned), records at each position the
largest distance any normal image or copy reaches against the statistics of the *other* images
(the envelope), and maps only what exceeds it, relative to it: ``max(0, d - e) / e`` per layer,
averaged and blurred like the map above. Normal variation, however it moves, stays under the
envelope, so the map adds little where the plain statistics cost parts that move
(docs/results.md, round 17); a missing or misplaced part still rises above it. Its weight is
``ENVELOPE_WEIGHT`` times RD's largest normal training score; the image score stays RD's.

The statistics are buffers of ``ReverseDistillation.position`` (checkpoint tensors
``position.*``), so ``predict``, the exported ONNX graph and ``predict_native`` all carry them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rd.maps import gaussian_blur

LAYERS = (0, 1)  # teacher layers modelled (strides 4 and 8): where features still localise
WINDOW_SHARE = 4  # the pooling window is 1/WINDOW_SHARE of the layer's side
VARIANCE_FLOOR = 1e-3  # added to each variance, times the layer's mean variance
# --position-stats auto keeps the statistics when the left-out maxima of the normal training
# images spread by at most this coefficient of variation (docs/results.md, round 12: 0.15-0.19
# on the parts that lie in place, 0.29-0.78 where parts move or the view is a texture)
IN_PLACE_MAX_SPREAD = 0.25
# --position-stats envelope: an excess of the envelope's own size (twice the largest distance a
# normal image reaches there) counts this share of RD's largest normal training score
# (docs/results.md, round 17)
ENVELOPE_WEIGHT = 0.5
ENVELOPE_FLOOR = 1e-2  # no cell's envelope below this share of its layer's median envelope


def window(side: int) -> int:
    """Pooling window, in cells, of a layer ``side`` cells wide (16 and 8 at 256 px)."""
    return max(1, side // WINDOW_SHARE)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """Each cell's features averaged over the window around it (same size as ``feature``)."""
    size = window(feature.shape[-1])
    out = F.avg_pool2d(feature.float(), size, 1, size // 2)
    return out[..., :feature.shape[-2], :feature.shape[-1]]


class PositionStatistics(nn.Module):
    """Per-position mean and variance of the pooled teacher features of the normal images,
    and the weight that brings their map to RD's scale."""

    def __init__(self, shapes: Iterable[tuple[int, int, int]], envelope: bool = False) -> None:
        super().__init__()
        for index, shape in enumerate(shapes):
            self.register_buffer(f"mean{index}", torch.zeros(shape))
            self.register_buffer(f"var{index}", torch.ones(shape))
            if envelope:  # --position-stats envelope: each cell's largest normal distance
                self.register_buffer(f"envelope{index}", torch.ones((1, *shape[1:])))
        self.envelope = envelope
        self.register_buffer("weight", torch.ones(()))
        # --position-score: RD's units per unit of the statistics map's maximum (from the
        # checkpoint's metadata); None: the image score is RD's own
        self.score_weight: float | None = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> PositionStatistics:
        """Statistics of the shapes ``tensors`` (a checkpoint's ``position.*``) hold."""
        shapes = [tuple(tensors[f"mean{i}"].shape) for i in range(len(LAYERS))]
        return cls(shapes, envelope="envelope0" in tensors)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weight`` times the smoothed statistics map at ``size`` (N, H, W), and with
        ``--position-score`` each image's score in RD's units (N,), else None."""
        raw = self.raw_map(features, size)
        score = (None if self.score_weight is None
                 else self.score_weight * raw.flatten(1).amax(1))
        return self.weight * raw, score

    def raw_map(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(N, H, W): mean squared z-score over channels, layers averaged, blurred (σ 4); with
        an envelope, each layer's excess over it, relative to it."""
        cells = [pooled(features[layer]) for layer in LAYERS]
        if not self.envelope:
            return z_map(cells, self.moments(), size)
        excess = [torch.relu(distance - bound) / bound for distance, bound in
                  zip(distances(cells, self.moments()), self.envelopes(), strict=True)]
        return _smoothed(excess, size)

    def envelopes(self) -> list[torch.Tensor]:
        """Each modelled layer's envelope (1, 1, h, w) (``--position-stats envelope``)."""
        return [getattr(self, f"envelope{i}") for i in range(len(LAYERS))]

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, variance) of each modelled layer."""
        return [(getattr(self, f"mean{i}"), getattr(self, f"var{i}"))
                for i in range(len(LAYERS))]


def distances(cells: list[torch.Tensor], moments: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> list[torch.Tensor]:
    """Per layer (N, 1, h, w): the pooled ``cells`` against (mean, variance), mean squared
    z-score over channels."""
    return [((layer_cells - mean) ** 2 / var).mean(1, keepdim=True)
            for layer_cells, (mean, var) in zip(cells, moments, strict=True)]


def _smoothed(per_layer: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W): per-layer (N, 1, h, w) maps upsampled to ``size``, averaged, blurred (σ 4)."""
    total = None
    for layer_map in per_layer:
        upsampled = F.interpolate(layer_map, size=size, mode="bilinear", align_corners=True)
        total = upsampled if total is None else total + upsampled
    return gaussian_blur(total[:, 0] / len(per_layer))


def z_map(cells: list[torch.Tensor], moments: list[tuple[torch.Tensor, torch.Tensor]],
          size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W): the pooled ``cells`` of each layer against its (mean, variance), mean squared
    z-score over channels, upsampled to ``size``, layers averaged, blurred (σ 4)."""
    return _smoothed(distances(cells, moments), size)


@torch.no_grad()
def fit_position_statistics(teacher: nn.Module,
                            batches: Callable[[], Iterable[torch.Tensor]], size: int,
                            device: torch.device | None = None
                            ) -> tuple[PositionStatistics, dict[str, Any]]:
    """Fit the statistics on the batches of preprocessed S×S normal images ``batches()``
    yields (called twice: the moments, then each image's map, with the fit and with the image
    left out). Returns them with what the checkpoint records."""
    device = device or next(teacher.parameters()).device
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    count = 0
    for batch in batches():
        features = teacher(batch.to(device))
        for index, layer in enumerate(LAYERS):
            cells = pooled(features[layer]).double()
            if len(sums) <= index:
                sums.append(torch.zeros_like(cells[0]))
                squares.append(torch.zeros_like(cells[0]))
            sums[index] += cells.sum(0)
            squares[index] += (cells ** 2).sum(0)
        count += len(batch)
    if count < 2:
        raise ValueError("position statistics need at least two normal training images")
    statistics = PositionStatistics([tuple(s.shape) for s in sums]).to(device)
    floors = _set_moments(statistics, sums, squares, count)
    raw_sum, left_out_maxima = 0.0, []
    for batch in batches():
        features = teacher(batch.to(device))
        cells = [pooled(features[layer]) for layer in LAYERS]
        raw_sum += float(z_map(cells, statistics.moments(), (size, size)).sum())
        if count > 2:  # each image against the statistics of the others (n - 1 >= 2 images)
            left_out = _left_out_moments([c.double() for c in cells], sums, squares, count,
                                         floors)
            left_out_maxima += z_map(cells, left_out, (size, size)).flatten(1).amax(1).tolist()
    maxima = torch.tensor(left_out_maxima, dtype=torch.float64)
    return statistics, {"layers": [layer + 1 for layer in LAYERS],
                        "window": f"1/{WINDOW_SHARE} of the side", "images": count,
                        "variance_floor": VARIANCE_FLOOR,
                        "map_mean": raw_sum / (count * size * size),
                        "left_out_max": float(maxima.max()) if len(maxima) else None,
                        "left_out_spread": (float(maxima.std(correction=0) / maxima.mean())
                                            if len(maxima) else None)}


@torch.no_grad()
def fit_envelope_statistics(teacher: nn.Module, groups: Callable[[], Iterable[torch.Tensor]],
                            device: torch.device | None = None, transforms: Sequence[str] = ()
                            ) -> tuple[PositionStatistics, dict[str, Any]]:
    """``--position-stats envelope``: statistics fitted on every image of the groups
    ``groups()`` yields (called twice), one preprocessed (1 + copies, 3, S, S) tensor per normal
    training image, the image first and then its augmented copies (``transforms``, recorded);
    and the envelope: each cell's largest distance that any image or copy reaches against the
    statistics of the other groups. Returns them with what the checkpoint records."""
    device = device or next(teacher.parameters()).device
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    count = images = 0
    for group in groups():
        for index, cells in enumerate(_pooled_cells(teacher, group.to(device))):
            if len(sums) <= index:
                sums.append(torch.zeros_like(cells[0]))
                squares.append(torch.zeros_like(cells[0]))
            sums[index] += cells.sum(0)
            squares[index] += (cells ** 2).sum(0)
        count += len(group)
        images += 1
    if images < 3:
        raise ValueError("--position-stats envelope needs at least three normal training "
                         f"images (the data has {images})")
    statistics = PositionStatistics([tuple(s.shape) for s in sums], envelope=True).to(device)
    floors = _set_moments(statistics, sums, squares, count)
    bounds: list[torch.Tensor] | None = None
    for group in groups():
        cells = _pooled_cells(teacher, group.to(device))
        moments = _left_out_moments(cells, sums, squares, count, floors, group=True)
        reached = [d.amax(0, keepdim=True)
                   for d in distances([c.float() for c in cells], moments)]
        bounds = reached if bounds is None else [torch.maximum(b, r)
                                                 for b, r in zip(bounds, reached, strict=True)]
    for index, bound in enumerate(bounds or []):
        # a cell that no normal image moves (a constant background) would divide by ~0
        floor = (ENVELOPE_FLOOR * bound.median()).clamp_min(1e-12)
        getattr(statistics, f"envelope{index}").copy_(bound.clamp_min(floor)[0])
    return statistics, {"mode": "envelope", "layers": [layer + 1 for layer in LAYERS],
                        "window": f"1/{WINDOW_SHARE} of the side", "images": images,
                        "copies": count - images, "transforms": list(transforms),
                        "variance_floor": VARIANCE_FLOOR, "envelope_weight": ENVELOPE_WEIGHT}


def _set_moments(statistics: PositionStatistics, sums: list[torch.Tensor],
                 squares: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Write the mean and floored variance of ``count`` images' sums into ``statistics``;
    returns each layer's variance floor."""
    floors = []
    for index, (total, square) in enumerate(zip(sums, squares, strict=True)):
        mean = total / count
        var = ((square - count * mean ** 2) / (count - 1)).clamp_min(0)
        floors.append(VARIANCE_FLOOR * var.mean())
        getattr(statistics, f"mean{index}").copy_(mean.float())
        getattr(statistics, f"var{index}").copy_((var + floors[-1]).float())
    return floors


def _pooled_cells(teacher: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
    """The modelled layers' pooled teacher features of ``batch``, in float64."""
    features = teacher(batch)
    return [pooled(features[layer]).double() for layer in LAYERS]


def calibrate_envelope(statistics: PositionStatistics, rd_max: float) -> float:
    """Set ``weight`` of envelope statistics to ``ENVELOPE_WEIGHT`` times RD's largest normal
    training score; returns it."""
    weight = ENVELOPE_WEIGHT * rd_max
    statistics.weight.fill_(weight)
    return weight


def in_place_decision(info: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the fit ``info`` describes parts that lie in place, and why (--position-stats
    auto): the checkpoint's ``position_auto`` metadata. Where parts move, or the view is a
    texture, each normal image's maximum against the others swings with how far its pose or
    pattern happens to fall from theirs: a wide spread of the left-out maxima says that the
    per-position model mistakes normal variation for defects (docs/results.md, round 12)."""
    spread = info.get("left_out_spread")
    if spread is None:
        return {"kept": False, "left_out_spread": None, "max_spread": IN_PLACE_MAX_SPREAD,
                "why": "position statistics left out: judging whether the parts lie in place "
                       f"needs at least three normal training images (the data has "
                       f"{info.get('images')})"}
    kept = spread <= IN_PLACE_MAX_SPREAD
    return {"kept": kept, "left_out_spread": spread, "max_spread": IN_PLACE_MAX_SPREAD,
            "why": f"position statistics {'kept' if kept else 'left out'}: the normal "
                   f"training images' left-out maxima spread by {spread:.2f} (coefficient of "
                   f"variation; {'<=' if kept else '>'} {IN_PLACE_MAX_SPREAD} for parts that "
                   "lie in place)"}


def _left_out_moments(cells: list[torch.Tensor], sums: list[torch.Tensor],
                      squares: list[torch.Tensor], count: int, floors: list[torch.Tensor],
                      group: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of the batch (cells: (B, C, H, W) per layer), the mean and floored variance
    of the other ``count - 1`` images, from the fit's sums: exact, with no second fit. With
    ``group``, the whole batch is left out together: the moments of the other ``count - B``."""
    moments = []
    for layer_cells, total, square, floor in zip(cells, sums, squares, floors, strict=True):
        if group:
            part, part_square = layer_cells.sum(0), (layer_cells ** 2).sum(0)
            others = count - len(layer_cells)
        else:
            part, part_square, others = layer_cells, layer_cells ** 2, count - 1
        mean = (total - part) / others
        var = ((square - part_square - others * mean ** 2) / (others - 1)).clamp_min(0)
        moments.append((mean.float(), (var + floor).float()))
    return moments


def calibrate(statistics: PositionStatistics, rd_mean: float, map_mean: float) -> float:
    """Set ``weight`` so that the statistics map's normal mean equals RD's; returns it."""
    weight = rd_mean / map_mean if map_mean > 0 else 0.0
    statistics.weight.fill_(weight)
    return weight


def calibrate_score(statistics: PositionStatistics, rd_max: float, left_out_max: float
                    ) -> float:
    """Set ``score_weight`` (``--position-score``) so that the statistics' most surprising
    left-out normal training image scores as RD's most surprising one; returns it."""
    if not left_out_max > 0:
        raise ValueError("--position-score needs at least three normal training images")
    statistics.score_weight = rd_max / left_out_max
    return statistics.score_weight
