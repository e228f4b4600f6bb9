"""Scoring folders of any size: streaming, resumable, one row per image, across ranks.

``score`` decodes images beside the model (on ONNX Runtime on a CPU in lanes, one thread per
core that decodes its chunk and then runs the model on it; otherwise in DataLoader worker
processes while a model thread runs the previous batch) and writes one CSV or JSON-lines row
per image as it completes, flushed after every batch, so memory stays bounded whatever the
number of images and a killed run loses at most the rows of the batch in flight. ``resume``
skips the images already in the output; a torn last line (kill -9 during a write) is cut off
and that image scored again, so no row is lost or duplicated. An unreadable image becomes a
row with an error, never a crash.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank scores every WORLD_SIZE-th remaining image
into a part file beside the output; rank 0 merges the parts into the output in input order.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rd.data import (
    IMAGE_SUFFIXES,
    DataError,
    Preprocess,
    decode_pixels,
    image_file_bytes,
    read_image,
)
from rd.detector import Detector, is_defective
from rd.files import atomic_write
from rd.outputs import check_outputs, mirrored_outputs
from rd.results import ResultsStore, bytes_digest
from rd.runtime import OnnxDetector
from rd.visualize import colorize, overlay

FORMATS = ("csv", "jsonl")
COLUMNS = ("path", "score", "verdict", "width", "height", "seconds", "error")
SAVE_MAPS = ("none", "defective", "all")
_GLOB_CHARS = frozenset("*?[")


class ScoringError(DataError):
    """The inputs or the output cannot be used as asked; the message says what to do."""


# ----------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """The images to score, in a fixed order, and the folder their relative names start from."""

    paths: list[str]
    root: Path

    def relative(self, path: str) -> Path:
        """``path`` relative to the common root: names of saved maps never collide."""
        return Path(os.path.relpath(path, self.root))


def _folder_images(folder: Path) -> Iterator[Path]:
    for parent, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(parent) / name


def _expand(entry: str) -> list[Path]:
    if any(char in entry for char in _GLOB_CHARS) and not Path(entry).exists():
        found = sorted(Path(p) for p in glob.glob(entry, recursive=True))
        images = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise ScoringError(f"{entry}: the pattern matches no image file")
        return images
    path = Path(entry)
    if path.is_dir():
        images = sorted(_folder_images(path))
        if not images:
            raise ScoringError(f"{path}: no image files in this folder or below it "
                               f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return images
    if path.is_file() or path.is_symlink():
        return [path]  # a file that is no image becomes an error row, not a refusal
    raise ScoringError(f"{path}: no such file or folder; check the path")


def collect_inputs(entries: Sequence[str | Path], list_file: str | Path | None = None) -> Inputs:
    """Image files from files, folders (recursive, sorted), glob patterns and a list file.

    The list file holds one path per line (blank lines and lines starting with # skipped),
    relative to the list file's folder unless absolute. Duplicates are scored once.
    """
    raw = [str(e) for e in entries]
    if list_file is not None:
        list_file = Path(list_file)
        try:
            lines = list_file.read_text().splitlines()
        except OSError as error:
            raise ScoringError(f"{list_file}: cannot read the list of images ({error.strerror})"
                               ) from None
        raw += [str(list_file.parent / line.strip()) for line in lines
                if line.strip() and not line.lstrip().startswith("#")]
    if not raw:
        raise ScoringError("no images given: pass image files, folders, glob patterns or "
                           "--list FILE")
    paths = list(dict.fromkeys(os.path.abspath(p) for entry in raw for p in _expand(entry)))
    root = Path(os.path.commonpath([os.path.dirname(p) for p in paths]))
    return Inputs(paths, root)


# ---------------------------------------------------------------------------------- loading


class _ImageFiles(Dataset):
    """Decoded, preprocessed images; a file that cannot be read yields its error instead."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocess, native: bool = False,
                 digests: bool = False) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.native = native  # the decoded RGB pixels, for a letterbox or tile checkpoint
        self.digests = digests  # each file's content hash, the results store's key

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.preprocess.size
        started = time.perf_counter()
        try:
            data = image_file_bytes(self.paths[index])  # one read for the pixels and the digest
            rgb = decode_pixels(data, str(self.paths[index]))
            tensor = rgb if self.native else self.preprocess.pixels(rgb)
            digest = bytes_digest(data) if self.digests else ""
            error = ""
            height, width = rgb.shape[:2]
        except Exception as exc:  # any reader failure becomes this image's error row
            tensor = (np.zeros((1, 1, 3), np.uint8) if self.native
                      else torch.zeros(size, size, 3, dtype=torch.uint8))
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            width = height = 0
            digest = ""
        return {"index": index, "image": tensor, "error": error, "width": width,
                "height": height, "digest": digest,
                "read_seconds": time.perf_counter() - started}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch's images as one tensor, everything else as plain lists: every tensor a worker
    sends costs the main process a socket handshake to receive (torch's shared-memory
    hand-over), which for five small per-batch tensors was 6 % of the time."""
    batch: dict[str, Any] = {key: [item[key] for item in items] for key in items[0]}
    batch["image"] = torch.stack([torch.as_tensor(image) for image in batch["image"]])
    return batch


def _pad(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last image up to ``size``: one static shape for compiled graphs."""
    if len(batch) == size:
        return batch
    return torch.cat([batch, batch[-1:].expand(size - len(batch), *batch.shape[1:])])


