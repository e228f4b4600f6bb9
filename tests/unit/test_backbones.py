"""The torch-free registry of teachers (rd.backbones); the networks are tested in
test_teacher.py."""

import pytest

from rd.backbones import get_backbone, list_backbones


def test_registry_lists_all_teachers():
    assert list_backbones() == ["efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2"]
    with pytest.raises(ValueError, match="choose one of"):
        get_backbone("vgg16")
