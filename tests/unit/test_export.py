"""ONNX export: the whole inference graph, run by onnxruntime, matches torch within 1e-4."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from rd.checkpoints import save_checkpoint
from rd.cli import main
from rd.data import HALF, Preprocess
from rd.detector import load
from rd.export import OUTPUT_NAMES, TOLERANCE, verify_onnx
from rd.model import build_model

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny 64 px efficientnet_lite0 checkpoint (ImageNet teacher, seeded student) and its
    ONNX file, written by the command line (which also verifies it)."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    checkpoint = folder / "tiny.safetensors"
    save_checkpoint(build_model("efficientnet_lite0"), checkpoint,
                    {"preprocess": Preprocess(SIZE, HALF, HALF).to_dict(), "fusion": "sum",
                     "category": "tiny", "metrics": {"thresholds": {"f1": 1.5}}})
    out = folder / "tiny.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx",
                 "--out", str(out), "--verify"]) == 0
    return checkpoint, out


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnxruntime_matches_torch_at_any_batch(exported, batch_size):
    checkpoint, out = exported
    detector = load(checkpoint, "cpu")
    batch = torch.randn(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    differences = verify_onnx(out, detector, batch)
    assert set(differences) == set(OUTPUT_NAMES)
    assert max(differences.values()) <= TOLERANCE, differences


def test_graph_has_a_dynamic_batch_and_the_preprocessing(exported):
    _, out = exported
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert [o.name for o in model.graph.output] == OUTPUT_NAMES
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["rd.preprocess"]) == Preprocess(SIZE, HALF, HALF).to_dict()
    assert meta["rd.backbone"] == "efficientnet_lite0"
    assert json.loads(meta["rd.thresholds"]) == {"f1": 1.5}


def test_unknown_format_is_refused(exported, capsys):
    checkpoint, out = exported
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(checkpoint), "--format", "tflite",
              "--out", str(out)])
    assert "invalid choice" in capsys.readouterr().err