ScoredBatch = tuple[dict[str, Any], Any, Any, float]
"""A batch's items (index, error, size, digest, read seconds), scores, fused maps, and the
model's seconds per image."""


def _through_loader(detector: Detector, dataset: _ImageFiles, static_batches: bool,
                    workers: int) -> Iterator[ScoredBatch]:
    """Batches decoded in ``workers`` processes, run by a model thread one batch ahead.

    While the model thread runs batch k, the caller receives and normalises batch k+1 and
    writes batch k-1's rows, so the model never waits for them; at most two batches are in
    flight, so memory stays bounded. The path for torch (CPU or GPU) and for an explicit
    ``--workers``.
    """
    native = dataset.native
    loader = DataLoader(dataset, batch_size=1 if native else detector.batch_size,
                        num_workers=workers, collate_fn=_collate,
                        pin_memory=detector.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=2 if workers else None)

    def run_model(batch: dict[str, Any], images: torch.Tensor) -> tuple[Any, Any, float]:
        started = time.perf_counter()
        count = len(batch["error"])
        if native:
            found = None if batch["error"][0] else detector.detect(images[0].numpy())
            scores, fused = [found.score if found else 0.0], [found.fused if found else None]
        else:
            prediction = detector.predict_tensor(images)
            scores = prediction.scores[:count].float().cpu().numpy()
            fused = prediction.fused[:count]
        return scores, fused, (time.perf_counter() - started) / count

    pending = None
    with ThreadPoolExecutor(1, thread_name_prefix="rd-predict") as model_thread:
        for batch in loader:
            images = batch["image"]
            if not native:
                if static_batches:
                    images = _pad(images, detector.batch_size)
                # uint8 from the workers; on a GPU copied as such and normalised there
                images = detector.preprocess.normalize(
                    images.to(detector.device, non_blocking=True))
            running = (batch, model_thread.submit(run_model, batch, images))
            if pending is not None:
                yield pending[0], *pending[1].result()
            pending = running
        if pending is not None:
            yield pending[0], *pending[1].result()


