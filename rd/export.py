"""The whole inference graph of a checkpoint as one ONNX file.

One file holds teacher, student, per-layer ``1 - cos`` maps, fusion, the Gaussian blur and the
score, so a deployment needs no Python and no SciPy: feed it preprocessed images, read the same
maps and scores ``Detector.predict`` gives. The batch axis is dynamic.

Graph inputs and outputs (S = the checkpoint's image size)::

    images      float32 (N, 3, S, S)  resized to S×S, scaled to [0, 1], normalised (mean, std)
    layer_maps  float32 (N, 3, S, S)  unsmoothed 1 - cos per teacher layer
    fused       float32 (N, S, S)     fused, Gaussian-smoothed anomaly map (plus the position
                                      statistics' map when trained with them: rd.position;
                                      averaged over quarter turns with --turn-average)
    scores      float32 (N,)          image scores (max of RD's own smoothed map; with
                                      --position-score the position statistics' if larger)

The preprocessing (size, mean, std), backbone, fusion and stored thresholds travel in the ONNX
file's metadata (``rd.*`` keys), so a consumer can preprocess and threshold without the
checkpoint. Export uses torch's ``torch.export``-based exporter (needs ``onnx`` and
``onnxscript``); ``verify_onnx`` checks a file against torch with onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rd.detector import Detector
from rd.errors import RDError
from rd.files import atomic_write

FORMATS = ("onnx",)
DEFAULT_OPSET = 18  # the torch.export-based exporter's own opset: no version conversion
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["layer_maps", "fused", "scores"]
TOLERANCE = 1e-4  # onnxruntime against torch, max absolute difference of every output


class ExportError(RDError, ValueError):
    """The graph cannot be exported or does not match torch."""


class InferenceGraph(nn.Module):
    """``ReverseDistillation.predict`` as a module returning plain tensors (what exporters take)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.model = detector.model
        self.fusion = detector.fusion

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prediction = self.model.predict(images, self.fusion)
        return prediction.layer_maps, prediction.fused, prediction.scores


def onnx_metadata(detector: Detector) -> dict[str, str]:
    """What a consumer of the file needs besides the graph, as ONNX metadata strings."""
    return {
        "rd.backbone": detector.backbone,
        "rd.preprocess": json.dumps(detector.preprocess.to_dict()),
        "rd.fusion": detector.fusion,
        "rd.thresholds": json.dumps(detector.metadata.thresholds),
        "rd.category": detector.metadata.category or "",
        # how images were fitted to the input (squash, letterbox or tile; rd.geometry): the graph
        # takes one S×S input per image or tile, stitching and unpadding are the consumer's
        "rd.geometry": json.dumps(detector.geometry.to_dict()),
        "rd.position_stats": json.dumps(detector.model.position is not None),
        "rd.position_score": json.dumps(detector.model.position is not None
                                        and detector.model.position.score_weight is not None),
        # the graph turns each image itself (--turn-average): four passes an image inside it
        "rd.turn_average": json.dumps(detector.model.turn_average),
    }


def export_onnx(detector: Detector, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``detector``'s whole inference graph to ``out`` (one self-contained .onnx file)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail with advice, not deep inside)
    except ImportError:
        raise ExportError("ONNX export needs the packages onnx and onnxscript: "
                          "pip install -r requirements.txt") from None
    if detector.amp is not None:
        raise ExportError("export a float32 graph: load the checkpoint without --amp")
    if detector.model.position is not None and not detector.geometry.is_paper:
        raise ExportError(f"this checkpoint's position statistics model the whole image, but "
                          f"its graph takes {detector.geometry.mode} inputs one by one: export "
                          "works for --position-stats with --resize squash; predict with "
                          "--runtime torch")
    if detector.model.aligned is not None:
        raise ExportError("this checkpoint's aligned statistics register each image by turning "
                          "it and phase correlation, which the ONNX graph does not carry: "
                          "predict with --runtime torch")
    graph = InferenceGraph(detector).eval()
    size = detector.image_size
    example = torch.zeros(2, 3, size, size, device=detector.device)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=opset, input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES, dynamic_shapes=({0: batch},), verbose=False)
    except Exception as error:  # the exporter raises many types; say which step failed
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ExportError(f"ONNX export failed: {first}") from error
    program.model.metadata_props.update(onnx_metadata(detector))
    out = Path(out)
    atomic_write(out, lambda tmp: program.save(tmp, external_data=False))
    return out


def verify_onnx(path: str | Path, detector: Detector, batch: torch.Tensor) -> dict[str, float]:
    """Max absolute difference of every output between onnxruntime (CPU) and torch on ``batch``."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("verifying needs onnxruntime: pip install -r requirements-dev.txt"
                          ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: batch.cpu().numpy()})
    reference = detector.predict_tensor(batch)
    expected = (reference.layer_maps, reference.fused, reference.scores)
    return {name: float(np.abs(got - want.cpu().numpy()).max())
            for name, got, want in zip(OUTPUT_NAMES, ours, expected, strict=True)}
