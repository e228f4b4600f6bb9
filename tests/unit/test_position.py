"""Position statistics (rd.position): exact moments (left-out ones too), a map that finds a
region normal images never show there, and a trained option that travels through the
checkpoint, predict, the native maps and the ONNX export while the image score stays RD's own,
or with --position-score takes the larger of RD's and theirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rd.checkpoints import CheckpointError, load_checkpoint, read_metadata, update_metadata
from rd.data import HALF, MVTecCategory, Preprocess
from rd.detector import load
from rd.geometry import Geometry, predict_native
from rd.position import (
    ENVELOPE_WEIGHT,
    LAYERS,
    PositionStatistics,
    _left_out_moments,
    distances,
    fit_envelope_statistics,
    fit_position_statistics,
    in_place_decision,
    pooled,
    z_map,
)
from rd.teacher import build_teacher
from rd.training import TrainConfig, train

SIZE = 64
PRE = Preprocess(SIZE, HALF, HALF)


def _grey_parts(count: int, seed: int) -> list[np.ndarray]:
    """A fixtured part: a bright square on the left, dark on the right, with sensor noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = np.full((SIZE, SIZE, 3), 60.0)
        image[8:40, 8:40] = 190.0
        image += rng.normal(0, 4, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("efficientnet_lite0")


def _batches(images: list[np.ndarray]):
    tensors = torch.stack([PRE(Image.fromarray(image)) for image in images])
    return lambda: iter(tensors.split(5))


def test_moments_equal_the_stacked_mean_and_variance(teacher) -> None:
    images = _grey_parts(12, seed=0)
    statistics, info = fit_position_statistics(teacher, _batches(images), SIZE)
    features = teacher(torch.cat(list(_batches(images)())))
    for index, layer in enumerate((0, 1)):
        cells = pooled(features[layer])
        var = cells.var(0)
        assert torch.allclose(getattr(statistics, f"mean{index}"), cells.mean(0), atol=1e-5)
        assert torch.allclose(getattr(statistics, f"var{index}"), var + 1e-3 * var.mean(),
                              rtol=1e-4, atol=1e-6)
    maps = statistics.raw_map(features, (SIZE, SIZE))
    assert info["images"] == 12 and info["map_mean"] == pytest.approx(float(maps.mean()),
                                                                      rel=1e-5)


def test_a_region_never_seen_there_stands_out(teacher) -> None:
    statistics, _ = fit_position_statistics(teacher, _batches(_grey_parts(16, seed=1)), SIZE)
    normal, moved = _grey_parts(2, seed=2)
    moved[8:40, 8:40] = 60  # the bright square is missing: each pixel alone looks normal
    moved[8:40, 24:56] = 190  # ... and it sits where normal parts are dark
    maps = statistics.raw_map(teacher(torch.stack([PRE(Image.fromarray(normal)),
                                                   PRE(Image.fromarray(moved))])), (SIZE, SIZE))
    assert float(maps[1].max()) > 5 * float(maps[0].max())
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[8:40, 8:56] = True
    assert float(maps[1][region].mean()) > 2 * float(maps[1][~region].mean())


def test_left_out_moments_equal_a_fit_without_the_image(teacher) -> None:
    """--position-score's reference: each image against the statistics of the others, from
    the full fit's sums, equals fitting again without it."""
    images = _grey_parts(7, seed=3)
    statistics, info = fit_position_statistics(teacher, _batches(images), SIZE)
    features = teacher(torch.cat(list(_batches(images)())))
    cells = [pooled(features[layer]).double() for layer in LAYERS]
    sums = [c.sum(0) for c in cells]
    squares = [(c ** 2).sum(0) for c in cells]
    floors = [1e-3 * c.var(0).mean() for c in cells]
    left_out = z_map([c.float() for c in cells],
                     _left_out_moments(cells, sums, squares, len(images), floors), (SIZE, SIZE))
    maxima = []
    for index in range(len(images)):
        others = images[:index] + images[index + 1:]
        refit, _ = fit_position_statistics(teacher, _batches(others), SIZE)
        alone = refit.raw_map([f[index:index + 1] for f in features], (SIZE, SIZE))[0]
        # the floor differs: a fraction of the full fit's variance, not the refit's
        assert torch.allclose(left_out[index], alone, rtol=0.05)
        maxima.append(float(left_out[index].max()))
    assert info["left_out_max"] == pytest.approx(max(maxima), rel=1e-5)
    assert info["left_out_spread"] == pytest.approx(np.std(maxima) / np.mean(maxima), rel=1e-4)
    # in-sample z-scores run low: the left-out ones are what new normal images show
    assert info["left_out_max"] > float(statistics.raw_map(features, (SIZE, SIZE)).max())


def test_fitting_needs_two_images(teacher) -> None:
    with pytest.raises(ValueError, match="two normal"):
        fit_position_statistics(teacher, _batches(_grey_parts(1, seed=0)), SIZE)


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("position") / "position.safetensors"
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         position_stats=True)
    train(category.train_samples(), config, out, progress=False)
    return category, out, Preprocess.from_dict(read_metadata(out)["preprocess"])


