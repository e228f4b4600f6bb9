"""Reverse Distillation (RD4AD) anomaly detection: model, training, evaluation, inference."""

from rd.backbones import DEFAULT_BACKBONE, list_backbones
from rd.model import ReverseDistillation, build_model

__all__ = ["DEFAULT_BACKBONE", "ReverseDistillation", "build_model", "list_backbones"]
