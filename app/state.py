"""What every page shares: services, no widgets (the sidebar is app/sidebar.py).

- models: ``load_model`` keeps loaded detectors in ``st.cache_resource`` (keyed on checkpoint
  path and modification time); inference runs under one lock (one GPU, many sessions);
- results: every image's score under every model lives in the persistent store
  (``rd.results``), shared by sessions, tabs and restarts; a test set missing from it is
  evaluated by one background thread in small batches while the pages show what is there;
- detection: ``detect`` is the one per-image service of Inspect, Review and Learn (maps cached in
  memory, the score always the stored one, so every page shows the same number and verdict);
- ``require_data`` / ``require_model`` / ``require_report``: what a page needs, or a message
  saying why not and what to do, then the page stops.

Failures become messages in the page, never tracebacks.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st
from PIL import Image

from app import memory
from rd import foreground, results
from rd.data import DataError, MVTecCategory, Sample, list_categories, read_image_bytes
from rd.data.sources import BUILTIN, DataSource, available_sources
from rd.data.synthetic import SYNTHETIC_CATEGORIES, ensure_builtin_dataset
from rd.decision import ImageDetection
from rd.decision import verdict as verdict  # the pages' one rule (score >= threshold)
from rd.errors import RDError
from rd.files import atomic_write, background_python, data_home
from rd.manifest import ModelEntry

if TYPE_CHECKING:  # torch: imported when a model is loaded, not for the first page's images
    from rd.detector import Detector

MAX_UPLOAD_MB = 20
SETTINGS_FILE = "app_settings.json"
TRAIN_PAGE = "screens/train.py"
POLL_S = 1.0  # how often a page waiting for results looks again
BUILTIN_CATEGORIES = tuple(sorted(SYNTHETIC_CATEGORIES))
QUIET_S = 5.0  # background CPU work (the ONNX export) waits until nobody clicked for this long
PRELOAD_QUIET_S = 1.0  # a model needed soon (preload_model) waits this long only
_ACTIVITY = {"last": time.monotonic()}


@dataclass(frozen=True)
class Selection:
    """The sidebar's choice: which data, which category, which model, where to run it."""

    source: DataSource
    category: str
    backbone: str
    device: str
    entry: ModelEntry | None
    models: tuple[ModelEntry, ...] = ()  # every model of this data and category

    @property
    def checkpoint(self) -> Path | None:
        return self.entry.path if self.entry else None


def selection() -> Selection | None:
    return st.session_state.get("selection")


def category_key(chosen: Selection, name: str) -> str:
    """A widget key of its own per data source and category, so that a filter chosen on one
    category never carries over to another (whose options differ)."""
    return f"{name}::{chosen.source.name}/{chosen.category}"


# ----------------------------------------------------------------------------- settings


def _settings_path() -> Path:
    return data_home() / SETTINGS_FILE


