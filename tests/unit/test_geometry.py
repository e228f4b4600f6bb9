"""Input geometry (rd.geometry): letterbox and tile keep the paper's numbers where they coincide
with it, never let padding raise a score, and give maps at the original image size."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rd.data import HALF, ImageDataset, Preprocess, Sample
from rd.geometry import (
    Geometry,
    GeometryDataset,
    letterbox_box,
    masked_blur,
    masked_distillation_loss,
    masked_scores,
    predict_native,
    tile_starts,
    training_dataset,
)
from rd.losses import reverse_distillation_loss
from rd.maps import fuse, gaussian_blur, layer_maps
from rd.model import build_model

SIZE = 64
PRE = Preprocess(SIZE, HALF, HALF)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0").eval()


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(60, 200, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    big = Image.fromarray(smooth).resize((width, height), Image.Resampling.BILINEAR)
    return Image.fromarray(np.asarray(big))


def test_tile_starts_cover_the_axis_with_overlap() -> None:
    assert tile_starts(64, 64, 0.25) == [0]
    assert tile_starts(40, 64, 0.25) == [0]
    starts = tile_starts(300, 64, 0.25)
    assert starts[0] == 0 and starts[-1] == 300 - 64
    assert all(b - a <= 48 for a, b in itertools.pairwise(starts))
    assert tile_starts(128, 64, 0.0) == [0, 64]


def test_letterbox_box_keeps_the_aspect_ratio() -> None:
    assert letterbox_box(256, 1024, 64) == (24, 0, 16, 64)
    assert letterbox_box(100, 100, 64) == (0, 0, 64, 64)


def test_masked_blur_is_the_plain_blur_where_all_is_valid_and_ignores_padding() -> None:
    maps = torch.rand(1, 40, 50)
    assert torch.equal(masked_blur(maps, torch.ones(1, 40, 50)), gaussian_blur(maps))
    valid = torch.zeros(1, 40, 50)
    valid[:, 10:30] = 1
    garbage = maps.clone()
    garbage[valid == 0] = 1e6
    clean = maps * valid
    assert torch.allclose(masked_blur(garbage, valid), masked_blur(clean, valid))
    assert masked_scores(masked_blur(garbage, valid), valid) == masked_scores(
        masked_blur(clean, valid), valid)


def test_letterbox_padding_never_raises_a_score(model) -> None:
    """The score is the maximum over the image's pixels only: however anomalous the padding
    looks to the model, it cannot raise the score, and the map comes back at the image's size."""
    image = picture(32, 128)
    geometry = Geometry("letterbox")
    native = predict_native(model, image, PRE, geometry)
    assert tuple(native.fused.shape) == (32, 128)
    assert tuple(native.layer_maps.shape) == (3, 32, 128)
    inputs = geometry.inputs(image, PRE)
    with torch.no_grad():
        features, rebuilt = model(inputs.images)
    fused = fuse(layer_maps(features, rebuilt, (SIZE, SIZE)))
    valid = inputs.valid[:, 0]
    assert native.score == pytest.approx(float(masked_scores(masked_blur(fused, valid), valid)))
    padded = fused.clone()
    padded[valid == 0] = 100.0  # the padding as anomalous as it gets
    assert float(masked_scores(masked_blur(padded, valid), valid)) == pytest.approx(native.score)
    assert float(gaussian_blur(padded).flatten(1).amax(1)) > native.score  # unmasked it would


def test_one_tile_is_the_paper_single_pass(model) -> None:
    """An image of the model's size is one tile: the maps are the single pass's, bit for bit."""
    image = picture(SIZE, SIZE, seed=3)
    tiled = predict_native(model, image, PRE, Geometry("tile"))
    single = model.predict(PRE(image).unsqueeze(0))
    assert torch.equal(tiled.layer_maps, single.layer_maps[0])
    assert torch.equal(tiled.fused, single.fused[0])
    assert tiled.score == float(single.scores[0])


