"""Reverse Distillation (RD4AD) anomaly detection: model, training, evaluation, inference."""

import os

# OpenMP threads that spin while waiting make torch 10-20x slower as soon as another process
# (a training job beside the app, a second test worker) shares the CPU; sleeping threads cost
# little when the CPU is free. Only effective before torch is first imported; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rd.backbones import DEFAULT_BACKBONE, list_backbones
from rd.detector import Detection, Detector, ImageDetection, load
from rd.model import ReverseDistillation, build_model
from rd.version import __version__

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