def test_the_checkpoint_carries_the_statistics_and_their_weight(trained) -> None:
    category, out, checkpoint_pre = trained
    meta = read_metadata(out)
    info = meta["position_stats"]
    assert meta["recipe"]["position_stats"] is True
    assert info["images"] == len(category.train_samples()) and info["weight"] > 0
    assert info["weight"] == pytest.approx(info["rd_mean"] / info["map_mean"])
    model, _ = load_checkpoint(out)
    assert model.position is not None
    assert float(model.position.weight) == pytest.approx(info["weight"])
    # the weight gives both maps the same mean over the normal training images
    batch = torch.stack([checkpoint_pre(s.path) for s in category.train_samples()])
    features = model.teacher(batch)
    added, score = model.position(features, (SIZE, SIZE))
    assert score is None  # without --position-score the image score is RD's
    assert float(added.mean()) == pytest.approx(info["rd_mean"], rel=1e-4)


def test_predict_adds_the_map_and_keeps_rd_score(trained) -> None:
    category, out, _ = trained
    detector = load(out, "cpu")
    paths = [s.path for s in category.test_samples()[:3]]
    with_stats = detector.predict_tensor(detector.to_batch(paths))
    statistics, detector.model.position = detector.model.position, None
    rd_only = detector.predict_tensor(detector.to_batch(paths))
    detector.model.position = statistics
    features = detector.model.teacher(detector.to_batch(paths))
    expected = rd_only.fused + statistics(features, (SIZE, SIZE))[0]
    assert torch.allclose(with_stats.fused, expected, atol=1e-6)
    assert torch.equal(with_stats.scores, rd_only.scores)
    assert torch.equal(with_stats.layer_maps, rd_only.layer_maps)
    assert bool((with_stats.fused > rd_only.fused).all())  # a squared distance is never < 0
    native = detector.predict_native(paths[0])  # the same map at the original size (64 px)
    assert torch.allclose(native.fused, with_stats.fused[0], atol=1e-5)
    assert native.score == pytest.approx(float(rd_only.scores[0]), abs=1e-6)


def test_the_onnx_graph_carries_the_statistics(trained, tmp_path) -> None:
    from rd.export import TOLERANCE, export_onnx, verify_onnx

    category, out, _ = trained
    detector = load(out, "cpu")
    path = export_onnx(detector, tmp_path / "position.onnx")
    batch = detector.to_batch([s.path for s in category.test_samples()[:2]])
    assert max(verify_onnx(path, detector, batch).values()) <= TOLERANCE


def test_native_geometries_add_the_whole_image_map(trained, tmp_path) -> None:
    category, out, checkpoint_pre = trained
    model, _ = load_checkpoint(out)
    wide = tmp_path / "wide.png"
    Image.open(category.test_samples()[0].path).convert("RGB").resize((160, 64)).save(wide)
    geometry = Geometry("letterbox")
    with_stats = predict_native(model, wide, checkpoint_pre, geometry)
    statistics, model.position = model.position, None
    rd_only = predict_native(model, wide, checkpoint_pre, geometry)
    features = model.teacher(checkpoint_pre(wide).unsqueeze(0))
    square = statistics(features, (SIZE, SIZE))[0]
    expected = torch.nn.functional.interpolate(square[:, None], size=(64, 160),
                                               mode="bilinear", align_corners=False)[0, 0]
    assert with_stats.fused.shape == (64, 160)
    assert torch.allclose(with_stats.fused, rd_only.fused + expected, atol=1e-5)
    assert with_stats.score == rd_only.score


