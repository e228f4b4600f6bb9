"""Typed records: checkpoint metadata, evaluation reports and per-image detections. Files written
before the records existed (the committed built-in students and their reports) still load, and
a field of the wrong type is one clear error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rd.checkpoints import CheckpointError, CheckpointMetadata, read_metadata
from rd.cli import main
from rd.detector import Detection, ImageDetection
from rd.evaluation import EvaluationError, EvaluationReport
from rd.manifest import PROJECT_MANIFEST, read_manifest

BUILTIN = sorted((PROJECT_MANIFEST.parent / "builtin").glob("*.safetensors"))
GOOD = {"format": "rd4ad-student", "format_version": 1, "backbone": "efficientnet_lite0",
        "teacher_weights": "w", "preprocess": {"size": 64, "mean": [0.5] * 3, "std": [0.2] * 3},
        "metrics": {"image_auroc": 0.9, "thresholds": {"f1": 0.5}},
        "normal_scores": {"p99": 0.4, "n": 3}, "recipe": {"epochs": 1}}


def _stored(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["rd"])


def _forged(tmp_path: Path, header: str) -> Path:
    path = tmp_path / "forged.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"rd": header})
    return path


def test_the_committed_students_load_into_the_metadata_record():
    assert len(BUILTIN) == 3
    for path in BUILTIN:
        meta = read_metadata(path)
        assert isinstance(meta, CheckpointMetadata)
        assert meta.to_dict() == _stored(path) and dict(meta) == _stored(path)
        assert meta.backbone == "efficientnet_lite0" and meta.image_size == 256
        assert meta.threshold("f1") == _stored(path)["metrics"]["thresholds"]["f1"]
        assert meta.threshold("nope") is None
        assert meta.normal_score("p99") == _stored(path)["normal_scores"]["p99"]
        assert meta.metric("image_auroc") == _stored(path)["metrics"]["image_auroc"]
        assert meta.get("recipe") == _stored(path)["recipe"]  # keys it does not type: kept


def test_the_committed_reports_load_and_are_written_back_unchanged(tmp_path):
    entries = {entry.path.resolve(): entry for entry in read_manifest(PROJECT_MANIFEST)}
    for checkpoint in BUILTIN:
        path = checkpoint.with_name(checkpoint.name.replace(".safetensors", ".report.json"))
        report = EvaluationReport.read(path)
        assert report.image_auroc == entries[checkpoint.resolve()].report["image_auroc"]
        assert report.threshold("f1") == read_metadata(checkpoint).threshold("f1")
        assert report["per_defect"] == json.loads(path.read_text())["per_defect"]
        report.write(tmp_path / "again.json")
        assert (tmp_path / "again.json").read_text() == path.read_text()


def test_an_older_report_without_the_later_fields_loads():
    old = {"backbone": "wide_resnet50_2", "image_size": 256, "n_images": 4, "n_normal": 2,
           "n_defective": 2, "image_auroc": 0.75, "pixel_auroc": None, "au_pro": None,
           "thresholds": {"f1": {"threshold": 0.3, "f1": 0.8}}}
    report = EvaluationReport.from_dict(old)
    assert report.normal_scores is None and report.per_defect == {} and report.images == []
    assert report.threshold("f1") == 0.3 and report.threshold("fpr_0.01") is None
    assert report.to_dict() == old and list(report.to_dict()) == list(old)
    assert report.summary()["thresholds"] == {"f1": 0.3}


@pytest.mark.parametrize(("change", "field"), [
    ({"n_images": "4"}, "n_images"),
    ({"image_auroc": "0.9"}, "image_auroc"),
    ({"thresholds": [0.3]}, "thresholds"),
    ({"images": {}}, "images"),
])
def test_a_report_field_of_the_wrong_type_is_named(change, field):
    base = {"n_images": 4, "n_normal": 2, "n_defective": 2, "image_auroc": 0.75}
    with pytest.raises(EvaluationError, match=f"{field} must be"):
        EvaluationReport.from_dict({**base, **change})


@pytest.mark.parametrize(("change", "field"), [
    ({"preprocess": {"size": [1, 2, 3], "mean": [0.5] * 3, "std": [0.2] * 3}},
     "preprocess.size"),
    ({"preprocess": {"size": 1e9, "mean": [0.5] * 3, "std": [0.2] * 3}}, "preprocess.size"),
    ({"preprocess": {"size": 10**9, "mean": [0.5] * 3, "std": [0.2] * 3}}, "preprocess.size"),
    ({"preprocess": {"size": 100, "mean": [0.5] * 3, "std": [0.2] * 3}}, "preprocess.size"),
    ({"preprocess": {"size": 64, "mean": [0.5, "x", 0.5], "std": [0.2] * 3}},
     "preprocess.mean"),
    ({"preprocess": "64"}, "preprocess"),
    ({"metrics": [0.9, 0.8]}, "metrics"),
    ({"metrics": {"thresholds": {"f1": "0.5"}}}, "metrics.thresholds.f1"),
    ({"metrics": {"thresholds": [0.5]}}, "metrics.thresholds"),
    ({"metrics": {"image_auroc": {"deep": {"er": 1}}}}, "metrics.image_auroc"),
    ({"normal_scores": {"p99": "high"}}, "normal_scores.p99"),
    ({"normal_scores": {"p99": float("nan")}}, "normal_scores.p99"),
    ({"category": ["widget"]}, "category"),
    ({"backbone": 3}, "backbone"),
])
def test_metadata_of_the_wrong_type_is_one_error_naming_the_field(tmp_path, capsys, change,
                                                                   field):
    with pytest.raises(CheckpointError, match=f"{field} must be"):
        CheckpointMetadata.from_dict({**GOOD, **change})
    path = _forged(tmp_path, json.dumps({**GOOD, **change}))
    with pytest.raises(CheckpointError, match=f"{field} must be"):
        read_metadata(path)
    assert main(["info", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and field in error and error.count("\n") == 1


def test_deeply_nested_metadata_is_refused_in_one_line(tmp_path, capsys):
    path = _forged(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_metadata(path)
    nested: dict = {}
    for _ in range(50):
        nested = {"x": nested}
    path = _forged(tmp_path, json.dumps({**GOOD, "metrics": nested}))
    assert main(["info", str(path)]) == 2
    assert "metrics.x must be" in capsys.readouterr().err


def test_metadata_round_trips_and_keeps_unknown_keys():
    meta = CheckpointMetadata.from_dict(GOOD)
    assert meta.to_dict() == GOOD and CheckpointMetadata.from_dict(meta) is meta
    assert meta.thresholds == {"f1": 0.5} and meta.extra == {
        "format": "rd4ad-student", "format_version": 1, "recipe": {"epochs": 1}}
    bare = CheckpointMetadata.from_dict({"preprocess": GOOD["preprocess"]})
    assert bare.threshold() is None and bare.normal_score("p99") is None
    assert bare.fusion == "sum" and "metrics" not in bare


def test_a_detection_is_indexed_per_image():
    detection = Detection(np.zeros((2, 3, 8, 8)), np.ones((2, 8, 8)), np.array([0.2, 0.7]))
    first, second = detection[0], detection[1]
    assert len(detection) == 2 and isinstance(first, ImageDetection)
    assert first.fused.shape == (8, 8) and first.layer_maps.shape == (3, 8, 8)
    assert (first.verdict(0.5), second.verdict(0.5), second.is_defective(0.7)) == (
        "normal", "defective", True)
