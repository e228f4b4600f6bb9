"""Checkpoints: the student as safetensors, its configuration and provenance as metadata.

A checkpoint never holds the teacher (it is rebuilt from its own ImageNet weights, whose
identity is recorded) and never needs unpickling. Files are written to a temporary name and
renamed, so an interrupted write never replaces a good checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rd.alignment import AlignedStatistics
from rd.backbones import RANDOM_TEACHER, get_backbone, torch_load_problem
from rd.data.transforms import Preprocess
from rd.errors import RDError
from rd.files import atomic_write
from rd.model import FITTED_PREFIXES, ReverseDistillation, build_model
from rd.position import PositionStatistics
from rd.version import __version__

FORMAT = "rd4ad-student"
# The newest version this code reads. Version 2 marks checkpoints whose maps depend on what an
# older reader would ignore without a word (--turn-average: metadata only, no tensors to refuse),
# so older readers refuse them; every other checkpoint is written as version 1, as before.
FORMAT_VERSION = 2
METADATA_KEY = "rd"


class CheckpointError(RDError, ValueError):
    """A checkpoint cannot be read or does not match what it is used with."""


# Largest input size a checkpoint may name: far above any real one, small enough that a forged
# size cannot make a loader allocate gigabytes.
MAX_IMAGE_SIZE = 4096
_OPTIONAL_TEXT = ("format", "backbone", "teacher_weights", "category", "fusion", "command",
                  "created_utc")


@dataclass(frozen=True)
class CheckpointMetadata(Mapping[str, Any]):
    """A checkpoint's metadata, its types checked, with the accessors readers need.

    Built by ``from_dict`` (``read_metadata`` does that), which names the field of a wrong type.
    Keys this class does not know (recipe, provenance, geometry...) are kept in ``extra``, so
    ``to_dict`` gives back what was stored. It is also a read-only mapping of that dict, for code
    that reads keys by name.
    """

    preprocess: dict[str, Any]
    backbone: str | None = None
    teacher_weights: str | None = None
    category: str | None = None
    fusion: str = "sum"
    command: str = ""
    metrics: dict[str, Any] | None = None  # headline numbers and "thresholds" {kind: value}
    normal_scores: dict[str, float] | None = None  # statistics of normal test-image scores
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] = ()  # the keys read, in their order: to_dict writes just those

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "checkpoint"
                  ) -> CheckpointMetadata:
        """Check every known field's type; a CheckpointError names the first wrong one."""
        if isinstance(values, CheckpointMetadata):
            return values
        if not isinstance(values, Mapping):
            raise CheckpointError(f"{source}: bad metadata: a JSON object expected, got "
                                  f"{type(values).__name__}")

        def bad(name: str, wanted: str) -> CheckpointError:
            found = repr(values_at(name))
            found = found if len(found) <= 60 else found[:57] + "..."
            return CheckpointError(f"{source}: bad metadata: {name} must be {wanted}, got "
                                   f"{found}")

        def values_at(name: str) -> Any:
            value: Any = values
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            return value

        for name in _OPTIONAL_TEXT:
            if values.get(name) is not None and not isinstance(values[name], str):
                raise bad(name, "a string")
        if "format_version" in values and not _is_int(values["format_version"]):
            raise bad("format_version", "a whole number")
        preprocess = values.get("preprocess")
        if not isinstance(preprocess, Mapping):
            raise bad("preprocess", "an object with size, mean and std")
        size = preprocess.get("size")
        if not _is_int(size) or not 32 <= size <= MAX_IMAGE_SIZE or size % 32:
            raise bad("preprocess.size", f"a multiple of 32 from 32 to {MAX_IMAGE_SIZE}")
        for name in ("mean", "std"):
            triple = preprocess.get(name)
            if not (isinstance(triple, list | tuple) and len(triple) == 3
                    and all(_is_number(v) for v in triple)):
                raise bad(f"preprocess.{name}", "three finite numbers")
        metrics = values.get("metrics")
        if metrics is not None:
            if not isinstance(metrics, Mapping):
                raise bad("metrics", "an object")
            for name, value in metrics.items():
                if name == "thresholds":
                    if not isinstance(value, Mapping):
                        raise bad("metrics.thresholds", "an object of numbers")
                    for kind, threshold in value.items():
                        if threshold is not None and not _is_number(threshold):
                            raise bad(f"metrics.thresholds.{kind}", "a finite number")
                elif value is not None and not _is_number(value):
                    raise bad(f"metrics.{name}", "a finite number or null")
        normal = values.get("normal_scores")
        if normal is not None:
            if not isinstance(normal, Mapping):
                raise bad("normal_scores", "an object of numbers")
            for name, value in normal.items():
                if not _is_number(value):
                    raise bad(f"normal_scores.{name}", "a finite number")
        known = {f.name for f in fields(cls)} - {"extra", "key_order"}
        return cls(
            preprocess=dict(preprocess), backbone=values.get("backbone"),
            teacher_weights=values.get("teacher_weights"), category=values.get("category"),
            fusion=values.get("fusion") or "sum", command=values.get("command") or "",
            metrics=None if metrics is None else dict(metrics),
            normal_scores=None if normal is None else dict(normal),
            extra={k: v for k, v in values.items() if k not in known}, key_order=tuple(values))

    def to_dict(self) -> dict[str, Any]:
        """The stored form: every field that holds a value, and the extra keys."""
        return copy.deepcopy(self._stored)

    @cached_property
    def _stored(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("extra", "key_order")}
        if not self.key_order:  # made here, not read: the fields that hold a value
            return {**self.extra, **{k: v for k, v in values.items() if v not in (None, "")}}
        values.update(self.extra)
        order = [*self.key_order, *(k for k in self.extra if k not in self.key_order)]
        return {k: values[k] for k in order if k in values}

    # a read-only mapping of to_dict(), for code that reads keys by name
    def __getitem__(self, key: str) -> Any:
        return self._stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    @property
    def image_size(self) -> int:
        return int(self.preprocess["size"])

    @property
    def thresholds(self) -> dict[str, float]:
        """The stored decision thresholds by kind ("f1", "fpr_0.01"...), those that are set."""
        stored = (self.metrics or {}).get("thresholds") or {}
        return {kind: float(value) for kind, value in stored.items() if value is not None}

    def threshold(self, kind: str = "f1") -> float | None:
        """A stored decision threshold (None when the checkpoint was never evaluated)."""
        return self.thresholds.get(kind)

    def metric(self, name: str) -> float | None:
        """A headline metric of the stored evaluation (image_auroc, pixel_auroc, au_pro...)."""
        value = (self.metrics or {}).get(name)
        return None if value is None or name == "thresholds" else float(value)

    def normal_score(self, statistic: str) -> float | None:
        """A statistic (mean, std, p99...) of the normal test images' scores, if stored."""
        value = (self.normal_scores or {}).get(statistic)
        return None if value is None else float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def save_checkpoint(model: ReverseDistillation, path: str | Path, metadata: Mapping[str, Any]
                    ) -> None:
    """Write the student weights and ``metadata`` (JSON-serialisable) to ``path``."""
    meta = {
        "backbone": model.backbone,
        "teacher_weights": model.teacher.weights_id,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"rd": __version__, "torch": torch.__version__},
        **metadata,
        # the writer's, whatever a rewritten checkpoint's metadata said
        "format": FORMAT,
        "format_version": FORMAT_VERSION if metadata.get("turn_average") else 1,
    }
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in model.checkpoint_state_dict().items()}
    header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> CheckpointMetadata:
    """The metadata of a checkpoint, checked to be ours and of the right types."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(_unreadable(path, error)) from None
    try:
        meta = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is a safetensors file without rd metadata: not a "
                              "checkpoint of this package (use import-reference for reference "
                              "checkpoints)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: bad metadata: nested too deeply to be ours") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: bad metadata: a JSON object expected, got "
                              f"{type(meta).__name__}")
    version = meta.get("format_version", 0)
    if meta.get("format") != FORMAT or not _is_int(version) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('format_version')!r}")
    return CheckpointMetadata.from_dict(meta, str(path))


def load_checkpoint(path: str | Path, teacher_weights: str | Path | None = None,
                    expect: Mapping[str, Any] | None = None
                    ) -> tuple[ReverseDistillation, CheckpointMetadata]:
    """Rebuild teacher + student from a checkpoint; every mismatch is a CheckpointError.

    ``expect`` holds metadata values the caller requires (e.g. backbone, image size).
    """
    path = _existing(path)
    meta = read_metadata(path)
    for key, wanted in (expect or {}).items():
        found = meta.get("preprocess", {}).get("size") if key == "image_size" else meta.get(key)
        if found != wanted:
            raise CheckpointError(f"{path} was made for {key}={found!r}, not {wanted!r}")
    try:
        get_backbone(meta["backbone"])
        Preprocess.from_dict(meta["preprocess"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: bad metadata: {error}") from None
    if meta["teacher_weights"] == RANDOM_TEACHER:
        raise CheckpointError(f"{path} was trained against a randomly initialised teacher, "
                              "which cannot be rebuilt; retrain with pretrained weights")
    model = build_model(meta["backbone"], pretrained=True, teacher_weights=teacher_weights)
    if model.teacher.weights_id != meta["teacher_weights"]:
        raise CheckpointError(f"{path} was trained with teacher weights "
                              f"{meta['teacher_weights']!r}, but the teacher loaded "
                              f"{model.teacher.weights_id!r}: pass the same weights file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(_unreadable(path, error)) from None
    tensors = _load_adapted_teacher(model, tensors, meta, path)
    tensors = _load_position(model, tensors, meta, path)
    tensors = _load_aligned(model, tensors, meta, path)
    model.turn_average = _turn_average(meta, path)
    load_student(model, tensors, str(path))
    return model, meta


def _load_adapted_teacher(model: ReverseDistillation, tensors: dict[str, torch.Tensor],
                          meta: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Load the adapted teacher a checkpoint carries (rd.adapt); returns the other tensors."""
    method = (meta.get("teacher_adapt") or {}).get("method", "none")
    teacher = {k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")}
    if method == "none":
        return tensors
    try:
        model.teacher.load_state_dict(teacher, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its adapted teacher ({method}) does not fit: "
                              f"{first}") from None
    model.teacher.adapted = method
    return {k: v for k, v in tensors.items() if not k.startswith("teacher.")}


def _load_position(model: ReverseDistillation, tensors: dict[str, torch.Tensor],
                   meta: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Attach the position statistics a checkpoint carries (rd.position); returns the other
    tensors."""
    if not meta.get("position_stats"):
        return tensors  # stray position.* tensors are then refused by load_student
    position = {k[len("position."):]: v for k, v in tensors.items()
                if k.startswith("position.")}
    try:
        statistics = PositionStatistics.from_tensors(position)
        statistics.load_state_dict(position, strict=True)
    except (KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its position statistics are missing or damaged: "
                              f"{first}") from None
    statistics.score_weight = _score_weight(meta["position_stats"], path)
    model.position = statistics.to(next(model.parameters()).device)
    return {k: v for k, v in tensors.items() if not k.startswith("position.")}


def _load_aligned(model: ReverseDistillation, tensors: dict[str, torch.Tensor],
                  meta: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Attach the aligned statistics a checkpoint carries (rd.alignment); returns the other
    tensors."""
    if not meta.get("aligned_stats"):
        return tensors  # stray aligned.* tensors are then refused by load_student
    aligned = {k[len("aligned."):]: v for k, v in tensors.items() if k.startswith("aligned.")}
    try:
        statistics = AlignedStatistics(int(aligned["template"].shape[-1]))
        statistics.load_state_dict(aligned, strict=True)
    except (KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its aligned statistics are missing or damaged: "
                              f"{first}") from None
    model.aligned = statistics.to(next(model.parameters()).device)
    return {k: v for k, v in tensors.items() if not k.startswith("aligned.")}


def _turn_average(meta: Mapping[str, Any], path: Path) -> bool:
    """Whether the checkpoint averages RD's maps over quarter turns (--turn-average)."""
    info = meta.get("turn_average")
    if info is None:
        return False
    if not isinstance(info, Mapping) or info.get("mode") not in ("on", "auto"):
        raise CheckpointError(f"{path}: bad metadata: turn_average must be an object with mode "
                              f"on or auto, got {info!r:.60}")
    return True


def _score_weight(info: Any, path: Path) -> float | None:
    """``score_weight`` of a checkpoint trained with --position-score (rd.position), else None
    (the image score is RD's own, as before that option)."""
    if not isinstance(info, Mapping) or not info.get("score"):
        return None
    weight = info.get("score_weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
            math.isfinite(weight) and weight > 0):
        raise CheckpointError(f"{path}: its position statistics count in the image score but "
                              f"their score_weight is {weight!r}, not a positive number; fit "
                              "them again (python -m rd add-position-stats)")
    return float(weight)


def load_student(model: ReverseDistillation, tensors: Mapping[str, torch.Tensor],
                 source: str) -> None:
    """Load bottleneck + decoder tensors, saying exactly which keys or shapes disagree."""
    expected = model.student_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {len(missing)} tensors (e.g. {missing[:2]})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {unexpected[:2]})" if unexpected else "",
            f"shape mismatch: {wrong[:2]}" if wrong else "",
        ]))
        raise CheckpointError(f"{source} does not fit the {model.backbone} student: {details}")
    model.load_state_dict({**tensors, **_fitted_state(model)}, strict=True)


