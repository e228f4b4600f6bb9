"""Every fast path gives the results of the straightforward one.

The straightforward paths are the baseline of the benchmarks (benchmarks/baseline.py: what the
reference code does, one image at a time with the whole teacher and SciPy) and our own default
path; the fast ones are batching, channels_last, the frozen teacher without autograd, cached
teacher features, torch's blur and the vectorised metrics. Speed itself is measured by the
benchmarks, never here.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from benchmarks.baseline import (
    ReferenceRD,
    reference_image_pro,
    reference_loss,
    reference_metrics,
    reference_optimizer,
    reference_predict,
    reference_train_step,
    threshold_loop_au_pro,
)
from benchmarks.common import detector_metadata
from rd import metrics
from rd.detector import Detector
from rd.losses import reverse_distillation_loss
from rd.maps import gaussian_blur
from rd.model import build_model

SIZE = 64
BACKBONES = ["efficientnet_lite0", "resnet18"]


@pytest.fixture(scope="module", params=BACKBONES)
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, pretrained=False).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _detector(model, **options) -> Detector:
    return Detector(copy.deepcopy(model), detector_metadata(model.backbone, SIZE), "cpu",
                    **options)


def test_our_maps_equal_the_reference_behaviour(model, batch):
    """Teacher cut after layer3 and run without autograd, batched, torch blur == the reference's
    whole teacher with gradients on, one image at a time, float64 numpy sum and SciPy blur."""
    ours = _detector(model).predict_tensor(batch)
    maps, scores = reference_predict(ReferenceRD(copy.deepcopy(model)), batch)
    np.testing.assert_allclose(ours.fused.numpy(), maps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.scores.numpy(), scores, atol=1e-5, rtol=0)


def test_channels_last_equals_default(model, batch):
    default = _detector(model).predict_tensor(batch)
    fast = _detector(model, channels_last=True).predict_tensor(batch)
    for a, b in ((default.layer_maps, fast.layer_maps), (default.fused, fast.fused),
                 (default.scores, fast.scores)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_batched_equals_one_by_one(model, batch):
    detector = _detector(model)
    batched = detector.predict_tensor(batch)
    detector.batch_size = 2  # uneven chunks: 2 + 2 + 1
    chunked = detector.predict_tensor(batch)
    singles = [detector.predict_tensor(image[None]) for image in batch]
    torch.testing.assert_close(chunked.fused, batched.fused, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([s.fused for s in singles]), batched.fused,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([s.scores for s in singles]), batched.scores,
                               atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_compiled_predict_equals_eager(batch):
    """torch.compile of the whole predict graph (resnet18 only: compiling takes ~20 s)."""
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=False).eval()
    eager = _detector(model).predict_tensor(batch[:4])
    compiled = _detector(model, compile=True).predict_tensor(batch[:4])
    for a, b in ((eager.layer_maps, compiled.layer_maps), (eager.fused, compiled.fused),
                 (eager.scores, compiled.scores)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_amp_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA"):
        _detector(model, amp="bf16")


def test_torch_blur_equals_scipy_on_a_batch():
    """One batched conv on the device == SciPy image by image (reflect, truncate 4), also
    when the 16-pixel radius exceeds the map."""
    maps = torch.rand(3, 40, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = gaussian_blur(maps).numpy()
    for one, expected in zip(ours, maps.numpy(), strict=True):
        np.testing.assert_allclose(one, gaussian_filter(expected, sigma=4), atol=1e-12)


def test_training_step_matches_the_reference(model, batch):
    """Frozen teacher without a graph (or its cached features) + our loss: after a step the
    student equals the one the reference's step gives (teacher with autograd, backward through
    it, layer4 computed)."""
    ours = copy.deepcopy(model).train()
    reference = ReferenceRD(copy.deepcopy(model), share_student=False)
    cached = [f.clone() for f in ours.teacher(batch)]  # what rd.training caches once per run
    optimizer = torch.optim.Adam([*ours.bottleneck.parameters(), *ours.decoder.parameters()],
                                 lr=0.005, betas=(0.5, 0.999))
    loss = reverse_distillation_loss(cached, ours.student(cached))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    reference_loss_value = reference_train_step(reference, reference_optimizer(reference), batch)
    assert loss.item() == pytest.approx(reference_loss_value, abs=1e-6)
    for name, parameter in ours.decoder.state_dict().items():
        torch.testing.assert_close(parameter, reference.decoder.state_dict()[name],
                                   atol=1e-5, rtol=0, msg=name)
    assert not any(p.requires_grad for p in ours.teacher.parameters())


def test_loss_equals_the_reference_loss():
    teacher = [torch.randn(3, 4, 6, 6) for _ in range(3)]
    student = [torch.randn(3, 4, 6, 6) for _ in range(3)]
    assert reverse_distillation_loss(teacher, student).item() == pytest.approx(
        reference_loss(teacher, student).item(), abs=1e-6)


def _small_case(seed: int, n: int = 6, size: int = 32) -> tuple[np.ndarray, np.ndarray, list]:
    """Maps with blob-shaped defects that score higher, and a few normal images."""
    rng = np.random.default_rng(seed)
    maps = gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n // 2, n):  # the second half is defective, with one or two regions
        for _ in range(1 + i % 2):
            cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(2, 6)
            region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            masks[i] |= region
            maps[i][region] += rng.uniform(0.05, 0.4)
    labels = [int(m.any()) for m in masks]
    return masks, maps.astype(np.float32), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_pro_equals_the_reference_per_image_loop(seed):
    masks, maps, _ = _small_case(seed)
    expected = np.mean([reference_image_pro(m, a) for m, a in zip(masks, maps, strict=True)
                        if m.any()])
    assert metrics.legacy_pro(masks, maps) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_au_pro_equals_the_threshold_loop_at_every_score(seed):
    """Our exact AU-PRO (sorting once) == the loop over global thresholds and regions when the
    loop visits every distinct score (then its curve is exact too)."""
    masks, maps, _ = _small_case(seed, n=4, size=24)
    loop = threshold_loop_au_pro(masks, maps, thresholds=np.unique(maps))
    assert metrics.au_pro(masks, maps) == pytest.approx(loop, abs=1e-6)


def test_auroc_equals_the_reference_pixel_lists():
    masks, maps, labels = _small_case(3)
    reference = reference_metrics(labels, masks, maps)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(reference["pixel_auroc"], abs=1e-6)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    assert metrics.image_auroc(labels, scores) == pytest.approx(reference["image_auroc"],
                                                                abs=1e-6)
    assert metrics.legacy_pro(masks, maps) == pytest.approx(reference["legacy_pro"], abs=1e-3)


def test_channels_last_training_gives_the_default_result(tiny_mvtec, tmp_path):
    """Issue 12: ``train --channels-last`` (NHWC weights and inputs) trains to the default's
    losses within float rounding, and says so in the recipe."""
    from rd.data import MVTecCategory
    from rd.training import TrainConfig, train

    samples = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).train_samples()[:8]
    small = {"image_size": 64, "batch_size": 4, "seed": 3, "device": "cpu", "epochs": 2,
             "cache_teacher": "off"}
    default = train(samples, TrainConfig(**small), tmp_path / "a.safetensors", progress=False)
    nhwc = train(samples, TrainConfig(channels_last=True, **small), tmp_path / "b.safetensors",
                 progress=False)
    # other kernels round differently; Adam at lr 0.005 amplifies that a little per step
    assert nhwc.losses[0] == pytest.approx(default.losses[0], abs=1e-4)
    assert nhwc.losses == pytest.approx(default.losses, rel=2e-3)
    assert TrainConfig(channels_last=True, **small).recipe()["channels_last"] is True
    assert "channels_last" not in TrainConfig(**small).recipe()


def test_compile_options_are_accepted_and_refused_when_not_booleans():
    from rd.training import TrainConfig, TrainingError

    config = TrainConfig.from_dict({**TrainConfig().to_dict(), "compile": True})
    assert config.compile and config.recipe()["compile"] is True
    with pytest.raises(TrainingError, match="channels_last must be true or false"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "channels_last": "yes"})


def test_compiled_detector_pads_to_one_static_shape(batch):
    """``predict --compile`` pads the last batch to the batch size (rd.scoring): one compiled
    shape, and the padded images do not change the real ones' maps."""
    from rd.scoring import _pad

    padded = _pad(batch[:3], 5)
    assert padded.shape == (5, *batch.shape[1:]) and torch.equal(padded[:3], batch[:3])
    assert torch.equal(padded[3], batch[2]) and torch.equal(padded[4], batch[2])
