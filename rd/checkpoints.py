"""Checkpoints: the student as safetensors, its configuration and provenance as metadata.

A checkpoint never holds the teacher (it is rebuilt from its own ImageNet weights, whose
identity is recorded) and never needs unpickling. Files are written to a temporary name and
renamed, so an interrupted write never replaces a good checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rd import __version__
from rd.backbones import RANDOM_TEACHER, get_backbone, torch_load_problem
from rd.data.transforms import Preprocess
from rd.model import ReverseDistillation, build_model

FORMAT = "rd4ad-student"
FORMAT_VERSION = 1
METADATA_KEY = "rd"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match what it is used with."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename over ``path``: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp makes the file private (0600); keep the mode a plain write would give
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(model: ReverseDistillation, path: str | Path, metadata: Mapping[str, Any]
                    ) -> None:
    """Write the student weights and ``metadata`` (JSON-serialisable) to ``path``."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone,
        "teacher_weights": model.teacher.weights_id,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"rd": __version__, "torch": torch.__version__},
        **metadata,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.student_state_dict().items()}
    header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint, checked to be ours."""
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
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('format_version')!r}")
    return meta


def load_checkpoint(path: str | Path, teacher_weights: str | Path | None = None,
                    expect: Mapping[str, Any] | None = None
                    ) -> tuple[ReverseDistillation, dict[str, Any]]:
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
    load_student(model, tensors, str(path))
    return model, meta


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
    model.load_state_dict({**tensors, **_teacher_state(model)}, strict=True)


def _teacher_state(model: ReverseDistillation) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("teacher.")}


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
    header = {METADATA_KEY: json.dumps({**meta, **updates}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