def test_export_refuses_statistics_with_tiles(trained, tmp_path) -> None:
    from rd.export import ExportError, export_onnx

    _, out, _ = trained
    tiled = tmp_path / "tiled.safetensors"
    tiled.write_bytes(out.read_bytes())
    update_metadata(tiled, {"geometry": Geometry("tile").to_dict()})
    with pytest.raises(ExportError, match="position statistics"):
        export_onnx(load(tiled, "cpu"), tmp_path / "tiled.onnx")


def test_fine_tuning_from_a_checkpoint_with_statistics_leaves_them(trained, tmp_path) -> None:
    """--init takes the student only: the statistics belong to the images they were fitted
    on (loading them into a model without any failed the strict state-dict load)."""
    category, out, _ = trained
    tuned = tmp_path / "tuned.safetensors"
    model = train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1,
                                                        batch_size=4, device="cpu",
                                                        init=str(out)),
                  tuned, progress=False).model
    assert model.position is None and "position_stats" not in read_metadata(tuned)


def test_statistics_without_their_tensors_are_refused(trained, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _, out, _ = trained
    broken = tmp_path / "broken.safetensors"
    tensors = {k: v for k, v in load_file(str(out)).items() if k != "position.var1"}
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        header = handle.metadata()
    save_file(tensors, str(broken), metadata=header)
    with pytest.raises(CheckpointError, match="position statistics"):
        load_checkpoint(broken)


def test_statistics_tensors_without_the_option_are_refused(trained, tmp_path) -> None:
    _, out, _ = trained
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(out.read_bytes())
    update_metadata(stray, {"position_stats": None})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(stray)


def test_the_statistics_module_rebuilds_from_its_tensors() -> None:
    statistics = PositionStatistics([(4, 8, 8), (6, 4, 4)])
    statistics.mean1.fill_(2.0)
    again = PositionStatistics.from_tensors(statistics.state_dict())
    again.load_state_dict(statistics.state_dict())
    assert (again.var0.shape, again.var1.shape) == ((4, 8, 8), (6, 4, 4))
    assert float(again.mean1[0, 0, 0]) == 2.0


@pytest.fixture(scope="module")
def paper(tiny_mvtec, tmp_path_factory):
    """The paper's checkpoint of the same data and seed as ``trained`` and ``scored``."""
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("paper") / "paper.safetensors"
    train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1, batch_size=4,
                                                device="cpu"), out, progress=False)
    return out


