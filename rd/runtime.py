"""Inference runtimes: torch, or the exported graph (rd.export) in ONNX Runtime on the CPU.

On a CPU, ONNX Runtime runs the same graph as torch eager with fused kernels, 1.3-4x faster
(docs/performance.md), with maps equal within 1e-5. ``select_runtime`` therefore picks it by
default on the CPU when it is installed and the model exports, and torch otherwise. The export
is made once and cached next to the checkpoint, keyed by the checkpoint's SHA-256 (and what else
shapes the graph), written atomically; a cache that fails to load or to match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from rd.detector import CPU_CHUNK, DetectionError, Detector, load
from rd.errors import RDError
from rd.files import background_python, data_home, file_sha256
from rd.model import Prediction

RUNTIMES = ("auto", "torch", "onnxruntime")
CACHE_KEY = "rd.cache_key"
CACHE_VERSION = 1  # bump when the exported graph changes for the same checkpoint
TOLERANCE = 1e-5  # a fresh export must give torch's maps within this before it is used
Item = TypeVar("Item")


class RuntimeUnavailable(RDError, ValueError):
    """The runtime asked for cannot run this model here."""


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime a Detector got, and why (shown to users once)."""

    name: str
    reason: str


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def cache_key(checkpoint: Path, detector: Detector) -> str:
    """SHA-256 of the checkpoint plus everything else the exported graph depends on."""
    from rd.export import DEFAULT_OPSET

    parts = {"checkpoint": file_sha256(checkpoint), "version": CACHE_VERSION,
             "teacher": getattr(detector.model.teacher, "weights_id", ""),
             "torch": torch.__version__.split("+")[0], "opset": DEFAULT_OPSET}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_path(checkpoint: Path, key: str) -> Path:
    """``<name>.<key>.onnx`` beside the checkpoint, or in the user's data home when that
    folder is not writable (a read-only model store)."""
    name = f"{checkpoint.name.removesuffix('.safetensors')}.{key[:16]}.onnx"
    if os.access(checkpoint.parent, os.W_OK):
        return checkpoint.parent / name
    return data_home() / "onnx-cache" / name


def open_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with the settings every runtime user gets."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Spinning threads steal a shared CPU from everything else between calls (and each other).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_difference(session, detector: Detector) -> float:
    from rd.export import INPUT_NAMES, OUTPUT_NAMES

    size = detector.image_size
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: probe.numpy()})
    want = detector.predict_tensor(probe)
    return max(float(np.abs(got - ref.cpu().numpy()).max())
               for got, ref in zip(ours, (want.layer_maps, want.fused, want.scores), strict=True))


def cached_session(checkpoint: str | Path, detector: Detector, threads: int | None = None):
    """An ONNX Runtime session of ``detector``'s graph, exported once and cached on disk.

    A cache file that does not load, or whose stored key differs, is replaced; a fresh export
    is checked against torch (max difference of every output ``TOLERANCE``) before it is kept.
    """
    from rd.export import export_onnx

    checkpoint = Path(checkpoint)
    threads = threads or torch.get_num_threads()
    key = cache_key(checkpoint, detector)
    path = cache_path(checkpoint, key)
    if path.exists():
        try:
            session = open_session(path, threads)
            if session.get_modelmeta().custom_metadata_map.get(CACHE_KEY) == key:
                return session, path
        except Exception:  # any load failure means: rebuild the cache
            pass
    scratch = path.with_name(f".{path.name}.{os.getpid()}.export")
    try:
        export_onnx(detector, scratch)
        _stamp(scratch, key)
        session = open_session(scratch, threads)
        worst = _max_difference(session, detector)
        if worst > TOLERANCE:
            raise RuntimeUnavailable(f"the ONNX export differs from torch by {worst:.1e}")
        os.replace(scratch, path)  # same folder: atomic
    finally:
        scratch.unlink(missing_ok=True)
    return open_session(path, threads), path


def build_cache(checkpoint: str | Path) -> Path:
    """Export ``checkpoint`` (on the CPU) into its ONNX cache, or find it there."""
    return cached_session(checkpoint, load(checkpoint, "cpu"))[1]


