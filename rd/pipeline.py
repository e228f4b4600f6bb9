"""The library pipeline: train → evaluate on the test set → record → (register).

What the ``train`` command, background jobs and the app all do, as functions with typed
arguments: ``train_and_evaluate`` trains a student, evaluates it, stores the headline metrics,
thresholds and normal-score statistics in the checkpoint's metadata and writes the full report
beside it; ``register_model`` lists a checkpoint in a manifest so the app finds it. Nothing here
parses a command line or prints a table: callers do that with what is returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rd.checkpoints import load_checkpoint, read_metadata, update_metadata
from rd.data import DataError, ImageDataset, Sample
from rd.detector import Detector
from rd.errors import RDError
from rd.evaluation import EvaluationError, EvaluationReport, evaluate
from rd.manifest import ModelEntry, register, user_manifest
from rd.outputs import check_outputs
from rd.training import (
    TrainConfig,
    TrainResult,
    current_world,
    log_path,
    output_lock,
    resume_path,
    train,
)


class DataSet(Protocol):
    """What the pipeline needs of a data layout (``MVTecCategory``, ``PlainFolders``)."""

    def train_samples(self) -> list[Sample]: ...

    def test_samples(self) -> list[Sample]: ...


@dataclass
class TrainOutcome:
    """What ``train_and_evaluate`` did: the training result, and the report if there is one."""

    checkpoint: Path
    result: TrainResult
    report: EvaluationReport | None = None
    report_path: Path | None = None
    not_evaluated: str | None = None  # why there is no report (no test set, one class only...)
    skipped: list[str] = field(default_factory=list)  # test images that could not be read
    resumed_at: str | None = None  # the stage a resumed run continued from (issue 13)

    def summary(self) -> list[str]:
        """Lines for people (the command line and the job's log): what was trained, a resumed
        stage, test images left out, why there is no report."""
        loss = self.result.losses[-1] if self.result.losses else float("nan")
        lines = [f"trained {self.result.epochs_trained} epochs in {self.result.seconds:.1f} s; "
                 f"final loss {loss:.4f}; checkpoint {self.checkpoint}"]
        if self.resumed_at == "evaluation":
            lines.append(f"training had finished ({self.result.epochs_trained} epochs): "
                         "resumed at the evaluation")
        elif self.resumed_at == "done":
            lines.append("training and evaluation had finished: nothing left to do")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} test image(s) that cannot be read, "
                         f"e.g. {self.skipped[0]}")
        if self.not_evaluated:
            lines.append(f"not evaluated: {self.not_evaluated}")
        return lines


def report_path(checkpoint: str | Path) -> Path:
    """Where the full evaluation report of a checkpoint is written: ``<name>.report.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".report.json")