def load_settings() -> dict[str, Any]:
    try:
        settings = json.loads(_settings_path().read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def save_settings(settings: dict[str, Any]) -> None:
    text = json.dumps(settings, indent=1)
    atomic_write(_settings_path(), lambda tmp: tmp.write_text(text))


@st.cache_resource(show_spinner="Preparing the built-in dataset…")
def _sources(home: str, extra: tuple[tuple[str, str], ...]) -> list[DataSource]:
    """The sources; of the built-in data only the category the sidebar opens on is generated
    here (on a fresh data home: about 1.5 s instead of 5 s before the first thumbnails)."""
    del home  # cache key only: the built-in data lives in the data home
    return available_sources({name: Path(root) for name, root in extra},
                             builtin_categories=BUILTIN_CATEGORIES[:1])


def categories(source: DataSource, complete: bool = True) -> list[str]:
    """The categories of ``source``. Built-in categories not generated yet are made first
    (``complete``) or listed anyway, to be made when chosen (``ensure_category``)."""
    if source.name == BUILTIN:
        if not complete:
            return list(BUILTIN_CATEGORIES)
        ensure_builtin_dataset(source.root)
    return list_categories(source.root)


def ensure_category(source: DataSource, category: str) -> None:
    """A built-in category exists on disk once this returns (generated if needed)."""
    if source.name == BUILTIN:
        ensure_builtin_dataset(source.root, [category])


_GENERATE = ("from rd.data.synthetic import ensure_builtin_dataset\n"
             "ensure_builtin_dataset(sys.argv[1])\n")


@st.cache_resource(show_spinner=False)
def complete_builtin_in_background(home: str) -> None:
    """Once per data home: the built-in categories not generated yet, at the first quiet
    moment (the first page never waits for them), in a child process that pauses whenever the
    studio is used again (``rd.foreground.run_yielding``: generated in this process, its
    threads held the interpreter while a user clicked)."""
    source = next(s for s in data_sources() if s.name == BUILTIN)

    def generate() -> None:
        wait_for_quiet()
        with contextlib.suppress(OSError):  # the sidebar says so when it matters
            foreground.run_yielding(background_python(_GENERATE, str(source.root)))

    del home  # cache key only
    threading.Thread(target=generate, name="builtin-data", daemon=True).start()


def remembered_roots() -> tuple[tuple[str, str], ...]:
    """The folders the user added (name, absolute path), those that still exist."""
    roots = load_settings().get("mvtec_roots", {})
    if not isinstance(roots, dict):
        return ()
    return tuple(sorted((str(name), str(root)) for name, root in roots.items()
                        if isinstance(root, str) and Path(root).is_dir()))


def data_sources() -> list[DataSource]:
    """Every data source the sidebar offers (the Train page's form lists them too)."""
    return _sources(str(data_home()), remembered_roots())


# ------------------------------------------------------------------------ page requirements


def train_call_to_action(chosen: Selection, key: str = "train_cta") -> None:
    """A button opening the Train page with its form filled in for this data and category."""
    if st.button("Train a model for this data", icon=":material/model_training:", key=key,
                 type="primary"):
        st.session_state["train::prefill"] = {"source": chosen.source.name,
                                              "category": chosen.category,
                                              "backbone": chosen.backbone}
        st.switch_page(TRAIN_PAGE)


def require_data() -> Selection:
    """The sidebar's selection (a model is optional: pages can browse without one)."""
    chosen = selection()
    if chosen is None:
        st.info("Choose a dataset and a category in the sidebar.")
        st.stop()
    return chosen


def no_model_message(chosen: Selection) -> str:
    """Why there is no model, and what to do: another backbone has one, or none has."""
    others = sorted({e.backbone for e in chosen.models} - {chosen.backbone})
    where = f"**{chosen.source.name} / {chosen.category}**"
    if others:
        return (f"There is no **{chosen.backbone}** model for {where} yet: pick "
                f"{', '.join(others)} in the sidebar, or train one.")
    return f"No model has been trained on {where} yet: train one to see heat maps."


def require_model() -> tuple[Selection, Detector]:
    """The selection and its loaded detector, or stop the page with a message saying why."""
    chosen = require_data()
    if chosen.entry is None:
        st.info(no_model_message(chosen))
        train_call_to_action(chosen, key="require_model::train")
        st.stop()
    try:
        stat = chosen.entry.path.stat()
        path = Path(_verified(str(chosen.entry.path), chosen.entry.sha256, stat.st_mtime_ns,
                              stat.st_size, chosen.entry))
        detector = load_model(str(path), path.stat().st_mtime, chosen.device)
    except (RDError, OSError, ValueError) as error:
        st.error(f"The model cannot be used: {error}")
        st.stop()
    return chosen, detector


def preload_model(chosen: Selection) -> None:
    """Load the selected model in a background thread once the page has been quiet for
    PRELOAD_QUIET_S (once per model and device): importing torch holds the interpreter for
    seconds after a restart, and done in the page's run it delayed the thumbnails the browser
    was fetching from this server; done later, opening an image finds the model loaded. A
    failure is left to ``require_model``, which shows it when the model is needed."""
    entry, device = chosen.entry, chosen.device
    with _PRELOADS_LOCK:
        if entry is None or (entry.sha256, device) in _PRELOADS:
            return
        _PRELOADS.add((entry.sha256, device))

    def load() -> None:
        wait_for_quiet(PRELOAD_QUIET_S)
        if _EXITING.is_set():
            return
        with contextlib.suppress(RDError, OSError, ValueError):
            stat = entry.path.stat()
            path = _verified(str(entry.path), entry.sha256, stat.st_mtime_ns, stat.st_size,
                             entry)
            load_model(path, Path(path).stat().st_mtime, device)

    thread = threading.Thread(target=load, name="rd-preload-model", daemon=True)
    thread.start()
    atexit.register(_finish_at_exit, thread)


def _finish_at_exit(thread: threading.Thread) -> None:
    """A thread killed inside torch at exit aborts the process ("terminate called without an
    active exception"): one that has not started loading stops, one that has finishes."""
    _EXITING.set()
    thread.join(timeout=120)


_PRELOADS: set[tuple[str, str]] = set()
_PRELOADS_LOCK = threading.Lock()


@st.cache_data(show_spinner="Checking the model file…", max_entries=64)
def _verified(path: str, sha256: str, mtime_ns: int, size: int, _entry: ModelEntry) -> str:
    """``entry.verify()`` once per file version (hashing a large checkpoint at every rerun
    would slow every click); a failure is not cached, so it is checked again."""
    del path, sha256, mtime_ns, size  # cache key only
    return str(_entry.verify())


def require_report() -> tuple[Selection, Detector, dict[str, Any]]:
    """The model and its complete test report; while the report is being computed, a progress
    bar that refreshes itself, and the page stops there (nothing blocks)."""
    chosen, detector = require_model()
    found = evaluation(chosen, detector)
    if found.report is not None:
        return chosen, detector, found.report
    if found.error:
        st.error(f"Cannot evaluate {chosen.category}: {found.error}")
        st.stop()
    if found.complete:  # scored, but no report can be made of this test set
        st.info(f"The {chosen.category} test set cannot be evaluated: that needs both normal "
                "and defective images with known labels. Inspect shows each image's score.")
        st.stop()
    _wait_for_report(chosen.category)
    st.stop()


@st.fragment(run_every=POLL_S)
def _wait_for_report(category: str) -> None:
    chosen = selection()
    if chosen is None or chosen.entry is None:
        return
    _, detector = require_model()
    found = evaluation(chosen, detector)
    if found.complete or found.error:
        st.rerun()
    st.progress(found.done / max(1, found.total),
                text=f"Evaluating the {category} test set… {found.done}/{found.total} images "
                     "(the results are kept: this happens once per model)")


# ------------------------------------------------------------------------------ activity


def note_activity() -> None:
    """A user's run starts (a page or an interactive fragment): this process's background
    work waits (``wait_for_quiet``), training jobs and background processes pause
    (``rd.foreground``), and what survived the last run leaves the garbage collector's reach
    (``app.memory``)."""
    _mark_use()
    memory.freeze_survivors()
    _full_collections()


def note_run_ended() -> None:
    """A user's run ended: the quiet counts from now, not from its start (a first page that
    loads a model for seconds is not a quiet moment for background work to start in)."""
    _mark_use()


def _mark_use() -> None:
    _ACTIVITY["last"] = time.monotonic()
    foreground.note_use()


@functools.cache
def _full_collections() -> threading.Thread:
    """The process's one thread of full collections at quiet moments (``app.memory``)."""
    return memory.collect_fully_when_quiet(wait_for_quiet)


def wait_for_quiet(seconds: float | None = None) -> None:
    """Return once nobody has interacted for ``seconds`` (default QUIET_S). On this 2-core
    machine any CPU work beside the browser slows a click's answer several-fold whatever its
    priority (a threshold move: 0.18 s without the export, 0.53 s during it;
    docs/performance.md)."""
    while (idle := time.monotonic() - _ACTIVITY["last"]) < (quiet := seconds or QUIET_S):
        time.sleep(quiet - idle)


def interactive_fragment(function: Callable[..., Any]) -> Callable[..., Any]:
    """``st.fragment`` for the parts a click reruns; each run counts as activity."""
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        note_activity()
        try:
            return function(*args, **kwargs)
        finally:
            note_run_ended()

    return st.fragment(run)


# ---------------------------------------------------------------------------------- models


def load_model(path: str, mtime: float, device: str) -> Detector:
    """The model in the default runtime (rd.runtime: our ONNX export in ONNX Runtime on a CPU,
    else torch); ``mtime`` is part of the cache key only, so a rewritten checkpoint is reloaded.
    """
    return _model_slot(path, mtime, device)["detector"]


@st.cache_resource(show_spinner="Loading the model…", max_entries=8)
def _model_slot(path: str, mtime: float, device: str) -> dict[str, Detector]:
    """The torch model at once; the ONNX Runtime one replaces it when ready.

    Exporting a graph the first time takes 10–60 s on a CPU: a user must not wait for it to see
    the first image, nor find the pages slow meanwhile. A background thread waits for a quiet
    moment (``wait_for_quiet``), then runs the export in a child process at idle priority that
    pauses while the studio is used (rd.runtime.build_cache_process, which checks every output
    against torch within 1e-5; rd.foreground.run_yielding) and swaps the cached graph in. The
    stored scores are the verdict either way.
    """
    del mtime
    from rd.detector import load
    from rd.runtime import build_cache_process, default_runtime, select_runtime

    slot = {"detector": load(path, device)}
    if default_runtime() == "torch" or slot["detector"].device.type != "cpu":
        return slot

    def upgrade() -> None:
        with contextlib.suppress(Exception):  # any failure: torch keeps serving
            wait_for_quiet()
            if foreground.run_yielding(build_cache_process(path)) != 0:
                return
            faster, choice = select_runtime(load(path, device), path)
            if choice.name == "onnxruntime":
                slot["detector"] = faster

    threading.Thread(target=upgrade, name="onnx-export", daemon=True).start()
    return slot


@st.cache_resource
def inference_lock() -> threading.Lock:
    return threading.Lock()


def predict(detector: Detector, images: list[Any]):
    """A batch through the detector under the shared inference lock."""
    with inference_lock():
        return detector.predict(images)


def store() -> results.ResultsStore:
    """The results store of the current data home."""
    return _store(str(data_home()))


@st.cache_resource
def _store(home: str) -> results.ResultsStore:
    return results.ResultsStore(Path(home) / "results")


# ------------------------------------------------------------------------------- detection


MAPS_KEPT = 256  # detections kept in memory (about 1 MB each at 256 px)
_Maps = tuple[np.ndarray, np.ndarray, float]  # layer maps, fused map, computed score


@st.cache_resource
def _maps_cache() -> tuple[OrderedDict[tuple[str, str, str], _Maps], threading.Lock]:
    """Recently computed maps of every session, least recently used dropped first."""
    return OrderedDict(), threading.Lock()


def _image_key(image: Path | str | bytes | np.ndarray | Image.Image, name: str
               ) -> tuple[str, Any]:
    """An image's content hash, and what the detector reads it from."""
    if isinstance(image, str | Path):
        return results.image_digest(image), str(image)
    if isinstance(image, bytes):  # decoded only if its maps must be computed
        return results.bytes_digest(image), (image, name)
    pixels = np.asarray(image)
    return results.array_digest(pixels), pixels


def detect_many(chosen: Selection, detector: Detector,
                images: list[Path | str | bytes | np.ndarray | Image.Image],
                name: str = "upload") -> list[ImageDetection]:
    """Detections of several images under the selected model; those not in memory are computed
    together, in one batch. Each score is the stored one (the number every page, download and
    verdict uses); an image seen for the first time has its computed score stored. Raises
    DataError for an unreadable image."""
    cache, lock = _maps_cache()
    model = chosen.entry.sha256
    keyed = [_image_key(image, name) for image in images]
    keys = [(model, chosen.device, digest) for digest, _ in keyed]
    with lock:
        found = {key: cache[key] for key in keys if key in cache}
    missing = list(dict.fromkeys(key for key in keys if key not in found))
    if missing:
        sources = {key: source for key, (_, source) in zip(keys, keyed, strict=True)}
        batch = [read_image_bytes(*sources[key]) if isinstance(sources[key], tuple)
                 else sources[key] for key in missing]
        detection = predict(detector, batch)
        computed = {key: (detection[i].layer_maps, detection[i].fused, detection[i].score)
                    for i, key in enumerate(missing)}
        store().put_scores(model, {key[2]: value[2] for key, value in computed.items()},
                           replace=False)
        found.update(computed)
        with lock:
            cache.update(computed)
            while len(cache) > MAPS_KEPT:
                cache.popitem(last=False)
    with lock:
        for key in keys:
            if key in cache:
                cache.move_to_end(key)
    stored = store().scores(model, [key[2] for key in keys])
    return [ImageDetection(float(stored.get(key[2], found[key][2])), found[key][0],
                           found[key][1]) for key in keys]


def detect(chosen: Selection, detector: Detector, image: Path | str | bytes | np.ndarray |
           Image.Image, name: str = "upload") -> ImageDetection:
    """The detection of one image (a test image's path, an upload's bytes with its file
    ``name``, or pixels): ``detect_many`` of one. An image being prefetched is waited for,
    not computed a second time."""
    if isinstance(image, str | Path) and (pending := _PREFETCHING.get(str(image))):
        pending.wait(PREFETCH_WAIT_S)
    return detect_many(chosen, detector, [image], name)[0]


def prefetch(chosen: Selection, detector: Detector, paths: list[str]) -> None:
    """Compute the maps of ``paths`` (the open image's neighbours in the grid) in a background
    thread, so that Next and Previous find them in memory. Errors are left to the page that
    shows the image."""
    with _PREFETCH_LOCK:
        wanted = [path for path in dict.fromkeys(paths) if path not in _PREFETCHING]
        for path in wanted:
            _PREFETCHING[path] = threading.Event()
    if not wanted:
        return
    home = data_home()

    def compute() -> None:
        try:
            with contextlib.suppress(RDError, OSError, ValueError):
                if data_home() == home:  # the same results store as the page's
                    detect_many(chosen, detector, wanted)
        finally:
            with _PREFETCH_LOCK:
                for path in wanted:
                    _PREFETCHING.pop(path).set()

    threading.Thread(target=compute, name="rd-prefetch", daemon=True).start()


_PREFETCHING: dict[str, threading.Event] = {}  # path -> set once its prefetch has ended
_PREFETCH_LOCK = threading.Lock()
PREFETCH_WAIT_S = 10.0


# ------------------------------------------------------------------------------ evaluation


@dataclass
class Evaluation:
    """What is known of the selected model on its test set, now."""

    scores: dict[str, float]  # str(sample.path) -> stored score
    report: dict[str, Any] | None  # the full report, once complete (local paths)
    done: int
    total: int
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.report is not None or (self.total > 0 and self.done >= self.total)


@dataclass
class _Run:
    """A background evaluation (one per model, test set and device, shared by sessions)."""

    done: int = 0
    total: int = 0
    error: str | None = None
    finished: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


class _Stopped(Exception):
    """Raised inside a background evaluation when the process exits."""


_EXITING = threading.Event()


@st.cache_resource
def _runs() -> tuple[dict[tuple[str, str, str, str], _Run], threading.Lock]:
    """Background evaluations of this process by (data home, model, test set, device): each
    data home has its own results store, so a run done for one is not done for another."""
    runs: dict[tuple[str, str, str, str], _Run] = {}

    def stop() -> None:  # a thread killed inside torch at exit aborts the process
        _EXITING.set()
        for run in list(runs.values()):
            if run.thread is not None:
                run.thread.join(timeout=10)

    atexit.register(stop)
    return runs, threading.Lock()


def _start(model: str, testset: str, device: str, detector: Detector, samples: list[Sample],
           digests: list[str]) -> _Run:
    runs, lock = _runs()
    key = (str(data_home()), model, testset, device)
    with lock:
        run = runs.get(key)
        if run is not None:  # running, done, or failed (not retried: the error is shown)
            return run
        run = runs[key] = _Run(total=len(samples))
    shared = store()
    inference = inference_lock()

    def work() -> None:
        def progress(done: int, total: int) -> None:
            run.done, run.total = done, total
            if _EXITING.is_set():
                raise _Stopped

        try:
            results.evaluate_into(shared, model, detector, samples, digests, lock=inference,
                                  on_progress=progress)
        except _Stopped:
            run.error = "stopped: the app is shutting down"
        except (RDError, OSError, ValueError, RuntimeError) as error:
            run.error = str(error)
        finally:
            run.done, run.finished = run.total, True

    run.thread = threading.Thread(target=work, name=f"evaluate-{model[:8]}", daemon=True)
    run.thread.start()
    return run


def _seed_once(entry: ModelEntry, samples: list[Sample], digests: list[str]) -> None:
    """A model's committed report (shipped ones, or one written by training) fills the store
    when it matches this test set: nothing to compute."""
    path = entry.report_path
    if not path.is_file():
        return
    try:
        report = json.loads(path.read_text())
        results.seed_from_report(store(), entry.sha256, report, samples, digests)
    except (OSError, ValueError, KeyError, TypeError, RDError):
        return  # not usable: the test set is evaluated instead


def evaluation(chosen: Selection, detector: Detector | None) -> Evaluation:
    """Scores and report of the selected model on its category's test set, as far as they are
    known; never waits. What is missing is computed by one background thread (not started
    when ``detector`` is None: a page showing what is stored before it loads the model)."""
    samples = test_samples(chosen)
    if not samples:
        return Evaluation({}, None, 0, 0, "no test images")
    try:
        digests = [results.image_digest(s.path) for s in samples]
        testset = results.testset_key(samples, digests)
    except OSError as error:
        return Evaluation({}, None, 0, len(samples), str(error))
    model = chosen.entry.sha256
    shared = store()
    report = shared.report(model, testset)
    if report is None:
        _seed_once(chosen.entry, samples, digests)
        report = shared.report(model, testset)
    stored = shared.scores(model, digests)
    run = None
    if report is None and detector is not None:
        run = _start(model, testset, chosen.device, detector, samples, digests)
        if run.finished:
            report = shared.report(model, testset)
    scores = {str(s.path): stored[d] for s, d in zip(samples, digests, strict=True)
              if d in stored}
    if report is not None:
        report = results.localise(report, samples, digests, stored)
    done = len(scores) if run is None or run.finished else max(run.done, len(scores))
    return Evaluation(scores, report, min(done, len(samples)), len(samples),
                      run.error if run else None)


def stored_evaluation(chosen: Selection) -> Evaluation:
    """``evaluation`` of a model other than the one on screen: the model is loaded (and its
    background scoring started) only when its results are not all stored yet, so listing the
    shipped models' results costs no model load, no export and no CPU."""
    found = evaluation(chosen, None)
    if found.complete or found.error:
        return found
    path = chosen.entry.verify()
    return evaluation(chosen, load_model(str(path), path.stat().st_mtime, chosen.device))


def report_for(chosen: Selection) -> dict[str, Any] | None:
    """The complete report of ``chosen``'s model (e.g. another backbone to compare with), or
    None while its background evaluation runs; never waits."""
    if chosen.entry is None:
        return None
    return stored_evaluation(chosen).report


def test_samples(chosen: Selection) -> list[Sample]:
    return _test_samples(str(chosen.source.root), chosen.category)


@st.cache_data(show_spinner=False, ttl=30, max_entries=64)
def _test_samples(root: str, category: str) -> list[Sample]:
    try:
        return MVTecCategory(root, category, allow_missing_masks=True).test_samples()
    except DataError as error:
        st.error(str(error))
        return []


# ------------------------------------------------------------------------------- threshold


def default_threshold(detector: Detector | None, report: dict[str, Any] | None) -> float:
    """The F1-optimal threshold of the test report, else the one stored in the checkpoint
    (``detector`` may be None when ``report`` is given: a page not yet holding the model)."""
    if report:
        return float(report["thresholds"]["f1"]["threshold"])
    stored = detector.metadata.threshold("f1")
    if stored is not None:
        return stored
    highest = detector.metadata.normal_score("max")
    return highest if highest is not None else 1.0


def threshold_key(chosen: Selection) -> str:
    return f"threshold::{chosen.checkpoint}"


def current_threshold(chosen: Selection, detector: Detector | None,
                      report: dict[str, Any] | None) -> float:
    """The threshold shared by every page for this model (set on Evaluate, used everywhere)."""
    key = threshold_key(chosen)
    if key not in st.session_state:
        st.session_state[key] = default_threshold(detector, report)
    return float(st.session_state[key])


def read_upload(upload) -> Image.Image:
    """An uploaded file as an RGB image; DataError (shown in the page) when it cannot be."""
    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        raise DataError(f"{upload.name}: {upload.size / 1e6:.1f} MB is over the "
                        f"{MAX_UPLOAD_MB} MB limit")
    return read_image_bytes(upload.getvalue(), upload.name)

