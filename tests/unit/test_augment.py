"""In-distribution augmentation (rd.augment): named transforms, reproducible draws, and ``auto``
rejecting a transform that obviously leaves the normal distribution."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from rd.augment import TRANSFORMS, OneOf, augmentation, parse_augment, select_transforms
from rd.data import HALF, MVTecCategory, Preprocess
from rd.geometry import Geometry
from rd.teacher import build_teacher

PRE = Preprocess(64, HALF, HALF)


@pytest.fixture(scope="module")
def normals(tiny_mvtec):
    return MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).train_samples()


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("efficientnet_lite0")


def test_parse_augment() -> None:
    assert parse_augment("none") == []
    assert parse_augment("auto") is None
    assert parse_augment("hflip, blur,hflip") == ["hflip", "blur"]
    for bad in ("", "flip", "hflip,warp"):
        with pytest.raises(ValueError, match="--augment"):
            parse_augment(bad)


def test_transforms_are_reproducible_and_keep_the_size() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    for name, transform in TRANSFORMS.items():
        first, again = transform(image, 7), transform(image, 7)
        assert np.array_equal(np.asarray(first), np.asarray(again)), name
        if name != "rot90":
            assert first.size == image.size, name


def test_auto_rejects_a_transform_that_leaves_the_distribution(normals, teacher) -> None:
    candidates = {"brightness": TRANSFORMS["brightness"],
                  "invert": lambda image, seed: ImageOps.invert(image)}
    chosen = select_transforms(teacher, normals, PRE, Geometry(), candidates)
    assert chosen["kept"] == ["brightness"]
    invert = chosen["candidates"]["invert"]
    assert not invert["kept"] and invert["ratio"] > chosen["ratio_limit"]
    assert "as far from other normals" in invert["why"]


def test_augmentation_records_what_it_kept(normals, teacher) -> None:
    transforms, info = augmentation(teacher, normals, PRE, Geometry(), "auto")
    assert transforms[0] is None and len(transforms) == (2 if info["kept"] else 1)
    assert set(info["candidates"]) == set(TRANSFORMS)
    assert augmentation(teacher, normals, PRE, Geometry(), "none") == ([None], {"mode": "none"})
    listed, info = augmentation(teacher, normals, PRE, Geometry(), "vflip,hflip")
    assert info == {"mode": "list", "kept": ["vflip", "hflip"]}
    assert listed[0] is None and isinstance(listed[1], OneOf)
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    flips = {np.asarray(listed[1](image, seed)).tobytes() for seed in range(20)}
    assert flips == {np.asarray(TRANSFORMS[n](image, 0)).tobytes() for n in ("vflip", "hflip")}