def train_and_evaluate(data: DataSet, config: TrainConfig, out: str | Path, *,
                       metadata: Mapping[str, Any] | None = None, resume: bool = False,
                       overwrite: bool = False, evaluate_after: bool = True,
                       progress: bool = False,
                       on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainOutcome:
    """Train on ``data``'s normal images, then evaluate on its test set and record the results.

    ``metadata`` (e.g. the command that ran) is stored in the checkpoint next to the category
    and data source. An existing ``out`` is refused unless ``resume`` or ``overwrite``. A data
    source without a usable test set still trains; ``not_evaluated`` then says why. Under
    torchrun only rank 0 evaluates.
    """
    config.validate()
    out = Path(out)
    # One run at a time per output, from the check to the report (rank 0 holds it under DDP).
    with output_lock(out) if current_world().main else nullcontext():
        # the checkpoint and every file written beside it (issue 13: the log and report were
        # replaced silently); never one of the run's own inputs
        check_outputs([out, log_path(out), report_path(out), resume_path(out)],
                      [config.init, config.teacher_weights], overwrite=resume or overwrite,
                      advice="pass --overwrite to replace it, or --resume to continue that run")
        return _train_and_evaluate(data, config, out, metadata, resume, evaluate_after,
                                   progress, on_epoch)


def _train_and_evaluate(data: DataSet, config: TrainConfig, out: Path,
                        metadata: Mapping[str, Any] | None, resume: bool, evaluate_after: bool,
                        progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None
                        ) -> TrainOutcome:
    stored = {"category": getattr(data, "category", None), "data": repr(data),
              **(metadata or {})}
    # A resumed run continues from the stage that was interrupted: training, or (training
    # done) evaluation, or (both done) nothing but returning the recorded report.
    finished = _finished_training(out, config) if resume else None
    result = finished or train(data.train_samples(), config, out, stored, resume=resume,
                               progress=progress, on_epoch=on_epoch)
    outcome = TrainOutcome(out, result, resumed_at="evaluation" if finished else None)
    if result.rank or not evaluate_after:
        return outcome
    recorded = _recorded_report(out) if finished else None
    if recorded is not None:
        outcome.report, outcome.report_path, outcome.resumed_at = recorded, report_path(out), "done"
        return outcome
    try:
        test = data.test_samples()
        detector = Detector(result.model, read_metadata(out), config.device)
        report, outcome.skipped = _evaluate_readable(detector, test, progress)
    except (DataError, EvaluationError) as error:
        outcome.not_evaluated = str(error)
        return outcome
    record_evaluation(out, report)
    outcome.report, outcome.report_path = report, report_path(out)
    return outcome


def _finished_training(out: Path, config: TrainConfig) -> TrainResult | None:
    """The trained model when ``out`` holds the last epoch of this very recipe, else None."""
    if not out.is_file():
        return None
    meta = read_metadata(out)
    if meta.get("epochs_trained") != config.epochs or meta.get("recipe") != config.recipe():
        return None
    model, _ = load_checkpoint(out, config.teacher_weights)
    losses = []
    for line in log_path(out).read_text().splitlines() if log_path(out).is_file() else []:
        try:
            losses.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return TrainResult(model, config.epochs, losses, rank=current_world().rank)


def _recorded_report(out: Path) -> EvaluationReport | None:
    """The report of an evaluation that finished (metrics stored and report written)."""
    if not (report_path(out).is_file() and read_metadata(out).get("metrics")):
        return None
    try:
        return EvaluationReport.read(report_path(out))
    except EvaluationError:
        return None


def _evaluate_readable(detector: Detector, test: list[Sample], progress: bool
                       ) -> tuple[EvaluationReport, list[str]]:
    """Evaluate; test images (or masks) that cannot be read are left out and reported
    (issue 13: one junk test image failed a run whose model was good)."""
    try:
        return EvaluationReport.from_dict(evaluate(detector, test, progress=progress)), []
    except DataError:
        usable, problems = ImageDataset(test, detector.preprocess).usable()
        if not problems:
            raise
    report = evaluate(detector, usable, progress=progress)
    report["skipped_images"] = problems
    return EvaluationReport.from_dict(report), problems


def record_evaluation(checkpoint: str | Path, report: EvaluationReport) -> Path:
    """Store the report's headline metrics, thresholds and normal-score statistics in the
    checkpoint's metadata, and the full report beside it; returns the report's path."""
    update_metadata(checkpoint, {"metrics": report.summary(),
                                 "normal_scores": report.normal_scores})
    path = report_path(checkpoint)
    report.write(path)
    return path


class RegistrationError(RDError, ValueError):
    """A checkpoint cannot be registered as asked."""


def register_model(checkpoint: str | Path, dataset: str, category: str | None = None,
                   manifest: str | Path | None = None) -> ModelEntry:
    """List ``checkpoint`` in ``manifest`` (default: the user's) under ``dataset``/category.

    A checkpoint outside the manifest's folder is first copied into it, under
    ``<dataset>/<category>/`` with a new name (``rd.manifest.register``: names are checked
    before any write, and no file or entry is ever replaced). The category defaults to the one the
    checkpoint names. Returns the entry (its ``path`` is where the registered file lies).
    """
    checkpoint = Path(checkpoint)
    meta = read_metadata(checkpoint)
    category = category or meta.category
    if not category:
        raise RegistrationError("the checkpoint names no category: pass --category")
    manifest = Path(manifest) if manifest is not None else user_manifest()
    return register(manifest, checkpoint, dataset, category, meta.backbone,
                    command=meta.command, report=meta.metrics or {},
                    copy=True, metadata=meta)
