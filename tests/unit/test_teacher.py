"""The teacher networks built from the registry: shapes, strides, frozen, weights."""

import pytest
import torch
import torchvision

from rd.backbones import BACKBONES, WeightsError, get_backbone
from rd.teacher import FAMILIES, build_teacher, full_network_parameters


def test_every_registered_family_can_be_built():
    assert {spec.family for spec in BACKBONES.values()} <= set(FAMILIES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_teacher_shapes_strides_and_frozen(name):
    teacher = build_teacher(name, pretrained=False)
    spec = get_backbone(name)
    features = teacher(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in features] == list(spec.channels)
    assert [f.shape[-1] for f in features] == [16, 8, 4]  # strides 4, 8, 16
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(not f.requires_grad for f in features)
    teacher.train()
    assert not teacher.training and not teacher.extractor.training


def test_resnet_teacher_has_no_layer4_or_head():
    teacher = build_teacher("resnet18", pretrained=False)
    names = {name for name, _ in teacher.named_modules()}
    assert not any("layer4" in n or n.endswith("fc") for n in names)


def test_full_network_counts_match_reference():
    assert full_network_parameters("resnet18") == 11_689_512
    assert full_network_parameters("resnet50") == 25_557_032
    assert full_network_parameters("wide_resnet50_2") == 68_883_240


def test_resnet_offline_without_file_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("RD_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth.*hub/checkpoints"):
        build_teacher("resnet18", pretrained=True)


def test_resnet_weights_from_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    teacher = build_teacher("resnet18", pretrained=True)
    assert teacher.weights_id == "resnet18-f37072fd.pth"
    assert torch.equal(teacher.extractor.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_explicit_weights_file_is_identified_by_hash(tmp_path):
    path = tmp_path / "my_resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    teacher = build_teacher("resnet18", weights_path=path)
    assert teacher.weights_id.startswith("my_resnet.pth sha256:")


def test_wrong_or_hostile_weights_file_is_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit"):
        build_teacher("resnet50", weights_path=wrong)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    hostile = tmp_path / "hostile.pth"
    torch.save({"x": Payload()}, hostile)
    with pytest.raises(WeightsError, match="cannot read"):
        build_teacher("resnet18", weights_path=hostile)


def test_lite0_loads_packaged_imagenet_weights():
    teacher = build_teacher("efficientnet_lite0", pretrained=True)
    assert teacher.weights_id == "efficientnet-lite0-57934424.pth"
    random = build_teacher("efficientnet_lite0", pretrained=False)
    stem = teacher.extractor.conv_stem.weight
    assert not torch.equal(stem, random.extractor.conv_stem.weight)
    # the packaged file's first tensor is the stem convolution: loaded by position
    from rd.teacher import lite0_weights_path

    source = torch.load(lite0_weights_path(), weights_only=True)
    assert torch.equal(stem, source["_conv_stem.weight"])
