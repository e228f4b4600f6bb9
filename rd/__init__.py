"""Reverse Distillation (RD4AD) anomaly detection: model, training, evaluation, inference."""

__version__ = "0.1.0"

from rd.backbones import DEFAULT_BACKBONE, list_backbones
from rd.detector import Detection, Detector, load
from rd.model import ReverseDistillation, build_model

__all__ = [
    "DEFAULT_BACKBONE",
    "Detection",
    "Detector",
    "ReverseDistillation",
    "build_model",
    "list_backbones",
    "load",
]