def _assert_added_equals_trained(paper, trained_out, category, added, *flags: str) -> None:
    """``add-position-stats FLAGS`` onto ``paper`` writes the tensors, statistics and recipe
    of training with the same flags (``trained_out``)."""
    from safetensors.torch import load_file

    from rd.cli import main

    assert main(["add-position-stats", "--checkpoint", str(paper), "--data",
                 str(category.root), "--category", category.category, "--out", str(added),
                 *flags, "--device", "cpu"]) == 0
    expected, got = load_file(str(trained_out)), load_file(str(added))
    assert sorted(expected) == sorted(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    info = read_metadata(trained_out)["position_stats"]
    assert read_metadata(added)["position_stats"] == pytest.approx(info, rel=1e-6)  # batch sums
    assert read_metadata(added)["recipe"] == read_metadata(trained_out)["recipe"]


def test_added_to_a_trained_checkpoint_equals_training_with_them(trained, paper, tmp_path,
                                                                capsys) -> None:
    """The statistics leave the student as it is: fitting them onto the paper's checkpoint
    gives the tensors and weight of training with --position-stats."""
    from rd.cli import main

    category, out, _ = trained
    added = tmp_path / "added.safetensors"
    _assert_added_equals_trained(paper, out, category, added)
    assert main(["add-position-stats", "--checkpoint", str(added), "--data",
                 str(category.root), "--category", category.category, "--out",
                 str(tmp_path / "twice.safetensors"), "--device", "cpu"]) != 0
    assert "already has position statistics" in capsys.readouterr().err
    assert not (tmp_path / "twice.safetensors").exists()


def test_the_command_line_trains_the_fixtured_preset_and_predicts(tmp_path, capsys) -> None:
    """--preset fixtured on a non-square category: multiscale views, augmentation, the weight
    average and position statistics train, evaluate at native size and predict."""
    import json

    from rd.cli import main
    from rd.data import generate_dataset

    root = generate_dataset(tmp_path / "data", ["metal_strip"], n_train=3, n_test_good=1,
                            n_per_defect=1)
    out = tmp_path / "strip.safetensors"
    assert main(["train", "--data", str(root), "--category", "metal_strip", "--out", str(out),
                 "--epochs", "1", "--batch-size", "2", "--image-size", "64", "--device", "cpu",
                 "--preset", "fixtured", "--tile-scale", "0.25", "--quiet"]) == 0
    meta = read_metadata(out)
    assert meta["recipe"]["position_stats"] is True and meta["geometry"]["mode"] == "multiscale"
    assert meta["position_stats"]["weight"] > 0 and meta["metrics"]["pixel_auroc"] is not None
    assert meta["position_stats"]["score"] is True and meta["position_stats"]["score_weight"] > 0
    rows = tmp_path / "scores.jsonl"
    test_image = next((root / "metal_strip" / "test").rglob("*.png"))
    assert main(["predict", "--checkpoint", str(out), "--device", "cpu", "--jsonl", str(rows),
                 str(test_image)]) == 0
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["score"] > 0 and row.get("error") is None


@pytest.fixture(scope="module")
def scored(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("position_score") / "scored.safetensors"
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         position_stats=True, position_score=True)
    train(category.train_samples(), config, out, progress=False)
    return category, out


def test_position_score_takes_the_larger_score_in_rd_units(scored) -> None:
    category, out = scored
    info = read_metadata(out)["position_stats"]
    assert info["score"] is True and read_metadata(out)["recipe"]["position_score"] is True
    assert info["score_weight"] == pytest.approx(info["rd_score_max"] / info["left_out_max"])
    detector = load(out, "cpu")
    assert detector.model.position.score_weight == pytest.approx(info["score_weight"])
    paths = [s.path for s in category.test_samples()]
    batch = detector.to_batch(paths)
    both = detector.predict_tensor(batch)
    statistics, detector.model.position = detector.model.position, None
    rd_only = detector.predict_tensor(batch)
    detector.model.position = statistics
    raw = statistics.raw_map(detector.model.teacher(batch), (SIZE, SIZE)).flatten(1).amax(1)
    expected = torch.maximum(rd_only.scores, info["score_weight"] * raw)
    assert torch.allclose(both.scores, expected, atol=1e-6)
    wins = both.scores > rd_only.scores  # both branches of the maximum are exercised
    assert bool(wins.any()) and not bool(wins.all())
    assert torch.allclose(both.fused, rd_only.fused + statistics(
        detector.model.teacher(batch), (SIZE, SIZE))[0], atol=1e-6)
    for index, path in enumerate(paths[:2]):  # the native path scores the same way
        assert detector.predict_native(path).score == pytest.approx(float(both.scores[index]),
                                                                    abs=1e-5)


def test_the_onnx_graph_carries_the_position_score(scored, tmp_path) -> None:
    from rd.export import TOLERANCE, export_onnx, verify_onnx

    category, out = scored
    detector = load(out, "cpu")
    path = export_onnx(detector, tmp_path / "scored.onnx")
    batch = detector.to_batch([s.path for s in category.test_samples()[:3]])
    assert max(verify_onnx(path, detector, batch).values()) <= TOLERANCE
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["rd.position_score"] == "true"


def test_a_damaged_score_weight_is_refused(scored, tmp_path) -> None:
    _, out = scored
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(out.read_bytes())
    info = dict(read_metadata(out)["position_stats"], score_weight=-1.0)
    update_metadata(broken, {"position_stats": info})
    with pytest.raises(CheckpointError, match="score_weight"):
        load_checkpoint(broken)


def test_position_score_needs_the_statistics_and_three_images(tiny_mvtec, tmp_path) -> None:
    from rd.training import TrainingError

    with pytest.raises(TrainingError, match="add --position-stats"):
        TrainConfig(position_score=True).validate()
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=2, device="cpu",
                         position_stats=True, position_score=True)
    with pytest.raises(TrainingError, match="three normal training images"):
        train(category.train_samples()[:2], config, tmp_path / "two.safetensors",
              progress=False)


