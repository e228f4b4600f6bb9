"""What every benchmark shares: timing, peak memory, the machine's description, tables, JSON."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rd.backbones import get_backbone
from rd.data import MVTecCategory, Preprocess
from rd.model import ReverseDistillation, build_model

PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL(None)  # glibc: malloc_trim


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], Any], device: torch.device, repeats: int,
              warmup: int = 1, min_seconds: float = 0.0) -> tuple[float, Any]:
    """Median wall time of ``function`` (after ``warmup`` untimed calls) and its last result.

    Median, not mean: other processes share this CPU, and one slow repeat should not move the
    figure. ``min_seconds`` adds repeats until that much time was measured (short GPU calls).
    """
    result = None
    for _ in range(warmup):
        result = function()
    synchronize(device)
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        result = function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory a block adds, in MiB: CUDA's allocator peak, or resident memory on the CPU.

    On the CPU a thread samples the process's resident set every millisecond (torch's CPU
    allocations are invisible to tracemalloc); the figure is the peak minus the level before,
    after glibc has handed its free memory back (malloc_trim), so that earlier calls' freed
    blocks do not hide this one's growth. Approximate: it counts pages touched, not bytes.
    """
    record: dict[str, float] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield record
        synchronize(device)
        record["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    _LIBC.malloc_trim(0)
    before = _resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield record
    finally:
        done.set()
        sampler.join()
        record["peak_mib"] = (max(peak[0], _resident_bytes()) - before) / 2**20


def random_model(backbone: str, seed: int = 0) -> ReverseDistillation:
    """Teacher and student with random weights: speed does not depend on the weights, and the
    ResNets' ImageNet files cannot be downloaded here."""
    torch.manual_seed(seed)
    return build_model(backbone, pretrained=False).eval()


def detector_metadata(backbone: str, size: int) -> dict[str, Any]:
    """The metadata a Detector needs, as a checkpoint of ``backbone`` at ``size`` would hold."""
    spec = get_backbone(backbone)
    return {"preprocess": Preprocess(size, spec.mean, spec.std).to_dict(), "fusion": "sum"}


def machine(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured (CPU load included: this machine is shared)."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def resolve_devices(choice: str) -> list[torch.device]:
    """``auto``: the CPU, plus CUDA when present; otherwise the one device named."""
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table (also valid Markdown)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.2e}"
    return "-" if value is None else str(value)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write the full results (every figure of the tables, and more) for later comparison."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")


def base_parser(description: str, default_json: str) -> argparse.ArgumentParser:
    """Options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: checks that the script runs, not speed")
    parser.add_argument("--json", type=Path, default=Path(default_json),
                        help=f"where to write the results (default {default_json})")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser


def checkpoints_on_category(description: str, argv: list[str] | None
                            ) -> tuple[MVTecCategory, list[Path]]:
    """The category and checkpoints of ``--data ROOT --category NAME --checkpoints CKPT...``
    (the probes that score trained checkpoints on a test set), gradients off."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    parser.add_argument("--category", required=True)
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    return MVTecCategory(args.data, args.category), args.checkpoints


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
