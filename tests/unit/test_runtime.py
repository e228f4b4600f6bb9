"""Runtimes: the exported graph in ONNX Runtime, cached beside the checkpoint, equals torch."""

from __future__ import annotations

import pytest
import torch

from rd import runtime
from rd.detector import load
from tests.conftest import save_seeded_checkpoint

SIZE = 64
pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def default_runtime(monkeypatch):
    """The users' default (auto), not the test suite's torch (tests/conftest.py)."""
    monkeypatch.delenv("RD_RUNTIME", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 64 px efficientnet_lite0 checkpoint (ImageNet teacher, seeded student)."""
    return save_seeded_checkpoint(tmp_path_factory.mktemp("runtime") / "tiny.safetensors",
                                  SIZE, threshold=1.5)


def _count_exports(monkeypatch, good) -> list[int]:
    """Count exports; each "exports" by copying ``good`` (a real export of the same model), so
    the cache logic is tested without tens of seconds per export."""
    import shutil

    from rd import export

    calls: list[int] = []

    def copy(detector, out, *args, **kwargs):
        calls.append(1)
        shutil.copyfile(good, out)
        return out

    monkeypatch.setattr(export, "export_onnx", copy)
    return calls


def test_onnxruntime_maps_equal_torch_within_1e5(checkpoint):
    torch_detector = load(checkpoint, "cpu")
    onnx_detector, choice = runtime.load_runtime(checkpoint, "cpu")
    assert choice.name == "onnxruntime" and isinstance(onnx_detector, runtime.OnnxDetector)
    for n in (1, 5):  # one chunk, and several chunks of CPU_CHUNK
        batch = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))
        want, got = torch_detector.predict_tensor(batch), onnx_detector.predict_tensor(batch)
        for name in ("layer_maps", "fused", "scores"):
            difference = (getattr(got, name) - getattr(want, name)).abs().max().item()
            assert difference <= 1e-5, (name, n, difference)


def test_chunks_side_by_side_equal_one_after_another(checkpoint, monkeypatch):
    """A batch of several chunks runs them in parallel single-threaded runs: bit-identical to
    running them one after another in the multi-threaded session."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    detector, _ = runtime.load_runtime(checkpoint, "cpu")
    assert detector.threads == 2
    batch = torch.randn(9, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    side_by_side = detector.predict_tensor(batch)
    assert detector._single_thread_session is not None  # the parallel path ran
    detector.threads = 1  # one chunk after another in the 2-thread session
    sequential = detector.predict_tensor(batch)
    for name in ("layer_maps", "fused", "scores"):
        assert torch.equal(getattr(side_by_side, name), getattr(sequential, name)), name


def test_export_is_cached_by_checkpoint_hash(checkpoint, monkeypatch):
    first, _ = runtime.load_runtime(checkpoint, "cpu")  # the cache exists after this
    calls = _count_exports(monkeypatch, first.onnx_path)
    detector, _ = runtime.load_runtime(checkpoint, "cpu")
    assert calls == []
    key = runtime.cache_key(checkpoint, detector)
    assert detector.onnx_path == runtime.cache_path(checkpoint, key)
    assert detector.onnx_path.parent == checkpoint.parent and key[:16] in detector.onnx_path.name
    assert key.startswith(runtime.cache_key(checkpoint, detector)[:16])


def test_corrupt_or_stale_cache_is_rebuilt(checkpoint, monkeypatch):
    detector, _ = runtime.load_runtime(checkpoint, "cpu")
    path = detector.onnx_path
    good = path.with_name("good.onnx")
    good.write_bytes(path.read_bytes())
    calls = _count_exports(monkeypatch, good)
    path.write_bytes(path.read_bytes()[:1000])  # torn file
    rebuilt, choice = runtime.load_runtime(checkpoint, "cpu")
    assert choice.name == "onnxruntime" and len(calls) == 1 and rebuilt.onnx_path == path

    import onnx

    model = onnx.load(str(path))  # a file whose stored key is another checkpoint's
    for entry in model.metadata_props:
        if entry.key == runtime.CACHE_KEY:
            entry.value = "0" * 64
    onnx.save(model, str(path))
    runtime.load_runtime(checkpoint, "cpu")
    assert len(calls) == 2
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")]
    good.unlink()


def test_another_checkpoint_gets_another_cache(checkpoint, tmp_path):
    other = save_seeded_checkpoint(tmp_path / "other.safetensors", SIZE, seed=1)
    a = runtime.cache_key(checkpoint, load(checkpoint, "cpu"))
    b = runtime.cache_key(other, load(other, "cpu"))
    assert a != b


def test_auto_falls_back_to_torch_and_says_why(checkpoint, monkeypatch):
    detector, choice = runtime.load_runtime(checkpoint, "cpu", channels_last=True)
    assert choice.name == "torch" and "torch options" in choice.reason
    assert not isinstance(detector, runtime.OnnxDetector)
    detector, choice = runtime.load_runtime(checkpoint, "cpu", runtime="torch")
    assert choice.name == "torch" and not isinstance(detector, runtime.OnnxDetector)
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
    _, choice = runtime.load_runtime(checkpoint, "cpu")
    assert choice.name == "torch" and "not installed" in choice.reason
    with pytest.raises(runtime.RuntimeUnavailable, match="--runtime torch"):
        runtime.load_runtime(checkpoint, "cpu", runtime="onnxruntime")
    with pytest.raises(runtime.RuntimeUnavailable, match="unknown runtime"):
        runtime.load_runtime(checkpoint, "cpu", runtime="tensorrt")


def test_failed_export_falls_back(checkpoint, monkeypatch):
    from rd import export

    def broken(*args, **kwargs):
        raise export.ExportError("ONNX export failed: unsupported operator")

    monkeypatch.setattr(runtime, "cache_path", lambda c, k: c.parent / f"fresh.{k[:8]}.onnx")
    monkeypatch.setattr(export, "export_onnx", broken)
    _, choice = runtime.load_runtime(checkpoint, "cpu")
    assert choice.name == "torch" and "did not export" in choice.reason


def test_cache_built_in_a_background_priority_child_process(tmp_path, monkeypatch):
    """The studio's export: a child process at the idle CPU priority builds the cache, which
    the server then opens without exporting again."""
    import os
    import time

    from tests.conftest import scheduling_policy

    path = save_seeded_checkpoint(tmp_path / "child.safetensors", SIZE, threshold=1.5)
    child = runtime.build_cache_process(path)
    deadline = time.monotonic() + 60
    policy = None
    while policy != os.SCHED_IDLE and child.poll() is None and time.monotonic() < deadline:
        policy = scheduling_policy(child.pid)
        time.sleep(0.05)
    assert child.wait(timeout=300) == 0, child.stderr.read()
    assert policy == os.SCHED_IDLE
    assert list(tmp_path.glob("child.*.onnx"))
    calls = _count_exports(monkeypatch, next(tmp_path.glob("child.*.onnx")))
    _, choice = runtime.load_runtime(path, "cpu")
    assert choice.name == "onnxruntime" and calls == []
