"""A persistent store of results: each image's score under each model, and full test reports.

Keys are content hashes, not paths or times: a model is its checkpoint's SHA-256, an image the
SHA-256 of its file's bytes, a test set the hash of its images, labels and masks. So a restarted
server, a second browser tab or the command line finds what another one computed, and a moved
or renamed folder costs nothing. Scores live in one SQLite database (safe with several writer
processes); reports are JSON files written atomically.

Verdicts are not stored: one rule makes them from a stored score and the threshold in use
(``rd.decision.is_defective``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rd.data import DataError, Sample
from rd.errors import RDError
from rd.files import atomic_write, data_home

if TYPE_CHECKING:  # torch: imported when scores are computed, not when stored ones are read
    from rd.detector import Detector

_HEX = re.compile(r"^[0-9a-f]{64}$")
_QUERY_CHUNK = 500  # SQLite's limit on host parameters is 999 in old builds


class ResultsError(RDError, ValueError):
    """The results store cannot be used as asked."""


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def image_digest(path: str | Path) -> str:
    """The SHA-256 of an image file's bytes (remembered per path, size and modification time,
    so asking again for an unchanged file reads nothing)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _digests_lock:
        known = _digests.get(key)
    if known is None:
        known = bytes_digest(path.read_bytes())
        with _digests_lock:
            _digests[key] = known
    return known


def array_digest(array: np.ndarray) -> str:
    """The content hash of an in-memory image (painted or decoded pixels)."""
    array = np.ascontiguousarray(array)
    header = f"{array.dtype.str}{array.shape}".encode()
    return bytes_digest(header + array.tobytes())


def testset_key(samples: Sequence[Sample], digests: Sequence[str]) -> str:
    """The identity of a test set: its images' contents, labels, defect types and masks."""
    lines = sorted(
        f"{digest} {sample.label} {sample.defect} "
        f"{image_digest(sample.mask_path) if sample.mask_path else '-'}"
        for sample, digest in zip(samples, digests, strict=True))
    return bytes_digest("\n".join(lines).encode())


def _check_key(value: str, what: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value):
        raise ResultsError(f"invalid {what} key {value!r}: expected a SHA-256 in hex")
    return value


def _score_rows(model: str, scores: Mapping[str, float]) -> list[tuple[str, str, float]]:
    """Checked (model, image, score) rows: hex keys, finite scores."""
    _check_key(model, "model")
    rows = [(model, _check_key(image, "image"), float(score)) for image, score in scores.items()]
    if not all(np.isfinite(score) for *_, score in rows):
        raise ResultsError("a score is not a finite number: not stored")
    return rows


def _select(db: sqlite3.Connection, model: str, images: list[str]) -> dict[str, float]:
    """The stored scores of ``images`` under ``model``, queried in chunks."""
    found: dict[str, float] = {}
    for start in range(0, len(images), _QUERY_CHUNK):
        chunk = images[start: start + _QUERY_CHUNK]
        marks = ",".join("?" * len(chunk))
        found.update(db.execute(
            f"SELECT image, score FROM scores WHERE model = ? AND image IN ({marks})",
            [model, *chunk]).fetchall())
    return found