def build_cache_process(checkpoint: str | Path) -> subprocess.Popen:
    """``build_cache`` in a child process at background priority (rd.files.background_python):
    a server (the studio) keeps answering at full speed, and its threads do not wait on the
    exporter's Python work (the export holds the interpreter lock most of its 10-60 s). The
    child dies with its parent."""
    return background_python("from rd.runtime import build_cache\nbuild_cache(sys.argv[1])\n",
                             str(checkpoint))


def _stamp(path: Path, key: str) -> None:
    """Record the cache key in the file's metadata, so that a mismatched file is noticed."""
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != CACHE_KEY]
    del model.metadata_props[:]
    for name, value in [*kept, (CACHE_KEY, key)]:
        entry = model.metadata_props.add()
        entry.key, entry.value = name, value
    onnx.save(model, str(path))


class OnnxDetector(Detector):
    """A Detector whose forward pass runs in ONNX Runtime on the CPU (same maps, faster).

    It keeps the torch model (metadata, preprocessing, backbone) and replaces only
    ``predict_tensor``; everything else, including ``predict``, is the Detector's.

    A batch of several chunks runs its chunks side by side, one single-threaded run per core,
    instead of one chunk at a time across all cores: the same outputs bit for bit, and no core
    waits for the other at each layer. For efficientnet_lite0 that was 10-40 % more images/s on
    2 cores (benchmarks/chunks.py); the wide backbones, already at the cores' peak, gain little.
    A single chunk (an image in the studio) still uses every core.
    """

    def __init__(self, detector: Detector, session, onnx_path: Path) -> None:
        # No super().__init__: the torch side is already built; share it.
        self.__dict__.update(detector.__dict__)
        self.session = session
        self.onnx_path = onnx_path
        self.threads = int(session.get_session_options().intra_op_num_threads)
        self._single_thread_session = None  # made at the first batch of several chunks
        self._pool: ThreadPoolExecutor | None = None
        self._made = threading.Lock()  # the studio's sessions share one detector

    def _side_by_side(self):
        with self._made:
            if self._pool is None:
                self._single_thread_session = open_session(self.onnx_path, threads=1)
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rd-onnx")
                weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._single_thread_session, self._pool

    @torch.no_grad()
    def predict_tensor(self, batch: torch.Tensor) -> Prediction:
        from rd.export import INPUT_NAMES, OUTPUT_NAMES

        self.check_batch(batch)
        array = batch.detach().cpu().contiguous().numpy()
        size = min(self.batch_size, CPU_CHUNK)
        chunks = [{INPUT_NAMES[0]: array[i:i + size]} for i in range(0, len(array), size)]
        if len(chunks) > 1 and self.threads > 1:
            session, pool = self._side_by_side()
            parts = list(pool.map(lambda feed: session.run(OUTPUT_NAMES, feed), chunks))
        else:
            parts = [self.session.run(OUTPUT_NAMES, feed) for feed in chunks]
        return _prediction(parts[0] if len(parts) == 1 else [
            np.concatenate(outputs) for outputs in zip(*parts, strict=True)])

    def predict_chunk(self, array: np.ndarray) -> Prediction:
        """Maps of one normalised (N, 3, S, S) float32 chunk in a single-threaded run (safe
        from several threads at once)."""
        from rd.export import INPUT_NAMES, OUTPUT_NAMES

        self.check_batch(torch.from_numpy(array))
        session, _ = self._side_by_side()
        return _prediction(session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: array}))

    def predict_in_lanes(self, count: int, read: Callable[[int], tuple[Item, np.ndarray]]
                         ) -> Iterator[tuple[list[Item], Prediction, float]]:
        """Items ``0 .. count - 1`` read and scored in lanes, one thread per core.

        ``read(i)`` returns what the caller keeps of item i and its uint8 (S, S, 3) pixels. Each
        lane reads a chunk (PIL and numpy free the GIL), normalises it with numpy and runs
        ``predict_chunk`` on it: reading and the model take turns on one core, where reading in
        other processes or threads preempts the model's threads mid-layer (18 % of the model's
        speed lost that way on two cores; docs/performance.md, round 8). Yields each chunk's
        kept items, Prediction and model seconds per image, in order; a window of two chunks
        per lane bounds memory.
        """
        size = min(self.batch_size, CPU_CHUNK)
        starts = iter(range(0, count, size))

        def run(start: int) -> tuple[list[Item], Prediction, float]:
            kept, pixels = zip(*(read(i) for i in range(start, min(start + size, count))),
                               strict=True)
            started = time.perf_counter()
            prediction = self.predict_chunk(self.preprocess.normalize(np.stack(pixels)))
            return list(kept), prediction, (time.perf_counter() - started) / len(kept)

        with ThreadPoolExecutor(self.threads, thread_name_prefix="rd-lane") as pool:
            running = deque(pool.submit(run, start) for start in islice(starts, 2 * self.threads))
            while running:
                done = running.popleft().result()
                start = next(starts, None)
                if start is not None:  # keeps the window full
                    running.append(pool.submit(run, start))
                yield done


