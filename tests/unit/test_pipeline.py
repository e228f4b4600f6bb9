"""The library pipeline: train → evaluate → record in the checkpoint → report; registration."""

from __future__ import annotations

import json

import pytest

from rd.checkpoints import CheckpointMetadata, read_metadata
from rd.data import MVTecCategory, PlainFolders
from rd.errors import RDError
from rd.evaluation import EvaluationReport
from rd.manifest import read_manifest
from rd.pipeline import (
    RegistrationError,
    TrainOutcome,
    register_model,
    report_path,
    train_and_evaluate,
)
from rd.training import TrainConfig, TrainResult

CONFIG = TrainConfig(image_size=64, epochs=1, batch_size=4, device="cpu", cache_teacher="on")


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "model.safetensors"
    data = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    return train_and_evaluate(data, CONFIG, out, metadata={"command": "test"})


def test_train_and_evaluate_records_metrics_thresholds_and_the_report(trained):
    assert trained.result.epochs_trained == 1 and trained.not_evaluated is None
    meta = read_metadata(trained.checkpoint)
    assert isinstance(meta, CheckpointMetadata)
    assert meta.category == "widget" and meta.command == "test" and meta.image_size == 64
    assert set(meta.thresholds) == {"f1", "fpr_0.01", "fpr_0.05", "fpr_0.1"}
    assert meta.threshold("f1") == trained.report.threshold("f1")
    assert meta.metric("image_auroc") == trained.report.image_auroc
    assert meta.normal_score("p99") == trained.report.normal_scores["p99"]
    assert trained.report_path == report_path(trained.checkpoint)
    written = json.loads(trained.report_path.read_text())
    assert written == trained.report.to_dict() and written["n_images"] == 10
    assert EvaluationReport.read(trained.report_path) == trained.report
    (line,) = trained.summary()
    assert line.startswith("trained 1 epochs in ") and line.endswith(
        f"checkpoint {trained.checkpoint}")


def test_an_existing_checkpoint_is_kept_unless_asked(trained, tiny_mvtec):
    data = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    before = trained.checkpoint.read_bytes()
    with pytest.raises(RDError, match="--overwrite"):
        train_and_evaluate(data, CONFIG, trained.checkpoint)
    assert trained.checkpoint.read_bytes() == before


def test_a_data_source_without_a_test_set_trains_and_says_why_not_evaluated(tiny_mvtec, tmp_path):
    normal = tiny_mvtec.root / tiny_mvtec.category / "train" / "good"
    outcome = train_and_evaluate(PlainFolders(normal), CONFIG, tmp_path / "m.safetensors",
                                 evaluate_after=True)
    assert outcome.report is None and "no test folder" in outcome.not_evaluated
    assert read_metadata(outcome.checkpoint).threshold("f1") is None
    assert not report_path(outcome.checkpoint).exists()
    assert outcome.summary()[-1] == f"not evaluated: {outcome.not_evaluated}"


def test_the_summary_is_what_the_command_line_and_a_job_print(tmp_path):
    """One text for ``rd train`` and a job's log: trained, resumed stage, skipped, why no report."""
    result = TrainResult(model=None, epochs_trained=3, losses=[0.5, 0.25], seconds=12.34)
    out = tmp_path / "m.safetensors"
    outcome = TrainOutcome(out, result, not_evaluated="no test folder",
                           skipped=["test/bad/000.png"], resumed_at="evaluation")
    assert outcome.summary() == [
        f"trained 3 epochs in 12.3 s; final loss 0.2500; checkpoint {out}",
        "training had finished (3 epochs): resumed at the evaluation",
        "skipped 1 test image(s) that cannot be read, e.g. test/bad/000.png",
        "not evaluated: no test folder"]
    assert TrainOutcome(out, TrainResult(model=None, epochs_trained=0)).summary() == [
        f"trained 0 epochs in 0.0 s; final loss nan; checkpoint {out}"]


def test_register_model_copies_into_the_manifest_folder(trained, tmp_path):
    manifest = tmp_path / "models" / "manifest.json"
    entry = register_model(trained.checkpoint, "tiny", manifest=manifest)
    assert (entry.dataset, entry.category, entry.backbone) == ("tiny", "widget",
                                                              "efficientnet_lite0")
    assert entry.path.is_relative_to(manifest.parent)
    assert entry.path.read_bytes() == trained.checkpoint.read_bytes()
    assert entry.report["image_auroc"] == trained.report.image_auroc
    assert [e.path for e in read_manifest(manifest)] == [entry.path]


def test_registration_needs_a_category(tiny_mvtec, tmp_path):
    normal = tiny_mvtec.root / tiny_mvtec.category / "train" / "good"
    outcome = train_and_evaluate(PlainFolders(normal), CONFIG, tmp_path / "m.safetensors",
                                 evaluate_after=False)
    with pytest.raises(RegistrationError, match="pass --category") as refused:
        register_model(outcome.checkpoint, "tiny", manifest=tmp_path / "models" / "m.json")
    assert isinstance(refused.value, RDError)
    assert not (tmp_path / "models").exists()
