"""``rd predict`` over a folder of generated images: constant memory, throughput, kill -9 + resume.

Generates ``--count`` 256² PNG images (smooth textures, a few with a blemish) into ``--data``
(default under /tmp, never the repository), makes an efficientnet_lite0 checkpoint (ImageNet
teacher, seeded student: the work is that of a trained model) and runs the command as a user
would, in a child process, with its defaults (runtime auto; on a CPU the ONNX Runtime lanes
decode their own images):

1. the model's own batch throughput: ``predict_tensor`` on in-memory batches of 16;
2. ``rd predict`` over the first 1/10 of the images (``--list``), then over the whole folder:
   wall time, images/s from its summary line, peak resident memory of the main process
   (VmHWM) and the largest sampled sum over the process and its decoding workers;
3. the first 1/10 again into another file, killed with SIGKILL (process group) part-way,
   then ``--resume``: every image exactly once in the output (1/10, not the whole folder, to
   fit a shared machine's time; ``--kill-whole`` kills a run over the whole folder).

    nice -n 10 python -m benchmarks.scoring --count 10000
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import (
    apply_threads,
    base_parser,
    machine,
    print_table,
    time_call,
    write_json,
)
from rd.checkpoints import save_checkpoint
from rd.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from rd.model import build_model
from rd.runtime import load_runtime
from rd.scoring import read_rows

BACKBONE = "efficientnet_lite0"


def generate_images(folder: Path, count: int, size: int = 256) -> list[Path]:
    """``count`` PNGs in sub-folders of 1,000: smooth colour textures, some with a dark blot."""
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[:size, :size]
    for index in range(count):
        path = folder / f"{index // 1000:03d}" / f"{index:06d}.png"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(60, 190, size=(6, 6, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((size, size),
                                                           Image.Resampling.BICUBIC)).copy()
        if index % 7 == 0:
            y, x = rng.integers(30, size - 30, 2)
            pixels[(yy - y) ** 2 + (xx - x) ** 2 < 12 ** 2] //= 3
        Image.fromarray(pixels).save(path, compress_level=1)
    return paths


def make_checkpoint(path: Path, size: int, backbone: str = BACKBONE) -> Path:
    """A checkpoint of ``backbone`` (ImageNet teacher, student seeded with 0): the work of a
    trained model, made once."""
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(build_model(backbone), path,
                        {"preprocess": Preprocess(size, IMAGENET_MEAN, IMAGENET_STD).to_dict(),
                         "fusion": "sum", "category": "generated",
                         "metrics": {"thresholds": {"f1": 0.5}}})
    return path


def model_throughput(checkpoint: Path, size: int, batch_size: int, repeats: int
                     ) -> tuple[float, str]:
    """Images/s of the default runtime on in-memory preprocessed batches (median)."""
    detector, choice = load_runtime(checkpoint, "cpu")
    detector.batch_size = batch_size
    batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    seconds, _ = time_call(lambda: detector.predict_tensor(batch), torch.device("cpu"), repeats)
    return batch_size / seconds, choice.name


def _tree(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[index]}/task"):
                with open(f"/proc/{pids[index]}/task/{task}/children") as handle:
                    pids += [int(p) for p in handle.read().split()]
        except OSError:
            pass
        index += 1
    return pids


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except OSError:
        return 0


def run_predict(checkpoint: Path, inputs: list[str], out: Path, kill_at_rows: int | None = None,
                resume: bool = False) -> dict[str, Any]:
    """Run ``python -m rd predict`` as a user would; sample its memory; SIGKILL it (the whole
    process group) once ``kill_at_rows`` rows are in its output."""
    command = [sys.executable, "-m", "rd", "predict", "--checkpoint", str(checkpoint), *inputs,
               "--csv", str(out), "--device", "cpu", "--quiet"]
    if resume:
        command.append("--resume")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    main_peak = tree_peak = 0
    killed = False
    while process.poll() is None:
        main_peak = max(main_peak, _status_kib(process.pid, "VmHWM"))
        tree_peak = max(tree_peak, sum(_status_kib(p, "VmRSS") for p in _tree(process.pid)))
        if kill_at_rows is not None and _lines(out) > kill_at_rows:  # + the header line
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    stderr = process.communicate()[1]
    seconds = time.perf_counter() - start
    found = re.search(r"scored (\d+) images .* in ([\d.]+) s, ([\d.]+) images/s", stderr)
    if not killed and (process.returncode != 0 or not found):
        raise RuntimeError(f"rd predict failed ({process.returncode}): {stderr[-2000:]}")
    return {"seconds": seconds, "killed": killed, "main_peak_mib": main_peak / 1024,
            "tree_peak_mib": tree_peak / 1024,
            "scored": int(found.group(1)) if found else None,
            "scoring_s": float(found.group(2)) if found else None,
            "images_per_s": float(found.group(3)) if found else None}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/scoring.json")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=Path("/tmp/rd-scoring-benchmark"),
                        help="where the images, checkpoint and outputs go (not the repository)")
    parser.add_argument("--kill-fraction", type=float, default=0.4,
                        help="kill the third run once this share of its rows is written")
    parser.add_argument("--kill-whole", action="store_true",
                        help="kill and resume a run over the whole folder, not over 1/10")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.count, args.size = 40, 64
    args.data.mkdir(parents=True, exist_ok=True)
    images = args.data / f"images{args.size}"
    paths = generate_images(images, args.count, args.size)
    checkpoint = make_checkpoint(args.data / f"{BACKBONE}_{args.size}.safetensors", args.size)
    tenth = args.data / "first_tenth.txt"
    tenth.write_text("".join(f"{p}\n" for p in paths[: args.count // 10]))
    for name in ("tenth.csv", "all.csv", "killed.csv"):
        (args.data / name).unlink(missing_ok=True)

    results: dict[str, Any] = {"machine": machine(torch.device("cpu")), "count": args.count,
                               "size": args.size, "backbone": BACKBONE}
    # The model alone before and after the folder runs; their mean is the share's reference
    # (a shared machine's speed drifts during the minutes between).
    before, runtime = model_throughput(checkpoint, args.size, 16, 9)
    small = run_predict(checkpoint, ["--list", str(tenth)], args.data / "tenth.csv")
    full = run_predict(checkpoint, [str(images)], args.data / "all.csv")
    after, _ = model_throughput(checkpoint, args.size, 16, 9)
    throughput = (before + after) / 2
    results["model"] = {"images_per_s": throughput, "before": before, "after": after,
                        "runtime": runtime, "batch": 16}
    victim, total = (([str(images)], args.count) if args.kill_whole
                     else (["--list", str(tenth)], args.count // 10))
    killed = run_predict(checkpoint, victim, args.data / "killed.csv",
                         kill_at_rows=int(args.kill_fraction * total))
    rows_at_kill = len(read_rows(args.data / "killed.csv", "csv"))
    resumed = run_predict(checkpoint, victim, args.data / "killed.csv", resume=True)
    final = [row["path"] for row in read_rows(args.data / "killed.csv", "csv")]
    expected = [str(p) for p in (paths if args.kill_whole else paths[: args.count // 10])]
    results["runs"] = {"tenth": small, "all": full, "killed": killed, "resumed": resumed}
    results["resume"] = {
        "rows_at_kill": rows_at_kill, "rows_after_resume": len(final),
        "duplicates": len(final) - len(set(final)),
        "missing": len(set(expected) - set(final)), "in_input_order": final == expected}
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]

    print_table(f"rd predict over generated {args.size}² PNGs, {BACKBONE}, runtime {runtime}",
                ["run", "images", "wall s", "images/s", "share of model img/s",
                 "main peak RSS MiB", "with workers MiB"],
                [[name, r["scored"], r["seconds"], r["images_per_s"],
                  (r["images_per_s"] or 0) / throughput, r["main_peak_mib"], r["tree_peak_mib"]]
                 for name, r in (("1/10 of the folder", small), ("whole folder", full),
                                 ("resumed after kill -9", resumed))])
    print(f"\nmodel alone (batch 16, in memory): {throughput:.1f} images/s (before {before:.1f}, "
          f"after {after:.1f}); peak RSS "
          f"whole/tenth: {full['main_peak_mib'] / small['main_peak_mib']:.3f}; kill -9 after "
          f"{killed['seconds']:.0f} s with {rows_at_kill} complete rows, resume: "
          f"{results['resume']}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