def test_multiscale_averages_tiles_and_the_whole_image(model) -> None:
    square = picture(SIZE, SIZE, seed=3)  # one tile = the whole image: the single pass
    single = model.predict(PRE(square).unsqueeze(0))
    both = predict_native(model, square, PRE, Geometry("multiscale"))
    assert torch.equal(both.layer_maps, single.layer_maps[0])
    assert len(Geometry("multiscale").inputs(square, PRE).images) == 1  # trained once, too
    wide = picture(SIZE, 2 * SIZE, seed=4)
    geometry = Geometry("multiscale", overlap=0.0)
    inputs = geometry.inputs(wide, PRE)
    assert len(inputs.images) == 3  # two tiles and the letterboxed whole, to train on
    tiled = predict_native(model, wide, PRE, Geometry("tile", overlap=0.0))
    boxed = predict_native(model, wide, PRE, Geometry("letterbox"))
    mixed = predict_native(model, wide, PRE, geometry)
    assert torch.allclose(mixed.layer_maps, (tiled.layer_maps + boxed.layer_maps) / 2,
                          atol=1e-6)


def test_multiscale_blurs_each_view_at_its_own_scale(model) -> None:
    """The heat map is the mean of the tiles' map blurred at canvas scale and the whole view's
    blurred at the model's resolution (then brought to the image's size); the score its max."""
    wide = picture(SIZE, 2 * SIZE, seed=4)
    tiled = predict_native(model, wide, PRE, Geometry("tile", overlap=0.0))
    boxed = predict_native(model, wide, PRE, Geometry("letterbox"))
    mixed = predict_native(model, wide, PRE, Geometry("multiscale", overlap=0.0))
    assert torch.allclose(mixed.fused, (tiled.fused + boxed.fused) / 2, atol=1e-6)
    assert mixed.score == pytest.approx(float(mixed.fused.max()), abs=1e-6)
    blurred_once = gaussian_blur(fuse(mixed.layer_maps[None]))[0]
    assert not torch.allclose(mixed.fused, blurred_once, atol=1e-4)  # not the old rule


def test_multiscale_checkpoints_from_before_keep_their_rule(model) -> None:
    """A multiscale checkpoint that records no ``combine`` predates the per-view blur: its
    layers are averaged, then fused and blurred once, as when its numbers were measured."""
    old = Geometry.from_metadata({"geometry": {"mode": "multiscale", "tile_scale": 1.0,
                                               "overlap": 0.0}})
    assert old.combine == "layers"
    assert Geometry("multiscale").to_dict()["combine"] == "smoothed"
    assert Geometry.from_metadata({"geometry": Geometry("multiscale").to_dict()}) == \
        Geometry("multiscale")
    assert "combine" not in Geometry("tile").to_dict()
    wide = picture(SIZE, 2 * SIZE, seed=4)
    maps = predict_native(model, wide, PRE, old)
    assert torch.allclose(maps.fused, gaussian_blur(fuse(maps.layer_maps[None]))[0], atol=1e-6)
    with pytest.raises(ValueError, match="multiscale combination"):
        Geometry("multiscale", combine="max")


def test_tiles_stitch_to_the_maps_of_each_tile(model) -> None:
    """Without overlap, the stitched per-layer maps of a 64x128 image are each tile's own."""
    image = picture(SIZE, 2 * SIZE, seed=4)
    stitched = predict_native(model, image, PRE, Geometry("tile", overlap=0.0))
    for index, left in enumerate((0, SIZE)):
        crop = image.crop((left, 0, left + SIZE, SIZE))
        single = model.predict(PRE(crop).unsqueeze(0))
        part = stitched.layer_maps[:, :, left:left + SIZE]
        assert torch.allclose(part, single.layer_maps[0], atol=1e-6), index
    assert tuple(stitched.fused.shape) == (SIZE, 2 * SIZE)


