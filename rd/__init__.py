"""Reverse Distillation (RD4AD) anomaly detection: model, training, evaluation, inference."""

import os

# OpenMP threads that spin while waiting make torch 10-20x slower as soon as another process
# (a training job beside the app, a second test worker) shares the CPU; sleeping threads cost
# little when the CPU is free. Only effective before torch is first imported; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rd.lazy import lazy_attributes
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


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

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
