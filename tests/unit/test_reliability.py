"""Issue 13 (reliability round 2): cases that live across modules; each failed on the old code."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rd.backbones import WeightsError
from rd.data import DataError
from rd.data.novelty import archive_cache, open_dataset
from rd.model import resolve_device
from rd.teacher import build_teacher


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


# ------------------------------------------------- item 1: no output replaces a file unasked

FAST = ["--image-size", "64", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--quiet"]


def _cli(*argv: object) -> tuple[int, str, str]:
    """Run ``python -m rd`` in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from rd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tiny_mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "m.safetensors"
    code, _, err = _cli("train", "--data", tiny_mvtec.root, "--category", tiny_mvtec.category,
                        "--out", out, "--no-evaluate", *FAST)
    assert code == 0, err
    return out


def _snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def test_evaluate_never_writes_its_report_over_the_checkpoint_or_a_file(checkpoint, tiny_mvtec,
                                                                        tmp_path):
    before = _snapshot(checkpoint)
    data = ["--data", tiny_mvtec.root, "--category", tiny_mvtec.category, "--device", "cpu",
            "--quiet"]
    code, _, err = _cli("evaluate", "--checkpoint", checkpoint, "--json", checkpoint, *data)
    assert code == 2 and "is also an input" in err and err.count("\n") == 1
    notes = tmp_path / "notes.json"
    notes.write_text("mine")
    code, _, err = _cli("evaluate", "--checkpoint", checkpoint, "--json", notes, *data)
    assert code == 2 and "exists: pass --overwrite" in err
    assert notes.read_text() == "mine" and _snapshot(checkpoint) == before
    assert _cli("evaluate", "--checkpoint", checkpoint, "--json", notes, "--overwrite",
                *data)[0] == 0
    assert notes.read_text().startswith("{")


def test_predict_never_replaces_inputs_and_keeps_relative_paths(checkpoint, tiny_mvtec,
                                                               tmp_path):
    import shutil

    test = tmp_path / "test"
    shutil.copytree(tiny_mvtec.root / tiny_mvtec.category / "test", test)
    crack, good = test / "scratch" / "000.png", test / "good" / "000.png"
    before = _snapshot(crack, good)
    code, _, err = _cli("predict", "--checkpoint", checkpoint, crack, "--out", crack.parent,
                        "--device", "cpu")
    assert code == 2 and "is also an input" in err and _snapshot(crack, good) == before
    out = tmp_path / "maps"
    code, _, err = _cli("predict", "--checkpoint", checkpoint, crack, good, "--out", out,
                        "--device", "cpu")
    assert code == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == [
        "good/000.npy", "good/000.png", "scratch/000.npy", "scratch/000.png"]
    written = _snapshot(*out.rglob("*.*"))
    code, _, err = _cli("predict", "--checkpoint", checkpoint, crack, good, "--out", out,
                        "--device", "cpu")
    assert code == 2 and "exists: pass --overwrite" in err and _snapshot(*written) == written
    same_stem = crack.with_suffix(".jpg")
    Image.open(crack).convert("RGB").save(same_stem)
    code, _, err = _cli("predict", "--checkpoint", checkpoint, crack, same_stem, "--out",
                        tmp_path / "other", "--device", "cpu")
    assert code == 2 and "would both write" in err and not (tmp_path / "other").exists()


def test_import_reference_and_export_refuse_existing_outputs(checkpoint, tmp_path):
    reference = tmp_path / "reference.pth"
    torch.save({"bn": {}, "decoder": {}}, reference)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = _cli("import-reference", reference, "--backbone", "efficientnet_lite0",
                        "--out", notes)
    assert code == 2 and "notes.txt exists: pass --overwrite" in err
    code, _, err = _cli("export", "--checkpoint", checkpoint, "--out", notes)
    assert code == 2 and "notes.txt exists: pass --overwrite" in err
    code, _, err = _cli("export", "--checkpoint", checkpoint, "--out", checkpoint, "--overwrite")
    assert code == 2 and "is also an input" in err
    assert notes.read_text() == "mine"


def test_import_reference_refuses_a_size_predict_cannot_use(tmp_path):
    """Item 9: --image-size 100 imported fine, then predict failed."""
    code, _, err = _cli("import-reference", tmp_path / "missing.pth", "--backbone",
                        "efficientnet_lite0", "--image-size", "100", "--out", tmp_path / "m")
    assert code == 2 and "--image-size must be a multiple of 32" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("sibling", ["m.report.json", "m.log.jsonl", "m.resume.safetensors"])
def test_train_never_replaces_the_report_log_or_resume_state(tiny_mvtec, tmp_path, sibling):
    (tmp_path / sibling).write_text("mine")
    code, _, err = _cli("train", "--data", tiny_mvtec.root, "--category", tiny_mvtec.category,
                        "--out", tmp_path / "m.safetensors", *FAST)
    assert code == 2 and f"{sibling} exists: pass --overwrite" in err
    assert (tmp_path / sibling).read_text() == "mine"
    assert not (tmp_path / "m.safetensors").exists()


def test_train_refuses_an_output_that_is_its_own_input(checkpoint, tiny_mvtec):
    before = _snapshot(checkpoint)
    code, _, err = _cli("train", "--data", tiny_mvtec.root, "--category", tiny_mvtec.category,
                        "--out", checkpoint, "--init", checkpoint, "--overwrite", *FAST)
    assert code == 2 and "is also an input" in err and _snapshot(checkpoint) == before


@pytest.mark.parametrize("options, message", [
    (["--device", "banana"], "unknown device 'banana'"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--image-size", "5000000"], "--image-size must be at most 4096"),
    (["--lr", "inf"], "--lr must be finite"),
])
def test_train_and_jobs_submit_refuse_bad_settings_in_one_line(tiny_mvtec, tmp_path,
                                                               monkeypatch, options, message):
    """Item 9 and 5 through the command line: one `error:` line, exit 2, nothing written."""
    monkeypatch.setenv("RD_JOBS_ROOT", str(tmp_path / "jobs"))
    data = ["--data", tiny_mvtec.root, "--category", tiny_mvtec.category]
    for command in (["train", *data, "--out", tmp_path / "m.safetensors"],
                    ["jobs", "submit", *data]):
        code, _, err = _cli(*command, *options)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "jobs").exists()


def test_corrupt_teacher_weights_through_the_command_line(tiny_mvtec, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = _cli("train", "--data", tiny_mvtec.root, "--category", tiny_mvtec.category,
                        "--out", tmp_path / "m.safetensors", "--teacher-weights", corrupt,
                        *FAST)
    assert code == 2 and "not a valid safetensors file" in err and err.count("\n") == 1