def _fitted_state(model: ReverseDistillation) -> dict[str, torch.Tensor]:
    """What the model holds besides the student: the teacher, position and aligned
    statistics."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(FITTED_PREFIXES)}


# ------------------------------------------------------------------- reference checkpoints

_REFERENCE_BOTTLENECK = {"conv1.": "fuse1.0.0.", "bn1.": "fuse1.0.1.", "conv2.": "fuse1.1.0.",
                         "bn2.": "fuse1.1.1.", "conv3.": "fuse2.0.", "bn3.": "fuse2.1.",
                         "bn_layer.": "embed."}
_REFERENCE_DECODER = {"layer1.": "stage16.", "layer2.": "stage8.", "layer3.": "stage4."}
_REFERENCE_UNUSED = ("conv4.", "bn4.")


def reference_to_student(reference: Mapping[str, Mapping[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """Rename the reference code's ``{'bn': ..., 'decoder': ...}`` keys to ours."""
    tensors = {}
    for key, value in reference["bn"].items():
        if key.startswith(_REFERENCE_UNUSED):
            continue  # defined by the reference but never used in its forward pass
        prefix = next((p for p in _REFERENCE_BOTTLENECK if key.startswith(p)), None)
        new = _REFERENCE_BOTTLENECK[prefix] + key[len(prefix):] if prefix else key
        tensors["bottleneck." + new] = value
    for key, value in reference["decoder"].items():
        prefix = next((p for p in _REFERENCE_DECODER if key.startswith(p)), None)
        new = _REFERENCE_DECODER[prefix] + key[len(prefix):] if prefix else key
        tensors["decoder." + new.replace(".upsample.", ".shortcut.")] = value
    return tensors


