"""Decoding image files into RGB pixels: ``read_pixels`` against PIL's ``read_image``.

``rd predict``'s lanes decode their own images beside the model, so a decode's CPU time, and
whether it holds the GIL while the other lane needs it, comes straight off the throughput.
Both readers run over the same files, once in one thread and once in two (as the two lanes
do); every array is checked equal. Files: ``benchmarks.scoring``'s generated 256² PNGs, and the
MVTec subset's PNGs when ``../shared/data`` has them.

    OMP_NUM_THREADS=2 python -m benchmarks.decoding
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import apply_threads, base_parser, machine, print_table, write_json
from benchmarks.scoring import generate_images
from rd.data import read_image, read_pixels

MVTEC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_subset"


def baseline(path: Path) -> np.ndarray:
    """What predict's lanes did before round 19: PIL's decode, then its RGB as an array."""
    return np.asarray(read_image(path))


def per_image_ms(read: Callable[[Path], np.ndarray], paths: Sequence[Path], threads: int,
                 repeats: int) -> float:
    """Median wall milliseconds per image over ``repeats`` passes (after one untimed pass)."""
    def one_pass() -> float:
        started = time.perf_counter()
        if threads == 1:
            for path in paths:
                read(path)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, paths))
        return time.perf_counter() - started

    one_pass()
    return float(np.median([one_pass() for _ in range(repeats)])) / len(paths) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/decoding.json")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--data", type=Path, default=Path("/tmp/rd-decoding-benchmark"),
                        help="where the generated images go (not the repository)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.count, args.repeats = 20, 1
    sets = {"generated 256² RGB": generate_images(args.data, args.count)}
    if MVTEC.is_dir():
        images = sorted(MVTEC.glob("*/train/*/*.png")) + sorted(MVTEC.glob("*/test/*/*.png"))
        sets["MVTec subset"] = images[: args.count]
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"machine": machine(torch.device("cpu")), "sets": {}}
    for name, paths in sets.items():
        equal = sum(np.array_equal(read_pixels(p), baseline(p)) for p in paths)
        figures = {}
        for threads in (1, 2):
            ours = per_image_ms(read_pixels, paths, threads, args.repeats)
            theirs = per_image_ms(baseline, paths, threads, args.repeats)
            figures[threads] = {"read_pixels_ms": ours, "baseline_ms": theirs}
            rows.append([name, len(paths), threads, ours, theirs, theirs / ours,
                         f"{equal}/{len(paths)}"])
        results["sets"][name] = {"images": len(paths), "equal": equal, "threads": figures}
    print_table("Decoding to (H, W, 3) uint8 RGB, wall ms per image",
                ["files", "images", "threads", "read_pixels ms", "PIL baseline ms", "ratio",
                 "equal arrays"], rows)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
