"""Inference speed: images/s at each batch size, one-image latency and peak memory, per backbone.

Ours is ``Detector.predict_tensor`` (batched, teacher cut after layer3, no autograd, maps and
blur in torch on the device); the baseline is ``benchmarks.baseline.reference_predict`` (one image
at a time, teacher with autograd on and layer4 computed, SciPy blur on the CPU). Both run the
same weights (random: speed does not depend on them), so their maps must agree: the table shows
the largest difference. ``--amp/--channels-last/--compile`` add a second row per case with
those options, compared with our float32 maps.

    python -m benchmarks.inference                       # CPU (and CUDA when present), 256 px
    python -m benchmarks.inference --device cuda --batch-sizes 1 64 --amp bf16 --channels-last
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.baseline import ReferenceRD, reference_predict
from benchmarks.common import (
    apply_threads,
    base_parser,
    detector_metadata,
    machine,
    peak_memory,
    print_table,
    random_model,
    resolve_devices,
    time_call,
    write_json,
)
from rd.detector import AMP_DTYPES, Detector
from rd.export import export_onnx
from rd.runtime import OnnxDetector, open_session

BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2")


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _photo(size: int, seed: int) -> Image.Image:
    """A camera-sized RGB image (MVTec's are 700–1024 px): latency includes the resize."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def onnx_detector(detector: Detector, folder: Path) -> OnnxDetector:
    """Our exported graph (rd.export) under ONNX Runtime with the session settings of
    rd.runtime: what ``rd predict``/``evaluate`` run by default on a CPU."""
    path = export_onnx(detector, folder / f"{detector.backbone}.onnx")
    return OnnxDetector(detector, open_session(path), path)


def bench_backbone(backbone: str, device: torch.device, args: Any) -> dict[str, Any]:
    """Every figure of one backbone on one device."""
    size = args.size
    model = random_model(backbone).to(device)
    reference = ReferenceRD(copy.deepcopy(model)).to(device)
    metadata = detector_metadata(backbone, size)
    options = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
    variants = {"ours": {}}
    if any(options.values()):
        variants["ours+" + "+".join(k for k, v in options.items() if v)] = options
    detectors: dict[str, Detector] = {
        name: Detector(copy.deepcopy(model), metadata, device, **opts)
        for name, opts in variants.items()}
    del model
    if args.onnxruntime and device.type == "cpu":
        detectors["onnxruntime"] = onnx_detector(detectors["ours"], args.scratch)
    repeats = args.repeats
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)
    for batch_size in args.batch_sizes:
        batch = torch.randn(batch_size, 3, size, size, generator=generator)
        base_time, (base_maps, base_scores) = time_call(
            lambda b=batch: reference_predict(reference, b), device, repeats)
        with peak_memory(device) as base_memory:
            reference_predict(reference, batch)
        fp32 = None
        for name, detector in detectors.items():
            detector.batch_size = batch_size
            ours_time, prediction = time_call(
                lambda d=detector, b=batch: d.predict_tensor(b), device, repeats, warmup=2,
                min_seconds=args.min_seconds)
            with peak_memory(device) as memory:
                detector.predict_tensor(batch)
            fused = prediction.fused.float().cpu().numpy()
            layer_maps = prediction.layer_maps.float().cpu().numpy()
            if fp32 is None:
                fp32 = (fused, layer_maps)
            rows.append({
                "backbone": backbone, "device": device.type, "variant": name,
                "batch_size": batch_size,
                "images_per_s": batch_size / ours_time,
                "baseline_images_per_s": batch_size / base_time,
                "ratio": base_time / ours_time,
                "peak_mib": memory["peak_mib"], "baseline_peak_mib": base_memory["peak_mib"],
                "max_diff_fused_vs_baseline": _max_diff(fused, base_maps),
                "max_diff_scores_vs_baseline": _max_diff(prediction.scores.float().cpu().numpy(),
                                                         base_scores),
                "max_diff_fused_vs_fp32": _max_diff(fused, fp32[0]),
                "max_diff_layer_maps_vs_fp32": _max_diff(layer_maps, fp32[1]),
            })
    photo = _photo(args.photo_size, 1)
    latency = []
    base_latency, _ = time_call(
        lambda: reference_predict(reference, detectors["ours"].to_batch(photo)), device, repeats)
    for name, detector in detectors.items():
        detector.batch_size = 1
        seconds, _ = time_call(lambda d=detector: d.predict(photo), device, repeats, warmup=2,
                               min_seconds=args.min_seconds)
        latency.append({"backbone": backbone, "device": device.type, "variant": name,
                        "latency_ms": 1000 * seconds, "baseline_latency_ms": 1000 * base_latency,
                        "ratio": base_latency / seconds})
    return {"throughput": rows, "latency": latency}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/inference.json")
    parser.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), "
                        "cpu or cuda")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.0,
                        help="time each of our cases at least this long (GPU: short calls)")
    parser.add_argument("--photo-size", type=int, default=1024,
                        help="side of the image whose latency is measured (resized to --size)")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also time our exported ONNX graph under ONNX Runtime (CPU)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.backbones = [b for b in args.backbones if b in ("efficientnet_lite0", "resnet18")]
        args.size, args.repeats, args.photo_size = 64, 1, 128
        args.batch_sizes = [min(b, 4) for b in args.batch_sizes]
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "throughput": [], "latency": [], "machines": {},
                               "weights": "random (speed only)"}
    results["settings"]["json"] = str(args.json)
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = Path(scratch)  # exported ONNX files
        for device in resolve_devices(args.device):
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # both paths: fixed shapes, best kernels
            results["machines"][device.type] = machine(device)
            for backbone in args.backbones:
                figures = bench_backbone(backbone, device, args)
                results["throughput"] += figures["throughput"]
                results["latency"] += figures["latency"]
                write_json(args.json, results)  # partial results survive an interrupted run
    print_table(
        f"Inference at {args.size} px, images/s (median of {args.repeats}); baseline = reference "
        "behaviour, same weights",
        ["device", "backbone", "variant", "batch", "ours img/s", "baseline img/s", "ratio",
         "ours peak MiB", "baseline peak MiB", "max |Δ| fused vs baseline", "max |Δ| vs fp32"],
        [[r["device"], r["backbone"], r["variant"], r["batch_size"], r["images_per_s"],
          r["baseline_images_per_s"], r["ratio"], r["peak_mib"], r["baseline_peak_mib"],
          r["max_diff_fused_vs_baseline"], r["max_diff_fused_vs_fp32"]]
         for r in results["throughput"]])
    print_table(
        f"One-image latency ({args.photo_size}² RGB image -> maps as numpy), ms",
        ["device", "backbone", "variant", "ours ms", "baseline ms", "ratio"],
        [[r["device"], r["backbone"], r["variant"], r["latency_ms"], r["baseline_latency_ms"],
          r["ratio"]] for r in results["latency"]])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
