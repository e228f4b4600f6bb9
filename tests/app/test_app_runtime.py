"""The app's model: torch at once, ONNX Runtime swapped in once its export is ready."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest


def test_first_image_does_not_wait_for_the_onnx_export(studio, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from app import state
    from rd.runtime import OnnxDetector

    monkeypatch.setenv("RD_RUNTIME", "auto")  # the suite's default is torch (tests/conftest.py)
    checkpoint = shutil.copy(studio.checkpoint, tmp_path / "model.safetensors")
    mtime = (tmp_path / "model.safetensors").stat().st_mtime
    first = state.load_model(str(checkpoint), mtime, "cpu")
    assert not isinstance(first, OnnxDetector)  # served by torch while the export runs
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    deadline = time.monotonic() + 300
    while not isinstance(now := state.load_model(str(checkpoint), mtime, "cpu"), OnnxDetector):
        assert time.monotonic() < deadline, "the ONNX Runtime model never replaced torch"
        time.sleep(0.5)
    assert list(tmp_path.glob("model.*.onnx"))  # cached beside the checkpoint
    ours, theirs = now.predict([image]), first.predict([image])
    assert np.allclose(ours.fused, theirs.fused, atol=1e-5)
