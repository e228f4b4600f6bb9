"""ONNX Runtime on the CPU: a batch's chunks one after another across all cores, or side by side
in single-threaded runs (``OnnxDetector.predict_tensor``'s choice for several chunks).

Both ways run the same exported graph on the same batch; outputs are compared bit for bit.
A seeded checkpoint per backbone (ImageNet teacher, seeded student) is made under ``--work``
and exported there once (10-60 s each).

    OMP_NUM_THREADS=2 python -m benchmarks.chunks [--backbones efficientnet_lite0 resnet18]
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import common
from benchmarks.scoring import make_checkpoint
from rd.runtime import OnnxDetector, load_runtime


def images_per_second(detector: OnnxDetector, batch: torch.Tensor, repeats: int) -> float:
    seconds, _ = common.time_call(lambda: detector.predict_tensor(batch), torch.device("cpu"),
                                  repeats)
    return len(batch) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0], "runs/benchmarks/chunks.json")
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"],
                        help="others need their ImageNet weights on disk (docs: OFFLINE)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rd-chunks-benchmark"),
                        help="where the checkpoints and their exports go (not the repository)")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.quick:
        args.size, args.batch_size, args.repeats = 64, 8, 2
    args.work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {"machine": common.machine(torch.device("cpu")), "runs": {}}
    for backbone in args.backbones:
        checkpoint = make_checkpoint(args.work / f"{backbone}_{args.size}.safetensors",
                                     args.size, backbone)
        detector, choice = load_runtime(checkpoint, "cpu", "onnxruntime")
        assert isinstance(detector, OnnxDetector), choice
        detector.batch_size = args.batch_size
        batch = torch.randn(args.batch_size, 3, args.size, args.size,
                            generator=torch.Generator().manual_seed(0))
        threads = detector.threads
        detector.threads = 1  # one chunk after another, each across every core
        sequential = images_per_second(detector, batch, args.repeats)
        one_by_one = detector.predict_tensor(batch)
        detector.threads = threads
        side_by_side = images_per_second(detector, batch, args.repeats)
        together = detector.predict_tensor(batch)
        same = all(torch.equal(getattr(one_by_one, name), getattr(together, name))
                   for name in ("layer_maps", "fused", "scores"))
        results["runs"][backbone] = {"sequential": sequential, "side_by_side": side_by_side,
                                     "identical": same, "threads": threads}
        rows.append([backbone, args.batch_size, threads, sequential, side_by_side,
                     side_by_side / sequential, same])
    common.print_table(f"ONNX Runtime, CPU, {args.size} px: chunks of the batch",
                ["backbone", "batch", "threads", "one after another img/s",
                 "side by side img/s", "ratio", "identical"], rows)
    common.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