def import_reference(reference_path: str | Path, backbone: str, out: str | Path,
                     image_size: int = 256, teacher_weights: str | Path | None = None,
                     category: str | None = None) -> dict[str, Any]:
    """Convert a checkpoint saved by the reference training script into ours."""
    reference_path = _existing(reference_path)
    try:
        reference = torch.load(reference_path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusal, zip errors, truncation
        raise CheckpointError(f"cannot read {reference_path} as a reference checkpoint "
                              f"(read with weights_only=True): "
                              f"{torch_load_problem(error)}") from None
    if not (isinstance(reference, dict) and {"bn", "decoder"} <= set(reference)):
        raise CheckpointError(f"{reference_path} is not a reference checkpoint: expected a "
                              "dict with 'bn' and 'decoder' state dicts")
    spec = get_backbone(backbone)
    model = build_model(backbone, pretrained=True, teacher_weights=teacher_weights)
    load_student(model, reference_to_student(reference), str(reference_path))
    metadata = {
        "preprocess": Preprocess(image_size, spec.mean, spec.std).to_dict(),
        "fusion": "sum",
        "category": category,
        "provenance": {"imported_from": reference_path.name, "source": "reference code"},
    }
    save_checkpoint(model, out, metadata)
    return read_metadata(out)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _unreadable(path: Path, error: Exception) -> str:
    return (f"{path} is not a readable safetensors checkpoint (corrupt, truncated, or another "
            f"format such as a pickle): {error}")


def update_metadata(path: str | Path, updates: Mapping[str, Any]) -> None:
    """Merge ``updates`` into a checkpoint's metadata (rewritten atomically)."""
    path = _existing(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(_unreadable(path, error)) from None
    merged = CheckpointMetadata.from_dict({**meta.to_dict(), **updates}, str(path))
    header = {METADATA_KEY: json.dumps(merged.to_dict(), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
