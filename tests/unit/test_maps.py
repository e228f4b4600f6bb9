import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from rd.losses import reverse_distillation_loss
from rd.maps import fuse, gaussian_blur, image_scores, layer_maps


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 256, 256), (1, 10, 37), (1, 5, 3)])
def test_gaussian_blur_equals_scipy(shape):
    rng = np.random.default_rng(0)
    maps = rng.random(shape).astype(np.float32) * 3
    ours = gaussian_blur(torch.from_numpy(maps)).numpy()
    for ours_one, map_one in zip(ours, maps, strict=True):
        expected = gaussian_filter(map_one.astype(np.float64), sigma=4)  # reflect, truncate 4
        np.testing.assert_allclose(ours_one, expected, atol=1e-5, rtol=0)


def test_layer_maps_are_one_minus_cosine_upsampled():
    teacher = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    maps = layer_maps(teacher, teacher, (32, 32))
    assert maps.shape == (2, 3, 32, 32)
    assert maps.abs().max() < 1e-6  # identical features: no disagreement
    opposite = layer_maps(teacher, [-t for t in teacher], (32, 32))
    assert torch.allclose(opposite, torch.full_like(opposite, 2.0), atol=1e-6)
    student = [torch.randn_like(t) for t in teacher]
    maps = layer_maps(teacher, student, (32, 32))
    direct = 1 - F.cosine_similarity(teacher[2], student[2], dim=1)
    expected = F.interpolate(direct[:, None], size=(32, 32), mode="bilinear", align_corners=True)
    assert torch.allclose(maps[:, 2:3], expected)
    # align_corners=True keeps the corner values exactly
    assert torch.allclose(maps[:, 2, 0, 0], direct[:, 0, 0])


def test_fusion_sum_product_and_score():
    maps = torch.rand(2, 3, 8, 8)
    assert torch.allclose(fuse(maps), maps[:, 0] + maps[:, 1] + maps[:, 2])
    assert torch.allclose(fuse(maps, "product"), maps[:, 0] * maps[:, 1] * maps[:, 2])
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(maps, "mean")
    assert torch.equal(image_scores(maps[:, 0]), maps[:, 0].flatten(1).max(1).values)


def test_loss_is_flattened_per_sample_cosine_summed_over_layers():
    teacher = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    student = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    expected = sum(
        np.mean([1 - np.dot(t[i].flatten(), s[i].flatten())
                 / np.linalg.norm(t[i].flatten()) / np.linalg.norm(s[i].flatten())
                 for i in range(4)])
        for t, s in zip((x.double().numpy() for x in teacher),
                        (x.double().numpy() for x in student), strict=True))
    loss = reverse_distillation_loss(teacher, student)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert reverse_distillation_loss(teacher, teacher).item() == pytest.approx(0, abs=1e-6)