class ResultsStore:
    """Scores and reports under ``root`` (default: ``<data home>/results``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else data_home() / "results"

    @contextlib.contextmanager
    def _database(self):
        self.root.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.root / "scores.sqlite", timeout=60)
        try:
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for writers
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent on a crash
            connection.execute("CREATE TABLE IF NOT EXISTS scores (model TEXT NOT NULL, "
                               "image TEXT NOT NULL, score REAL NOT NULL, "
                               "PRIMARY KEY (model, image))")
            with connection:  # one transaction: committed, or rolled back on error
                yield connection
        finally:
            connection.close()

    def scores(self, model: str, images: Iterable[str]) -> dict[str, float]:
        """The stored scores of ``images`` (content hashes) under ``model``; absent ones are
        left out."""
        _check_key(model, "model")
        wanted = list(dict.fromkeys(images))
        if not wanted or not (self.root / "scores.sqlite").exists():
            return {}
        with self._database() as db:
            return _select(db, model, wanted)

    def put_scores(self, model: str, scores: Mapping[str, float], replace: bool = True) -> None:
        """Store scores; with ``replace=False`` a score already stored is kept (first wins)."""
        rows = _score_rows(model, scores)
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._database() as db:
            db.executemany(f"{verb} INTO scores (model, image, score) VALUES (?, ?, ?)", rows)

    def keep_first(self, model: str, scores: Mapping[str, float]) -> dict[str, float]:
        """Store the scores of images that have none under ``model`` and return every image's
        stored score (the first one stored wins), in one transaction."""
        rows = _score_rows(model, scores)
        with self._database() as db:
            db.executemany("INSERT OR IGNORE INTO scores (model, image, score) VALUES (?, ?, ?)",
                           rows)
            return _select(db, model, list(scores))

    def _report_path(self, model: str, testset: str) -> Path:
        return (self.root / _check_key(model, "model")
                / f"{_check_key(testset, 'test set')}.report.json")

    def report(self, model: str, testset: str) -> dict[str, Any] | None:
        """The stored report of ``model`` on ``testset``, or None (also for an unreadable
        file, which is then recomputed)."""
        try:
            return json.loads(self._report_path(model, testset).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put_report(self, model: str, testset: str, report: Mapping[str, Any]) -> None:
        text = json.dumps(report)
        atomic_write(self._report_path(model, testset), lambda tmp: tmp.write_text(text))


def _tail(path: str | Path) -> tuple[str, ...]:
    """What identifies a test image inside its category: ``test/<defect>/<name>``."""
    return Path(path).parts[-3:]


def localise(report: Mapping[str, Any], samples: Sequence[Sample], digests: Sequence[str],
             scores: Mapping[str, float]) -> dict[str, Any]:
    """A stored report with each image's path made this machine's and its score the stored
    one (they are equal when the store was filled from this report; the store wins)."""
    paths = dict(zip(digests, (str(s.path) for s in samples), strict=True))
    images = []
    for image in report["images"]:
        digest = image.get("sha256")
        images.append({**image, "path": paths.get(digest, image["path"]),
                       "score": scores.get(digest, image["score"])})
    return {**report, "images": images}


def seed_from_report(store: ResultsStore, model: str, report: Mapping[str, Any],
                     samples: Sequence[Sample], digests: Sequence[str]) -> bool:
    """Fill the store from a committed report (shipped models) when it covers exactly these
    test images (matched by ``test/<defect>/<name>``); True when it did."""
    by_tail = {_tail(image["path"]): image for image in report.get("images", [])}
    if len(by_tail) != len(samples) or any(_tail(s.path) not in by_tail for s in samples):
        return False
    images, scores = [], {}
    for sample, digest in zip(samples, digests, strict=True):
        image = by_tail[_tail(sample.path)]
        if int(image["label"]) != sample.label or image["defect"] != sample.defect:
            return False
        images.append({**image, "sha256": digest})
        scores[digest] = float(image["score"])
    store.put_scores(model, scores)
    store.put_report(model, testset_key(samples, digests), {**report, "images": images})
    return True


class _Streaming:
    """The detector as ``evaluate`` sees it, except that each batch takes ``lock`` (other users
    of the model interleave between batches) and its scores are kept for the store."""

    def __init__(self, detector: Detector, lock: threading.Lock, batch_size: int) -> None:
        self._detector = detector
        self._lock = lock
        self.batch_size = batch_size
        self.last_scores = np.empty(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)

    def predict_tensor(self, batch):
        with self._lock:
            prediction = self._detector.predict_tensor(batch)
        self.last_scores = prediction.scores.cpu().numpy()
        return prediction

    def predict_native(self, image):  # letterbox and tile checkpoints: one image at a time
        with self._lock:
            result = self._detector.predict_native(image)
        self.last_scores = np.array([float(result.score)])
        return result

    def take_scores(self) -> np.ndarray:
        scores, self.last_scores = self.last_scores, np.empty(0)
        return scores


def evaluate_into(store: ResultsStore, model: str, detector: Detector,
                  samples: Sequence[Sample], digests: Sequence[str], *,
                  lock: threading.Lock | None = None, batch_size: int = 4,
                  on_progress: Callable[[int, int], None] | None = None
                  ) -> dict[str, Any] | None:
    """Evaluate ``samples`` in small batches, storing each batch's scores as soon as it is
    computed (pages show them while the rest runs), then the full report. Unreadable test images
    are left out and named in the report's ``skipped_images``. A test set that cannot be
    evaluated (one class only, unknown labels) still gets its scores; None is returned."""
    lock = lock or threading.Lock()
    labels = {s.label for s in samples}
    if not samples:
        return None
    if -1 in labels or len(labels) < 2:
        for start in range(0, len(samples), batch_size):
            chunk = list(zip(samples[start: start + batch_size],
                             digests[start: start + batch_size], strict=True))
            try:
                with lock:
                    scores = detector.predict([s.path for s, _ in chunk]).scores
                store.put_scores(model, {d: float(v) for (_, d), v in zip(chunk, scores,
                                                                          strict=True)})
            except DataError:  # an unreadable image: score the others one by one
                for sample, digest in chunk:
                    with contextlib.suppress(DataError), lock:
                        one = detector.predict([sample.path]).scores[0]
                        store.put_scores(model, {digest: float(one)})
            if on_progress:
                on_progress(start + len(chunk), len(samples))
        return None
    try:
        report = _evaluate_streaming(store, model, detector, samples, digests, lock, batch_size,
                                     on_progress)
    except DataError:  # unreadable test images: left out, named in the report
        from rd.data.dataset import ImageDataset

        usable, problems = ImageDataset(list(samples), detector.preprocess).usable()
        if not problems or not usable:
            raise
        keep = {id(s) for s in usable}
        kept = [d for s, d in zip(samples, digests, strict=True) if id(s) in keep]
        report = _evaluate_streaming(store, model, detector, usable, kept, lock, batch_size,
                                     on_progress)
        report["skipped_images"] = problems
    store.put_report(model, testset_key(samples, digests), report)
    return report


def _evaluate_streaming(store: ResultsStore, model: str, detector: Detector,
                        samples: Sequence[Sample], digests: Sequence[str],
                        lock: threading.Lock, batch_size: int,
                        on_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    streaming = _Streaming(detector, lock, batch_size)

    def keep(done: int, total: int) -> None:
        batch = streaming.take_scores()
        if 0 < len(batch) <= done:
            store.put_scores(model, dict(zip(digests[done - len(batch): done],
                                             map(float, batch), strict=True)))
        if on_progress:
            on_progress(done, total)

    from rd.evaluation import evaluate

    report = evaluate(streaming, samples, on_progress=keep)  # type: ignore[arg-type]
    report["images"] = [{**image, "sha256": digest}
                        for image, digest in zip(report["images"], digests, strict=True)]
    store.put_scores(model, {i["sha256"]: float(i["score"]) for i in report["images"]})
    return report
