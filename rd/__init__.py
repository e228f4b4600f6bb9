"""Reverse Distillation (RD4AD) anomaly detection: model, training, evaluation, inference."""

import os

# OpenMP threads that spin while waiting make torch 10-20x slower as soon as another process
# (a training job beside the app, a second test worker) shares the CPU; sleeping threads cost
# little when the CPU is free. Only effective before torch is first imported; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rd.version import __version__

# Public names resolved on first use (PEP 562), so that ``import rd.results`` or
# ``import rd.data.sources`` (the studio's first page) does not import torch and torchvision.
_LAZY = {
    "DEFAULT_BACKBONE": "rd.backbones",
    "list_backbones": "rd.backbones",
    "Detection": "rd.detector",
    "Detector": "rd.detector",
    "ImageDetection": "rd.decision",
    "load": "rd.detector",
    "ReverseDistillation": "rd.model",
    "build_model": "rd.model",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'rd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "DEFAULT_BACKBONE",
    "Detection",
    "Detector",
    "ImageDetection",
    "ReverseDistillation",
    "__version__",
    "build_model",
    "list_backbones",
    "load",
]
