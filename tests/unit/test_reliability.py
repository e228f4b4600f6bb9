"""Issue 13 (reliability round 2): cases that live across modules; each failed on the old code."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rd.backbones import WeightsError, build_teacher
from rd.data import DataError
from rd.data.novelty import archive_cache, open_dataset
from rd.model import resolve_device


def _class_archive(path: Path, classes: list[str], value: int) -> Path:
    """A .tar.gz of train/<class>/0.png and test/<class>/0.png, every pixel ``value``."""
    source = path.parent / f"src-{value}"
    for split in ("train", "test"):
        for name in classes:
            folder = source / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(folder / "0.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=".")
    return path


def test_a_different_archive_of_the_same_name_is_unpacked_again(tmp_path, monkeypatch):
    """Item 12: the cache was keyed by the archive's name and served the old extraction."""
    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    first = _class_archive(tmp_path / "a" / "set.tar.gz", ["x", "y"], 10)
    second = _class_archive(tmp_path / "b" / "set.tar.gz", ["p", "q", "r"], 200)
    assert open_dataset("folders", first).classes == ("x", "y")
    data = open_dataset("folders", second)
    assert data.classes == ("p", "q", "r") and int(data.train.images.max()) == 200
    assert archive_cache(first) != archive_cache(second)
    assert archive_cache(first).parent == tmp_path / "home" / "novelty"


def test_a_class_archive_unpacking_past_its_cap_is_refused(tmp_path, monkeypatch):
    """Item 12: a small .tar.gz of zeros unpacked without any limit."""
    import io

    import rd.download

    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(rd.download, "MIN_UNPACK_CAP", 1 << 20)
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("train/a/zeros.png")
        member.size = 50 << 20
        tar.addfile(member, io.BytesIO(bytes(member.size)))
    assert archive.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"unpacks to more than .* MB.*nothing was installed"):
        open_dataset("folders", archive)
    assert not any((tmp_path / "home" / "novelty").rglob("zeros.png"))


def test_corrupt_safetensors_teacher_weights_are_a_weights_error(tmp_path):
    """Item 9: --teacher-weights corrupt.safetensors raised safetensors' own error."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match=r"corrupt\.safetensors: not a valid safetensors"):
        build_teacher("efficientnet_lite0", weights_path=corrupt)


@pytest.mark.parametrize("device", ["banana", "mps", "meta", "cuda:x", "cpu:0:1"])
def test_unsupported_devices_are_named_with_the_choices(device):
    """Item 9: --device banana raised torch's RuntimeError; mps and meta ran and broke later."""
    with pytest.raises(ValueError, match=r"--device auto, cpu, cuda or cuda:N|no GPU"):
        resolve_device(device)


def test_non_finite_maps_are_an_error_not_a_score():
    """Item 5: a model with NaN weights printed "nan normal" and exited 0."""
    from rd.data import Preprocess
    from rd.detector import DetectionError, Detector
    from rd.model import build_model

    model = build_model("efficientnet_lite0")
    with torch.no_grad():
        next(model.decoder.parameters()).fill_(float("nan"))
    detector = Detector(model, {"preprocess": Preprocess(64).to_dict()}, "cpu")
    with pytest.raises(DetectionError, match="NaN or infinite"):
        detector.predict(np.zeros((64, 64, 3), np.uint8))