def _in_lanes(detector: OnnxDetector, dataset: _ImageFiles) -> Iterator[ScoredBatch]:
    """Images decoded and scored in the model's lanes (``OnnxDetector.predict_in_lanes``; ONNX
    Runtime on a CPU), regrouped into batches of ``detector.batch_size`` in input order: one
    results-store transaction and one flush each."""

    def read(index: int) -> tuple[dict[str, Any], np.ndarray]:
        item = dataset[index]
        return item, np.asarray(item.pop("image"))

    items: list[dict[str, Any]] = []
    predictions, model_seconds = [], 0.0
    for chunk, prediction, seconds in detector.predict_in_lanes(len(dataset), read):
        items += chunk
        predictions.append(prediction)
        model_seconds += seconds * len(chunk)
        if len(items) >= detector.batch_size or items[-1]["index"] == len(dataset) - 1:
            yield ({key: [item[key] for item in items] for key in items[0]},
                   np.concatenate([p.scores.numpy() for p in predictions]),
                   torch.cat([p.fused for p in predictions]), model_seconds / len(items))
            items, predictions, model_seconds = [], [], 0.0


# ----------------------------------------------------------------------------------- output


def read_rows(path: Path, output_format: str) -> list[dict[str, Any]]:
    """The complete rows of an output file; a torn last line is cut off the file first."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # killed during a write: drop the partial line for good
        with open(path, "r+b") as handle:
            handle.truncate(end)
        data = data[:end]
    text = data.decode("utf-8")
    if output_format == "jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ScoringError(f"{path}: line {number} is not JSON; it was not written by "
                                   "rd predict --jsonl (move it away or pick another file)"
                                   ) from None
        return rows
    reader = csv.DictReader(io.StringIO(text))
    if text and tuple(reader.fieldnames or ()) != COLUMNS:
        raise ScoringError(f"{path}: its columns are not {','.join(COLUMNS)}; it was not written "
                           "by rd predict --csv (move it away or pick another file)")
    return list(reader)


class RowWriter:
    """Appends rows to a CSV or JSON-lines file, one line per row, flushed on request."""

    def __init__(self, path: Path, output_format: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.format = output_format
        self.csv = csv.writer(self.handle, lineterminator="\n")
        if new and output_format == "csv":
            self.csv.writerow(COLUMNS)

    def write(self, row: dict[str, Any]) -> None:
        if self.format == "csv":
            self.csv.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
        else:
            self.handle.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _text_row(row: dict[str, Any]) -> str:
    """What predict prints without an output file: path, score, verdict (tab-separated)."""
    if row["error"]:
        return f"{row['path']}\terror\t{row['error']}"
    verdict = f"\t{row['verdict']}" if row["verdict"] else ""
    return f"{row['path']}\t{row['score']:.6f}{verdict}"


# ---------------------------------------------------------------------------------- scoring


@dataclass
class ScoringSummary:
    """What a run did: counts and speed (printed by the command line)."""

    total: int
    skipped: int
    scored: int
    errors: int
    defective: int
    seconds: float
    first_error: str | None = None  # "<path>: <reason>" of the first unreadable image

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def init_distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed() -> None:
    """Leave the process group ``init_distributed`` joined, while the interpreter is whole: a
    gloo group left to interpreter shutdown can abort the process (SIGABRT) as its threads
    free tensors after Python is gone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.part{rank}-of-{world}")


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.part*"))


def _save_maps(folder: Path, relative: Path, path: str, fused: np.ndarray,
               threshold: float | None) -> None:
    """Overlay PNG and raw map (.npy) under ``folder`` at the input's relative path."""
    image = read_image(path)
    top = 2 * threshold if threshold else float(fused.max()) or 1.0
    blended = overlay(image, colorize(fused, 0.0, top))
    atomic_write(folder / relative.with_suffix(".png"),
                 lambda tmp: blended.save(tmp, format="PNG"))

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save would append ".npy"
            np.save(handle, fused)

    atomic_write(folder / relative.with_suffix(".npy"), write_npy)