def test_overlapping_tiles_average(model) -> None:
    image = picture(SIZE, SIZE + 16, seed=5)
    geometry = Geometry("tile", overlap=0.5)
    inputs = geometry.inputs(image, PRE)
    assert inputs.corners == [(0, 0), (0, 16)]
    stitched = predict_native(model, image, PRE, geometry)
    with torch.no_grad():
        features, rebuilt = model(inputs.images)
    per_tile = layer_maps(features, rebuilt, (SIZE, SIZE))
    middle = (per_tile[0, :, :, 16:SIZE] + per_tile[1, :, :, :SIZE - 16]) / 2
    assert torch.allclose(stitched.layer_maps[:, :, 16:SIZE], middle, atol=1e-6)


def test_tile_scale_and_padding_of_small_images(model) -> None:
    image = picture(48, 200, seed=6)
    native = predict_native(model, image, PRE, Geometry("tile", tile_scale=0.5))
    assert tuple(native.fused.shape) == (48, 200)
    inputs = Geometry("tile", tile_scale=0.5).inputs(image, PRE)
    assert inputs.content == (24, 100) and inputs.canvas == (SIZE, 100)
    assert float(inputs.valid[:, :, 24:].sum()) == 0  # the rows below the image are padding


def test_the_paper_dataset_is_unchanged(tmp_path) -> None:
    path = tmp_path / "a.png"
    picture(SIZE, SIZE).save(path)
    samples = [Sample(path, 0, "good")]
    assert type(training_dataset(samples, PRE, Geometry())) is ImageDataset
    letterbox = training_dataset(samples, PRE, Geometry("letterbox"))
    assert isinstance(letterbox, GeometryDataset)
    # a square image letterboxed is the paper's squashed input, all of it valid
    assert torch.equal(letterbox[0]["image"], ImageDataset(samples, PRE)[0]["image"])
    assert bool((letterbox[0]["valid"] == 1).all())


def test_tile_dataset_lists_every_tile(tmp_path) -> None:
    path = tmp_path / "wide.png"
    picture(SIZE, 3 * SIZE).save(path)
    dataset = training_dataset([Sample(path, 0, "good")], PRE, Geometry("tile"))
    assert len(dataset) == len(tile_starts(3 * SIZE, SIZE, 0.25))
    assert dataset[1]["image"].shape == (3, SIZE, SIZE)


def test_masked_loss_is_the_reference_loss_when_all_is_valid() -> None:
    torch.manual_seed(1)
    teacher = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8)]
    student = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8)]
    ones = torch.ones(2, 1, SIZE, SIZE)
    assert torch.equal(masked_distillation_loss(teacher, student, ones),
                       reverse_distillation_loss(teacher, student))
    half = ones.clone()
    half[..., SIZE // 2:] = 0
    moved = [s.clone() for s in student]
    for s in moved:
        s[..., s.shape[-1] // 2:] = 50.0  # the student's padding output does not count
    assert torch.allclose(masked_distillation_loss(teacher, moved, half),
                          masked_distillation_loss(teacher, student, half))


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        Geometry("stretch")
    with pytest.raises(ValueError, match="tile scale"):
        Geometry("tile", tile_scale=0)


def test_command_line_trains_and_evaluates_a_tiled_model(tmp_path, capsys) -> None:
    from rd.checkpoints import read_metadata
    from rd.cli import main
    from rd.data import generate_dataset

    root = generate_dataset(tmp_path / "data", ["metal_strip"], n_train=2, n_test_good=1,
                            n_per_defect=1)
    out = tmp_path / "strip.safetensors"
    assert main(["train", "--data", str(root), "--category", "metal_strip", "--out", str(out),
                 "--epochs", "1", "--batch-size", "2", "--image-size", "64", "--device", "cpu",
                 "--resize", "tile", "--tile-scale", "0.25", "--no-evaluate", "--quiet"]) == 0
    meta = read_metadata(out)
    assert meta["geometry"]["mode"] == "tile" and meta["recipe"]["resize"] == "tile"
    report = tmp_path / "report.json"
    assert main(["evaluate", "--data", str(root), "--category", "metal_strip", "--checkpoint",
                 str(out), "--device", "cpu", "--eval-size", "native", "--json", str(report),
                 "--quiet"]) == 0
    written = json.loads(report.read_text())
    assert written["eval_size"] == "native" and written["pixel_auroc"] is not None