def test_added_score_equals_training_with_it(scored, paper, tmp_path) -> None:
    category, out = scored
    _assert_added_equals_trained(paper, out, category, tmp_path / "added.safetensors",
                                 "--position-score")


def _moving_parts(count: int, seed: int) -> list[np.ndarray]:
    """The same part as ``_grey_parts``, placed anywhere: a part that does not lie in place."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = np.full((SIZE, SIZE, 3), 60.0)
        top, left = rng.integers(0, 32, 2)
        image[top:top + 32, left:left + 32] = 190.0
        image += rng.normal(0, 4, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def test_the_spread_of_left_out_maxima_tells_parts_in_place_from_moving_ones(teacher) -> None:
    """--position-stats auto's measure: the coefficient of variation of the left-out maxima,
    low where the part lies in place and high where it moves."""
    decisions = {}
    for name, images in (("in place", _grey_parts(12, seed=1)),
                         ("moving", _moving_parts(12, seed=1))):
        _, info = fit_position_statistics(teacher, _batches(images), SIZE)
        decisions[name] = in_place_decision(info)
    assert decisions["in place"]["kept"] and not decisions["moving"]["kept"]
    assert decisions["moving"]["left_out_spread"] > 3 * decisions["in place"]["left_out_spread"]
    assert "left out" in decisions["moving"]["why"]
    few = in_place_decision({"left_out_spread": None, "images": 2})
    assert not few["kept"] and "three normal training images" in few["why"]


@pytest.mark.parametrize("max_spread", [0.0, 100.0])
def test_auto_keeps_the_statistics_only_when_the_parts_lie_in_place(
        tiny_mvtec, tmp_path, monkeypatch, max_spread) -> None:
    """Left out, the checkpoint is the paper's model with the decision recorded; kept, it is
    the --position-stats checkpoint (with the score asked for) with the decision beside it."""
    monkeypatch.setattr("rd.position.IN_PLACE_MAX_SPREAD", max_spread)
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         position_stats="auto", position_score=True)
    out = tmp_path / "auto.safetensors"
    train(category.train_samples(), config, out, progress=False)
    meta = read_metadata(out)
    decision = meta["position_auto"]
    assert meta["recipe"]["position_stats"] == "auto"
    assert decision["max_spread"] == max_spread and decision["left_out_spread"] > 0
    model, _ = load_checkpoint(out)
    if max_spread == 0.0:
        assert decision["kept"] is False and "left out" in decision["why"]
        assert model.position is None and "position_stats" not in meta
    else:
        assert decision["kept"] is True
        assert model.position is not None and model.position.score_weight > 0
        assert meta["position_stats"]["left_out_spread"] == decision["left_out_spread"]


# --position-stats envelope: the augmented copies in the fit, only the excess over every normal


def _groups(images: list[np.ndarray], transforms: tuple[str, ...] = ()):
    """Each image with one copy per transform, as the training path builds them."""
    from rd.augment import TRANSFORMS

    def groups():
        for index, image in enumerate(images):
            picture = Image.fromarray(image)
            copies = [TRANSFORMS[name](picture, index * 1009 + 1 + offset)
                      for offset, name in enumerate(transforms)]
            yield torch.stack([PRE(member) for member in (picture, *copies)])
    return groups


def test_the_envelope_is_the_largest_distance_a_left_out_normal_reaches(teacher) -> None:
    """Each cell's envelope is the largest distance any normal image reaches against the
    statistics of the others (refitted here without it), so the map is 0 on every one."""
    images = _grey_parts(6, seed=4)
    statistics, info = fit_envelope_statistics(teacher, _groups(images))
    assert statistics.envelope and info["mode"] == "envelope"
    assert info["images"] == 6 and info["copies"] == 0 and info["transforms"] == []
    plain, _ = fit_position_statistics(teacher, _batches(images), SIZE)
    for index in range(len(LAYERS)):  # the same moments as the plain fit (other batches)
        assert torch.allclose(getattr(statistics, f"mean{index}"),
                              getattr(plain, f"mean{index}"), rtol=1e-4, atol=1e-4)
    features = teacher(torch.cat(list(_batches(images)())))
    reached = None
    for index in range(len(images)):
        refit, _ = fit_position_statistics(
            teacher, _batches(images[:index] + images[index + 1:]), SIZE)
        cells = [pooled(features[layer][index:index + 1]) for layer in LAYERS]
        alone = distances(cells, refit.moments())
        reached = alone if reached is None else [torch.maximum(a, b)
                                                 for a, b in zip(reached, alone, strict=True)]
    for bound, expected in zip(statistics.envelopes(), reached, strict=True):
        # the variance floor differs (the full fit's, not the refit's): a few per cent
        assert torch.allclose(bound, expected, rtol=0.05)
    assert float(statistics.raw_map(features, (SIZE, SIZE)).max()) < 0.05


def test_the_envelope_map_shows_a_region_never_seen_there(teacher) -> None:
    statistics, _ = fit_envelope_statistics(teacher, _groups(_grey_parts(16, seed=1)))
    normal, moved = _grey_parts(2, seed=2)
    moved[8:40, 8:40] = 60
    moved[8:40, 24:56] = 190
    maps = statistics.raw_map(teacher(torch.stack([PRE(Image.fromarray(normal)),
                                                   PRE(Image.fromarray(moved))])), (SIZE, SIZE))
    assert float(maps[1].max()) > 100 * float(maps[0].max())
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[8:40, 8:56] = True
    assert float(maps[1][region].mean()) > 2 * float(maps[1][~region].mean())


def test_copies_in_the_fit_take_their_variation_as_normal(teacher) -> None:
    """A part that may lie turned (rot90 kept by --augment) is modelled turned too: a turned
    normal part then stays under the envelope, where the fit without copies flags it."""
    images = _grey_parts(12, seed=5)
    turned = np.ascontiguousarray(np.rot90(_grey_parts(1, seed=6)[0]))
    features = teacher(PRE(Image.fromarray(turned)).unsqueeze(0))
    maxima = {}
    for transforms in ((), ("rot90",)):
        statistics, info = fit_envelope_statistics(teacher, _groups(images, transforms),
                                                   transforms=transforms)
        assert info["copies"] == 12 * len(transforms) and info["transforms"] == list(transforms)
        maxima[transforms] = float(statistics.raw_map(features, (SIZE, SIZE)).max())
    assert maxima[()] > 1.0 and maxima[("rot90",)] < 0.2 * maxima[()]


def test_the_envelope_fit_needs_three_images(teacher) -> None:
    with pytest.raises(ValueError, match="three normal"):
        fit_envelope_statistics(teacher, _groups(_grey_parts(2, seed=0)))


@pytest.fixture(scope="module")
def enveloped(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("envelope") / "envelope.safetensors"
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         augment="hflip", position_stats="envelope")
    train(category.train_samples(), config, out, progress=False)
    return category, out


def test_envelope_statistics_travel_through_checkpoint_predict_and_onnx(enveloped,
                                                                        tmp_path) -> None:
    from rd.export import TOLERANCE, export_onnx, verify_onnx

    category, out = enveloped
    meta = read_metadata(out)
    info = meta["position_stats"]
    assert meta["recipe"]["position_stats"] == "envelope"
    assert info["mode"] == "envelope" and info["transforms"] == ["hflip"]
    assert info["copies"] == info["images"] == len(category.train_samples())
    assert info["weight"] == pytest.approx(ENVELOPE_WEIGHT * info["rd_score_max"])
    detector = load(out, "cpu")
    statistics = detector.model.position
    assert statistics.envelope and float(statistics.weight) == pytest.approx(info["weight"])
    batch = detector.to_batch([s.path for s in category.test_samples()[:3]])
    with_stats = detector.predict_tensor(batch)
    detector.model.position = None
    rd_only = detector.predict_tensor(batch)
    detector.model.position = statistics
    added, score = statistics(detector.model.teacher(batch), (SIZE, SIZE))
    assert score is None and torch.equal(with_stats.scores, rd_only.scores)
    assert torch.allclose(with_stats.fused, rd_only.fused + added, atol=1e-6)
    assert bool((added >= 0).all())  # an excess is never negative: it only adds
    path = export_onnx(detector, tmp_path / "envelope.onnx")
    assert max(verify_onnx(path, detector, batch).values()) <= TOLERANCE


def test_envelope_added_to_a_trained_checkpoint_equals_training_with_it(
        enveloped, tiny_mvtec, tmp_path) -> None:
    """add-position-stats --envelope takes the copies of the transforms the checkpoint's
    augmentation kept: the tensors of training with --position-stats envelope."""
    category, out = enveloped
    student = tmp_path / "student.safetensors"
    train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1, batch_size=4,
                                                device="cpu", augment="hflip"),
          student, progress=False)
    _assert_added_equals_trained(student, out, category, tmp_path / "added.safetensors",
                                 "--envelope")


def test_envelope_refuses_the_position_score(tiny_mvtec, capsys) -> None:
    from rd.cli import main
    from rd.training import TrainingError

    with pytest.raises(TrainingError, match="does not combine"):
        TrainConfig(position_stats="envelope", position_score=True).validate()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tiny_mvtec.root), "--category", tiny_mvtec.category,
              "--out", "never.safetensors", "--position-stats", "sometimes"])
    assert "'envelope'" in capsys.readouterr().err


# --position-stats adaptive: auto's plain statistics where the parts lie in place, the envelope
# elsewhere


@pytest.mark.parametrize("max_spread", [0.0, 100.0])
def test_adaptive_fits_the_envelope_where_auto_would_leave_the_statistics_out(
        tiny_mvtec, tmp_path, monkeypatch, max_spread) -> None:
    """Kept, the checkpoint is the --position-stats one (the score as asked); left out, it
    carries the envelope instead, the score stays RD's, and the decision says so."""
    monkeypatch.setattr("rd.position.IN_PLACE_MAX_SPREAD", max_spread)
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         augment="hflip", position_stats="adaptive", position_score=True)
    out = tmp_path / "adaptive.safetensors"
    train(category.train_samples(), config, out, progress=False)
    meta = read_metadata(out)
    decision, info = meta["position_auto"], meta["position_stats"]
    assert meta["recipe"]["position_stats"] == "adaptive"
    model, _ = load_checkpoint(out)
    if max_spread == 0.0:
        assert decision["kept"] is False and decision["why"].endswith("the envelope instead")
        assert info["mode"] == "envelope" and info["transforms"] == ["hflip"]
        assert model.position.envelope and model.position.score_weight is None
    else:
        assert decision["kept"] is True and "mode" not in info and info["score"] is True
        assert not model.position.envelope and model.position.score_weight > 0


