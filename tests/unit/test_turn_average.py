"""``--turn-average``: RD's maps averaged over each image's four quarter turns. The averaged
maps turn with the image; ``auto`` keeps it for parts that lie at any angle and leaves it out
for parts that lie one way; the option travels through training, the checkpoint (a format
version older readers refuse), the native maps, ONNX export and ``add-turn-average``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rd.augment import judge_turns
from rd.checkpoints import CheckpointError, load_checkpoint, read_metadata, update_metadata
from rd.data import HALF, MVTecCategory, Preprocess, Sample
from rd.detector import load
from rd.geometry import Geometry, predict_native
from rd.maps import layer_maps
from rd.model import build_model
from rd.teacher import build_teacher
from rd.training import TrainConfig, TrainingError, train

SIZE = 64
PRE = Preprocess(SIZE, HALF, HALF)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0").eval()


def test_the_maps_are_the_mean_of_the_four_turns_turned_back(model) -> None:
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    model.turn_average = True
    try:
        features, averaged = model.rd_maps(images)
        turned_input = model.rd_maps(images.rot90(1, (-2, -1)))[1]
    finally:
        model.turn_average = False
    with torch.no_grad():
        expected = sum(layer_maps(*model(images.rot90(k, (-2, -1))), (SIZE, SIZE))
                       .rot90(-k, (-2, -1)) for k in range(4)) / 4
        plain_features = model.teacher(images)
    assert torch.allclose(averaged, expected, atol=1e-6)
    # the average turns with the image: a part lying turned gets the same map, turned
    assert torch.allclose(turned_input, averaged.rot90(1, (-2, -1)), atol=1e-5)
    # the features are the unturned images' (what the position statistics model)
    for ours, theirs in zip(features, plain_features, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(averaged, model.rd_maps(images)[1], atol=1e-3)


def _turned_plates(folder, turns: bool, count: int = 8) -> list[Sample]:
    """Plates with a notch: at any angle (``turns``), or always notch up over a bright band
    along the top (parts that lie one way)."""
    rng = np.random.default_rng(3)
    samples = []
    for index in range(count):
        image = Image.new("L", (SIZE, SIZE), 40)
        draw = ImageDraw.Draw(image)
        if not turns:
            draw.rectangle((0, 0, SIZE, 12), fill=230)
        draw.polygon([(18, 18), (46, 18), (46, 46), (18, 46)], fill=170)
        draw.rectangle((28, 18, 36, 26), fill=40)
        angle = float(rng.uniform(0, 360)) if turns else float(rng.uniform(-3, 3))
        image = image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=40)
        pixels = np.asarray(image, np.float32) + rng.normal(0, 4, (SIZE, SIZE))
        path = folder / f"{'turns' if turns else 'upright'}_{index}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB").save(path)
        samples.append(Sample(path, 0, "good"))
    return samples


def test_auto_keeps_parts_at_any_angle_and_leaves_upright_parts_out(tmp_path) -> None:
    teacher = build_teacher("efficientnet_lite0")
    any_angle = judge_turns(teacher, _turned_plates(tmp_path, True), PRE, Geometry())
    upright = judge_turns(teacher, _turned_plates(tmp_path, False), PRE, Geometry())
    assert any_angle["kept"] and "maps averaged over quarter turns" in any_angle["why"]
    assert not upright["kept"] and "not averaged" in upright["why"]
    assert upright["ratio"] > any_angle["ratio"]


@pytest.fixture(scope="module")
def paper(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("turns_paper") / "paper.safetensors"
    train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1, batch_size=4,
                                                device="cpu"), out, progress=False)
    return category, out


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("turns") / "turns.safetensors"
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         turn_average=True, position_stats=True)
    train(category.train_samples(), config, out, progress=False)
    return out


def test_the_checkpoint_carries_it_as_a_version_older_readers_refuse(trained, paper,
                                                                      monkeypatch) -> None:
    import rd.checkpoints

    meta = read_metadata(trained)
    assert meta["format_version"] == 2 and meta["recipe"]["turn_average"] is True
    assert meta["turn_average"]["mode"] == "on" and "ratio" in meta["turn_average"]
    assert load_checkpoint(trained)[0].turn_average is True
    _, plain = paper
    assert read_metadata(plain)["format_version"] == 1  # the paper's, readable as before
    assert load_checkpoint(plain)[0].turn_average is False
    monkeypatch.setattr(rd.checkpoints, "FORMAT_VERSION", 1)  # a reader before the option
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        read_metadata(trained)
    assert read_metadata(plain)["format_version"] == 1


def test_predict_and_the_native_maps_average_the_turns(trained) -> None:
    detector = load(trained, "cpu")
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    averaged = detector.predict_tensor(image)
    detector.model.turn_average = False
    once = detector.predict_tensor(image)
    detector.model.turn_average = True
    assert not torch.allclose(averaged.fused, once.fused, atol=1e-4)
    # the position statistics' map is the same in both: it sees the unturned image
    position_map, _ = detector.model.position(detector.model.teacher(image), (SIZE, SIZE))
    assert float((averaged.fused - position_map).min()) >= 0
    path = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    native = predict_native(detector.model, path, detector.preprocess, Geometry())
    batch = detector.to_batch([path])
    assert torch.allclose(native.fused, detector.predict_tensor(batch).fused[0], atol=1e-5)


def test_the_onnx_graph_turns_the_images_too(trained, tmp_path) -> None:
    import json

    import onnx

    from rd.export import TOLERANCE, export_onnx, verify_onnx

    detector = load(trained, "cpu")
    # without the position statistics, whose untrained map (about 1e3 here) would leave
    # float32 rounding above the tolerance, with or without the turns
    detector.model.position = None
    out = export_onnx(detector, tmp_path / "turns.onnx")
    batch = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    assert max(verify_onnx(out, detector, batch).values()) <= TOLERANCE
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["rd.turn_average"]) is True


def test_bad_metadata_is_refused(trained, tmp_path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(trained.read_bytes())
    update_metadata(broken, {"turn_average": {"mode": "sometimes"}})
    with pytest.raises(CheckpointError, match="turn_average must be an object with mode"):
        load_checkpoint(broken)


def test_added_to_a_trained_checkpoint_gives_what_training_with_it_gives(paper, tmp_path,
                                                                        capsys) -> None:
    from rd.cli import main

    category, plain = paper
    added = tmp_path / "added.safetensors"
    common = ["--data", str(category.root), "--category", category.category, "--device", "cpu"]
    assert main(["add-turn-average", "--checkpoint", str(plain), "--out", str(added),
                 *common]) == 0
    assert "maps averaged over quarter turns" in capsys.readouterr().out
    meta = read_metadata(added)
    assert meta["recipe"]["turn_average"] is True and meta["format_version"] == 2
    assert "metrics" not in meta  # the stored evaluation no longer holds
    ours, theirs = load(added, "cpu"), load(plain, "cpu")
    batch = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    theirs.model.turn_average = True
    assert torch.allclose(ours.predict_tensor(batch).fused,
                          theirs.predict_tensor(batch).fused, atol=1e-6)
    assert main(["add-turn-average", "--checkpoint", str(added), "--out",
                 str(tmp_path / "twice.safetensors"), *common]) != 0
    assert "already averages its maps" in capsys.readouterr().err


def test_auto_that_leaves_it_out_records_why(tiny_mvtec, tmp_path, monkeypatch) -> None:
    import rd.augment

    monkeypatch.setattr(rd.augment, "AUTO_RATIO", 0.0)  # no turned image is this close
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path / "auto.safetensors"
    model = train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1,
                                                        batch_size=4, device="cpu",
                                                        turn_average="auto"),
                  out, progress=False).model
    meta = read_metadata(out)
    assert model.turn_average is False and "turn_average" not in meta
    assert meta["format_version"] == 1
    assert meta["turn_average_auto"]["kept"] is False
    assert "not averaged over quarter turns" in meta["turn_average_auto"]["why"]


def test_after_augment_auto_the_teacher_is_not_asked_twice(tiny_mvtec, tmp_path,
                                                           monkeypatch) -> None:
    """--augment auto measures quarter turns among its candidates: --turn-average auto takes
    that measurement instead of reading and scoring the images again."""
    import rd.augment

    calls = []
    measure = rd.augment.select_transforms
    monkeypatch.setattr(rd.augment, "select_transforms",
                        lambda *args, **kwargs: calls.append(1) or measure(*args, **kwargs))
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path / "both.safetensors"
    train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1, batch_size=4,
                                                device="cpu", augment="auto",
                                                turn_average="auto"), out, progress=False)
    meta = read_metadata(out)
    decision = meta.get("turn_average") or meta["turn_average_auto"]
    assert len(calls) == 1
    assert decision["ratio"] == meta["augment"]["candidates"]["rot90"]["ratio"]


def test_the_option_is_checked() -> None:
    from rd.cli import build_parser
    from rd.cli.train import train_config

    with pytest.raises(TrainingError, match="--turn-average is on, off or auto"):
        TrainConfig(turn_average="always").validate()
    parser = build_parser()
    base = ["train", "--data", "d", "--category", "c", "--out", "o.safetensors"]
    assert train_config(parser.parse_args([*base, "--turn-average", "auto"])).turn_average \
        == "auto"
    assert train_config(parser.parse_args([*base, "--turn-average"])).turn_average is True
    assert train_config(parser.parse_args(base)).turn_average is False
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--turn-average", "always"])