def check_output(out: Path, output_format: str | None = None, resume: bool = False) -> str:
    """The output's format (csv or jsonl); refuses an existing output unless resuming."""
    output_format = output_format or out.suffix.lstrip(".").lower()
    if output_format not in FORMATS:
        raise ScoringError(f"{out}: say the output format with --csv or --jsonl (or name the "
                           "file .csv or .jsonl)")
    if out.is_dir():
        raise ScoringError(f"{out} is a folder: give a file name")
    if not resume and (out.exists() or _parts(out)):
        raise ScoringError(f"{out} exists: add --resume to continue it, or remove it")
    return output_format


def rank_zero_first(function: Callable[[], Any]) -> Any:
    """Run ``function`` on rank 0 before the other ranks (e.g. a model load that writes a
    cache the others then read); just run it outside torchrun."""
    rank, world = init_distributed()
    if world > 1 and rank != 0:
        dist.barrier()
    result = function()
    if world > 1 and rank == 0:
        dist.barrier()
    return result


def score(detector: Detector, inputs: Inputs, out: Path | None = None,
          output_format: str | None = None, *, resume: bool = False,
          threshold: float | None = None, save_maps: str = "none", maps_dir: Path | None = None,
          workers: int | None = None, progress: bool = True,
          print_row: Callable[[str], None] | None = None,
          static_batches: bool = False, overwrite: bool = False,
          store: ResultsStore | None = None, model: str | None = None) -> ScoringSummary:
    """Score ``inputs`` with ``detector``, writing one row per image to ``out``.

    With a results ``store`` and the checkpoint's SHA-256 as ``model``, an image scored before
    under this model (by the studio, an evaluation or an earlier ``predict``) gets its stored
    score, and new scores are stored: one score per image and model wherever it is shown, so
    the verdict never differs by a rounding step between the studio and the command line.

    ``output_format`` is csv or jsonl (default: from the suffix of ``out``). Without ``out``
    each row goes to ``print_row`` (the command line prints it). ``threshold`` overrides the
    checkpoint's F1 threshold for the verdict. ``save_maps`` writes an overlay and the raw
    map of no image, the defective ones or all under ``maps_dir`` (existing ones only with
    ``resume`` or ``overwrite``). ``static_batches`` pads the last batch to the batch size
    (one shape for a compiled graph). ``workers`` decoding processes feed the model; by
    default none on ONNX Runtime on a CPU (the lanes decode), else two.
    """
    rank, world = init_distributed()
    if (store is None) != (model is None):
        raise ScoringError("a results store needs the model's SHA-256, and the other way round")
    if save_maps not in SAVE_MAPS:
        raise ScoringError(f"--save-maps takes one of {', '.join(SAVE_MAPS)}; got {save_maps!r}")
    if save_maps != "none" and maps_dir is None:
        raise ScoringError("--save-maps needs a folder for the maps: pass --out DIR")
    if out is not None:
        output_format = check_output(out, output_format, resume)
    elif world > 1:
        raise ScoringError("under torchrun, write the rows to a file: --csv FILE or --jsonl FILE")
    if threshold is None:
        threshold = detector.metadata.threshold("f1")
    if save_maps != "none":  # refuses two inputs that would share a map's name
        planned = mirrored_outputs(inputs.paths, maps_dir, (".png", ".npy"))
        if not resume:
            check_outputs([p for paths in planned for p in paths.values()], inputs.paths,
                          overwrite)
        del planned

    done: set[str] = set()
    if out is not None and resume:
        for file in [out, *_parts(out)]:
            done.update(row["path"] for row in read_rows(file, output_format))
    todo = [i for i, p in enumerate(inputs.paths) if p not in done][rank::world]
    if world > 1:
        dist.barrier()  # every rank has read the files before any rank appends to its part
    target = out if world == 1 or out is None else _part_path(out, rank, world)
    writer = RowWriter(target, output_format) if target is not None else None

    # A letterbox or tile checkpoint fits each image at its own size: one image per step.
    dataset = _ImageFiles([inputs.paths[i] for i in todo], detector.preprocess,
                          native=not detector.geometry.is_paper, digests=store is not None)
    if workers is None and isinstance(detector, OnnxDetector) and not dataset.native:
        batches = _in_lanes(detector, dataset)
    else:
        batches = _through_loader(detector, dataset, static_batches,
                                  min(2, os.cpu_count() or 1) if workers is None else workers)
    bar = tqdm(total=len(todo), desc=f"predict{f' rank {rank}' if world > 1 else ''}",
               unit="img", disable=not progress, file=sys.stderr, smoothing=0.1)
    started = time.perf_counter()
    scored = errors = defective = 0
    first_error = None

    def write_rows(batch: dict[str, Any], scores: Any, fused: Any, share: float) -> None:
        nonlocal scored, errors, defective, first_error
        if store is not None:
            scores = _one_score_per_image(store, model, batch["digest"], batch["error"], scores)
        for j, error in enumerate(batch["error"]):
            path = inputs.paths[todo[batch["index"][j]]]
            row: dict[str, Any] = {
                "path": path, "score": None, "verdict": "error", "width": None,
                "height": None, "seconds": None, "error": error or None}
            if not error:
                value = float(scores[j])
                verdict = "" if threshold is None else (
                    "defective" if is_defective(value, threshold) else "normal")
                row.update(score=value, verdict=verdict, width=batch["width"][j],
                           height=batch["height"][j],
                           seconds=round(batch["read_seconds"][j] + share, 6))
                defective += verdict == "defective"
                if save_maps == "all" or (save_maps == "defective" and verdict == "defective"):
                    _save_maps(maps_dir, inputs.relative(path), path,
                               np.asarray(torch.as_tensor(fused[j]).float().cpu()), threshold)
            else:
                errors += 1
                first_error = first_error or f"{path}: {error}"
            scored += 1
            if writer is not None:
                writer.write(row)
            elif print_row is not None:
                print_row(_text_row(row))
        if writer is not None:
            writer.flush()  # a kill loses at most the batches in flight
        bar.update(len(batch["error"]))

    try:
        for batch, scores, fused, share in batches:
            write_rows(batch, scores, fused, share)
    finally:
        batches.close()  # stops the decoding and the model's threads
        bar.close()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - started
    if world > 1:
        counts = torch.tensor([scored, errors, defective], dtype=torch.float64)
        dist.all_reduce(counts)  # also the barrier before rank 0 merges the parts
        scored, errors, defective = (int(v) for v in counts.tolist())
        if rank == 0:
            merge_parts(out, output_format, inputs)
        dist.barrier()
    return ScoringSummary(len(inputs.paths), len(done), scored, errors, defective, seconds,
                          first_error)


def _one_score_per_image(store: ResultsStore, model: str, digests: Sequence[str],
                         errors: Sequence[str], computed: Sequence[float]) -> list[float]:
    """The batch's scores: the stored one where there is one, else the computed one, which is
    stored (the first score stored for an image and model stays)."""
    stored = store.keep_first(model, {digest: float(value) for digest, error, value
                                      in zip(digests, errors, computed, strict=True)
                                      if not error})
    return [stored[digest] if not error else 0.0
            for digest, error in zip(digests, errors, strict=True)]


def merge_parts(out: Path, output_format: str, inputs: Inputs) -> None:
    """Merge the output and the ranks' part files into ``out``, in input order (atomic)."""
    order = {path: i for i, path in enumerate(inputs.paths)}
    parts = _parts(out)
    rows = {row["path"]: row for file in [out, *parts] for row in read_rows(file, output_format)}
    ordered = sorted(rows.values(), key=lambda row: order.get(row["path"], len(order)))

    def write(tmp: Path) -> None:
        writer = RowWriter(tmp, output_format)
        for row in ordered:
            writer.write(row)
        writer.close()

    atomic_write(out, write)
    for part in parts:
        part.unlink()
