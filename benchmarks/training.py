"""Training speed: images/s of one training step per backbone, and epoch time on real images.

Ours is the step ``rd.training`` takes: Adam over OCBE + decoder, the reference loss, and the
frozen teacher's features read from the cache it fills once per run ("cached"; the teacher
then never runs during the epochs) or, where the cache would not fit, computed without autograd
("uncached"). The baseline is ``benchmarks.baseline.reference_train_step``: the teacher with
autograd on and layer4 computed, the loss's backward pass running through the teacher too.

The epoch figure trains ``rd.training.train`` for a few epochs on the hazelnut subset in
``../shared/data/mvtec_subset`` (when present), against the reference's epoch loop (read and
preprocess every image each epoch, reference step per batch of 16).

    python -m benchmarks.training                  # CPU (and CUDA when present)
    python -m benchmarks.training --device cuda --amp --channels-last
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.baseline import ReferenceRD, reference_optimizer, reference_train_step
from benchmarks.common import (
    apply_threads,
    base_parser,
    machine,
    print_table,
    random_model,
    resolve_devices,
    synchronize,
    time_call,
    write_json,
)
from rd.backbones import get_backbone
from rd.data import ImageDataset, MVTecCategory, Preprocess
from rd.losses import reverse_distillation_loss
from rd.model import ReverseDistillation
from rd.teacher import build_network
from rd.training import TrainConfig, log_path, train

BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2")
HAZELNUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_subset"


def _student_step(model: ReverseDistillation, optimizer: torch.optim.Optimizer,
                  features: list[torch.Tensor], amp: bool) -> float:
    """The step rd.training takes on one batch of teacher features."""
    with torch.autocast(features[0].device.type, dtype=torch.bfloat16, enabled=amp):
        loss = reverse_distillation_loss(features, model.student(features))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def bench_step(backbone: str, device: torch.device, args: Any) -> dict[str, Any]:
    """Step time at ``args.batch_size`` for ours (cached and uncached) and the baseline."""
    model = random_model(backbone).to(device)
    reference = ReferenceRD(model, share_student=False).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam([*model.bottleneck.parameters(), *model.decoder.parameters()],
                                 lr=0.005, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.size, args.size, generator=generator)
    images = images.to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        cached = model.teacher(images)

    def uncached() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            features = model.teacher(images)
        return _student_step(model, optimizer, features, args.amp)

    repeats = args.repeats
    ours_cached, _ = time_call(lambda: _student_step(model, optimizer, cached, args.amp),
                               device, repeats, warmup=2, min_seconds=args.min_seconds)
    ours_uncached, _ = time_call(uncached, device, repeats, warmup=1,
                                 min_seconds=args.min_seconds)
    base_optimizer = reference_optimizer(reference)
    base, _ = time_call(lambda: reference_train_step(reference, base_optimizer,
                                                     images.contiguous()),
                        device, repeats, warmup=1, min_seconds=args.min_seconds)
    n = args.batch_size
    return {"backbone": backbone, "device": device.type, "batch_size": n,
            "amp": args.amp, "channels_last": args.channels_last,
            "cached_images_per_s": n / ours_cached, "uncached_images_per_s": n / ours_uncached,
            "baseline_images_per_s": n / base, "ratio_cached": base / ours_cached,
            "ratio_uncached": base / ours_uncached}


def _random_teacher_file(backbone: str, folder: Path) -> Path:
    """Random teacher weights as a file: train() loads a teacher, and only Lite0's ImageNet
    weights exist offline; speed does not depend on the weights."""
    torch.manual_seed(0)
    path = folder / f"{backbone}-random.pth"
    torch.save(build_network(backbone).state_dict(), path)
    return path


def bench_epoch(backbone: str, device: torch.device, args: Any) -> dict[str, Any]:
    """Seconds per epoch on hazelnut's training images: rd.training.train vs the reference loop."""
    category = MVTecCategory(HAZELNUT, "hazelnut")
    samples = category.train_samples()
    with tempfile.TemporaryDirectory() as folder:
        weights = _random_teacher_file(backbone, Path(folder))
        config = TrainConfig(backbone=backbone, image_size=args.size, epochs=args.epochs,
                             batch_size=16, device=str(device), teacher_weights=str(weights),
                             checkpoint_every=args.epochs)
        out = Path(folder) / "bench.safetensors"
        started = time.perf_counter()
        train(samples, config, out, progress=False)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    ours_epoch = min(r["seconds"] for r in records[1:] or records)

    spec = get_backbone(backbone)
    dataset = ImageDataset(samples, Preprocess(args.size, spec.mean, spec.std))
    reference = ReferenceRD(random_model(backbone).to(device), share_student=False).to(device)
    optimizer = reference_optimizer(reference)
    loader = DataLoader(dataset, batch_size=16, shuffle=True)
    times = []
    for _ in range(min(args.epochs, 2)):
        start = time.perf_counter()
        for batch in loader:
            reference_train_step(reference, optimizer, batch["image"].to(device))
        synchronize(device)
        times.append(time.perf_counter() - start)
    base_epoch = min(times)
    return {"backbone": backbone, "device": device.type, "images": len(samples),
            "epochs": args.epochs, "epoch_s": ours_epoch, "baseline_epoch_s": base_epoch,
            "ratio": base_epoch / ours_epoch, "train_wall_s": wall,
            "train_wall_note": "model build, teacher cache, all epochs and checkpoint writes"}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/training.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--epoch-backbones", nargs="*", choices=BACKBONES,
                        default=["efficientnet_lite0", "resnet18"],
                        help="backbones of the hazelnut epoch figure (none: skip it)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the hazelnut run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for ours (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC for ours")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.quick:
        args.backbones = [b for b in args.backbones if b in ("efficientnet_lite0", "resnet18")]
        args.epoch_backbones = args.epoch_backbones[:1]
        args.size, args.batch_size, args.repeats, args.epochs = 64, 4, 1, 2
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()},
                               "steps": [], "epochs": [], "machines": {},
                               "weights": "random (speed only)"}
    for device in resolve_devices(args.device):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        results["machines"][device.type] = machine(device)
        for backbone in args.backbones:
            results["steps"].append(bench_step(backbone, device, copy.copy(args)))
            write_json(args.json, results)
        if HAZELNUT.is_dir():
            for backbone in args.epoch_backbones:
                results["epochs"].append(bench_epoch(backbone, device, args))
                write_json(args.json, results)
    print_table(
        f"Training step at batch {args.batch_size}, {args.size} px: images/s (median of "
        f"{args.repeats})",
        ["device", "backbone", "ours cached", "ours uncached", "baseline", "ratio cached",
         "ratio uncached"],
        [[r["device"], r["backbone"], r["cached_images_per_s"], r["uncached_images_per_s"],
          r["baseline_images_per_s"], r["ratio_cached"], r["ratio_uncached"]]
         for r in results["steps"]])
    if results["epochs"]:
        print_table(
            "Epoch on hazelnut's training images (batch 16): seconds",
            ["device", "backbone", "images", "ours epoch s", "baseline epoch s", "ratio",
             f"ours {args.epochs}-epoch run s"],
            [[r["device"], r["backbone"], r["images"], r["epoch_s"], r["baseline_epoch_s"],
              r["ratio"], r["train_wall_s"]] for r in results["epochs"]])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