def _prediction(outputs: list[np.ndarray]) -> Prediction:
    """The session's outputs as a Prediction; maps with NaN or infinities are refused."""
    if not np.isfinite(outputs[2]).all():  # the same refusal as the torch path's
        raise DetectionError("the model's anomaly maps hold NaN or infinite values: its "
                             "weights are broken (e.g. trained with a too large --lr); "
                             "retrain it")
    return Prediction(*(torch.from_numpy(output) for output in outputs))


def default_runtime() -> str:
    """``$RD_RUNTIME`` when set (the test suite sets torch: no export per tiny model), else
    auto."""
    return os.environ.get("RD_RUNTIME") or "auto"


def select_runtime(detector: Detector, checkpoint: str | Path | None,
                   runtime: str | None = None, *, torch_only_options: bool = False
                   ) -> tuple[Detector, RuntimeChoice]:
    """``detector`` itself (torch) or an OnnxDetector, as ``runtime`` asks.

    ``auto`` (the default, see ``default_runtime``) picks onnxruntime on the CPU when it is
    installed, no torch-only option (``--amp``, ``--channels-last``, ``--compile``) was asked
    and the model exports; torch otherwise. ``onnxruntime`` asked for explicitly fails clearly
    when it cannot run.
    """
    runtime = runtime or default_runtime()
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; "
                                 f"choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return detector, RuntimeChoice("torch", "asked for")
    why_not = None
    if detector.device.type != "cpu":
        why_not = f"it runs on the CPU and the model is on {detector.device}"
    elif torch_only_options or detector.amp is not None:
        why_not = "--amp/--channels-last/--compile are torch options"
    elif checkpoint is None:
        why_not = "the model has no checkpoint file to key the cache by"
    elif not onnxruntime_available():
        why_not = "onnxruntime (and onnxscript) are not installed"
    if why_not is None:
        try:
            session, path = cached_session(checkpoint, detector)
            return OnnxDetector(detector, session, path), RuntimeChoice(
                "onnxruntime", f"cached graph {path.name}")
        except Exception as error:  # export failures come in many types
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            why_not = f"the model did not export ({first})"
    if runtime == "onnxruntime":
        raise RuntimeUnavailable(f"--runtime onnxruntime cannot run here: {why_not}; "
                            "use --runtime torch")
    return detector, RuntimeChoice("torch", f"onnxruntime not used: {why_not}")


def load_runtime(checkpoint: str | Path, device: str | torch.device | None = "cpu",
                 runtime: str | None = None, teacher_weights: str | Path | None = None,
                 **options) -> tuple[Detector, RuntimeChoice]:
    """``rd.load`` plus ``select_runtime``: what the app and commands call to get a model."""
    detector = load(checkpoint, device, teacher_weights, **options)
    torch_only = bool(options.get("channels_last") or options.get("compile")
                      or options.get("amp"))
    return select_runtime(detector, checkpoint, runtime, torch_only_options=torch_only)


def describe(choice: RuntimeChoice) -> str:
    """One line for stderr: which runtime runs the model."""
    return f"runtime: {choice.name} ({choice.reason})"