def test_adaptive_added_to_a_trained_checkpoint_equals_training_with_it(
        tiny_mvtec, tmp_path, monkeypatch) -> None:
    """add-position-stats --adaptive decides as training does and writes its tensors."""
    monkeypatch.setattr("rd.position.IN_PLACE_MAX_SPREAD", 0.0)  # the envelope branch
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    options = dict(image_size=SIZE, epochs=1, batch_size=4, device="cpu", augment="hflip")
    student, trained = tmp_path / "student.safetensors", tmp_path / "trained.safetensors"
    train(category.train_samples(), TrainConfig(**options), student, progress=False)
    train(category.train_samples(), TrainConfig(**options, position_stats="adaptive"), trained,
          progress=False)
    _assert_added_equals_trained(student, trained, category, tmp_path / "added.safetensors",
                                 "--adaptive")
    assert read_metadata(tmp_path / "added.safetensors")["position_auto"] == (
        read_metadata(trained)["position_auto"])


def test_adaptive_with_two_images_leaves_the_statistics_out_as_auto_does(tiny_mvtec,
                                                                         tmp_path) -> None:
    """Too few images to judge, or to fit an envelope: the checkpoint is RD's, and says why;
    adding them afterwards, which would add nothing, is refused with that reason."""
    from rd.training import TrainingError, add_position_statistics

    samples = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).train_samples()[:2]
    out = tmp_path / "two.safetensors"
    train(samples, TrainConfig(image_size=SIZE, epochs=1, batch_size=2, device="cpu",
                               position_stats="adaptive"), out, progress=False)
    meta = read_metadata(out)
    assert "position_stats" not in meta and load_checkpoint(out)[0].position is None
    assert "three normal training images" in meta["position_auto"]["why"]
    with pytest.raises(TrainingError, match=r"no position statistics fitted: .*three normal"):
        add_position_statistics(out, samples, tmp_path / "x.safetensors", "cpu",
                                mode="adaptive")
    with pytest.raises(TrainingError, match="on, envelope or adaptive, got 'auto'"):
        add_position_statistics(out, samples, tmp_path / "x.safetensors", "cpu", mode="auto")
