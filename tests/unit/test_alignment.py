"""Aligned statistics (rd.alignment): registration finds a known turn and shift, a bent outline
stands out where the registered normals have background, ``auto`` tells parts that line up from
textures, and the trained option travels through the checkpoint, predict and the native maps
while the image score stays RD's; export refuses it with advice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rd.alignment import (
    ALIKE_MIN_PEAK,
    WEIGHT_SHARE,
    AlignedStatistics,
    fit_aligned_statistics,
    register,
    unwarp,
    warp,
)
from rd.checkpoints import CheckpointError, load_checkpoint, read_metadata, update_metadata
from rd.data import HALF, MVTecCategory, Preprocess
from rd.detector import load
from rd.geometry import Geometry, predict_native
from rd.training import TrainConfig, TrainingError, train

SIZE = 64
PRE = Preprocess(SIZE, HALF, HALF)


def _part(angle: float, shift: tuple[float, float], seed: int, bent: bool = False
          ) -> Image.Image:
    """A grey plate with a notch (so a turn is visible) on a dark ground, turned ``angle``
    degrees and shifted; ``bent`` pushes one corner out by a few pixels."""
    rng = np.random.default_rng(seed)
    corners = [(18, 18), (46, 18), (46, 46), (18, 46)]
    if bent:
        corners[2] = (50, 50)
    image = Image.new("L", (SIZE, SIZE), 40)
    draw = ImageDraw.Draw(image)
    draw.polygon(corners, fill=200)
    draw.rectangle((28, 18, 36, 24), fill=40)
    image = image.rotate(angle, Image.Resampling.BILINEAR, translate=shift, fillcolor=40)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 3, (SIZE, SIZE))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


def _normals(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [_part(float(rng.uniform(-8, 8)), tuple(rng.uniform(-3, 3, 2)), seed * 100 + index)
            for index in range(count)]


def _batches(images: list[Image.Image]):
    tensors = torch.stack([PRE(image) for image in images])
    return lambda: iter(tensors.split(5))


def test_registration_undoes_a_known_turn_and_shift() -> None:
    template = PRE(_part(0, (0, 0), seed=1))
    moved = PRE(_part(6, (3, -2), seed=2))
    theta, peak = register(moved[None], template.mean(0))
    turn = math.degrees(math.atan2(float(theta[0, 1, 0]), float(theta[0, 0, 0])))
    assert abs(abs(turn) - 6) <= 0.5
    inner = (slice(8, -8), slice(8, -8))
    registered = warp(moved[None], theta)[0]
    before = float((moved - template).abs()[:, inner[0], inner[1]].mean())
    after = float((registered - template).abs()[:, inner[0], inner[1]].mean())
    assert after < 0.35 * before
    assert float(peak[0]) > ALIKE_MIN_PEAK


def test_unwarp_takes_a_registered_map_back() -> None:
    steps = torch.arange(float(SIZE))
    rows, columns = torch.meshgrid(steps, steps, indexing="ij")
    smooth = (torch.sin(columns / 7) + torch.cos(rows / 9))[None]
    angle = math.radians(5)
    theta = torch.tensor([[[math.cos(angle), -math.sin(angle), 0.06],
                           [math.sin(angle), math.cos(angle), -0.04]]])
    back = unwarp(warp(smooth[:, None], theta)[:, 0], theta)
    inner = (slice(12, -12), slice(12, -12))
    assert torch.allclose(back[0][inner], smooth[0][inner], atol=0.02)


def test_a_bent_corner_stands_out_where_the_normals_have_background() -> None:
    statistics, info = fit_aligned_statistics(_batches(_normals(16, seed=3)), SIZE, HALF,
                                              torch.device("cpu"))
    assert info["images"] == 16 and info["alike"] and info["map_mean"] > 0
    bent = statistics.raw_map(PRE(_part(4, (1, -1), seed=90, bent=True))[None])[0]
    normal = statistics.raw_map(PRE(_part(-4, (-1, 2), seed=91))[None])[0]
    assert float(bent.max()) > 2 * float(normal.max())
    row, column = divmod(int(bent.argmax()), SIZE)
    assert math.hypot(row - 48, column - 48) < 10  # at the bent corner


def test_auto_keeps_parts_that_line_up_and_leaves_textures_out() -> None:
    device = torch.device("cpu")
    _, parts = fit_aligned_statistics(_batches(_normals(8, seed=4)), SIZE, HALF, device)
    rng = np.random.default_rng(5)
    noise = [Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
             for _ in range(8)]
    _, texture = fit_aligned_statistics(_batches(noise), SIZE, HALF, device)
    assert parts["alike"] and parts["median_peak"] >= ALIKE_MIN_PEAK
    assert not texture["alike"] and texture["median_peak"] < ALIKE_MIN_PEAK
    assert "do not line up" in texture["why"] and "kept" in parts["why"]


def test_the_statistics_module_round_trips_its_tensors() -> None:
    statistics, _ = fit_aligned_statistics(_batches(_normals(6, seed=6)), SIZE, HALF,
                                           torch.device("cpu"))
    rebuilt = AlignedStatistics(SIZE)
    rebuilt.load_state_dict(statistics.state_dict(), strict=True)
    batch = torch.stack([PRE(image) for image in _normals(2, seed=7)])
    assert torch.equal(rebuilt(batch), statistics(batch))


@pytest.fixture(scope="module")
def paper(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("aligned_paper") / "paper.safetensors"
    train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1, batch_size=4,
                                                device="cpu"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    out = tmp_path_factory.mktemp("aligned") / "aligned.safetensors"
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         aligned_stats=True)
    train(category.train_samples(), config, out, progress=False)
    return category, out


def test_the_checkpoint_carries_the_statistics_and_their_weight(trained) -> None:
    category, out = trained
    meta = read_metadata(out)
    info = meta["aligned_stats"]
    assert meta["recipe"]["aligned_stats"] is True and info["mode"] == "on"
    assert info["images"] == len(category.train_samples())
    assert info["weight"] == pytest.approx(WEIGHT_SHARE * info["rd_mean"] / info["map_mean"])
    model, _ = load_checkpoint(out)
    assert model.aligned is not None and model.position is None
    assert float(model.aligned.weight) == pytest.approx(info["weight"])


def test_predict_adds_the_map_and_keeps_rd_score(trained) -> None:
    category, out = trained
    detector = load(out, "cpu")
    paths = [s.path for s in category.test_samples()[:3]]
    batch = detector.to_batch(paths)
    with_stats = detector.predict_tensor(batch)
    statistics, detector.model.aligned = detector.model.aligned, None
    rd_only = detector.predict_tensor(batch)
    detector.model.aligned = statistics
    assert torch.allclose(with_stats.fused, rd_only.fused + statistics(batch), atol=1e-6)
    assert torch.equal(with_stats.scores, rd_only.scores)
    assert bool((with_stats.fused >= rd_only.fused).all())
    native = detector.predict_native(paths[0])
    assert torch.allclose(native.fused, with_stats.fused[0], atol=1e-5)


def test_native_geometries_add_the_whole_image_map(trained, tmp_path) -> None:
    category, out = trained
    model, meta = load_checkpoint(out)
    checkpoint_pre = Preprocess.from_dict(meta["preprocess"])
    wide = tmp_path / "wide.png"
    Image.open(category.test_samples()[0].path).convert("RGB").resize((160, 64)).save(wide)
    with_stats = predict_native(model, wide, checkpoint_pre, Geometry("letterbox"))
    statistics, model.aligned = model.aligned, None
    rd_only = predict_native(model, wide, checkpoint_pre, Geometry("letterbox"))
    square = statistics(checkpoint_pre(wide)[None])
    expected = torch.nn.functional.interpolate(square[:, None], size=(64, 160),
                                               mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(with_stats.fused, rd_only.fused + expected, atol=1e-5)
    assert with_stats.score == rd_only.score


def test_export_refuses_them_and_auto_runtime_falls_back_to_torch(trained, tmp_path) -> None:
    from rd.export import ExportError, export_onnx
    from rd.runtime import select_runtime

    _, out = trained
    detector = load(out, "cpu")
    with pytest.raises(ExportError, match=r"aligned statistics.*--runtime torch"):
        export_onnx(detector, tmp_path / "aligned.onnx")
    chosen, choice = select_runtime(detector, out, "auto")
    assert chosen is detector and choice.name == "torch"


def test_statistics_without_their_tensors_or_tensors_without_them_are_refused(
        trained, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, out = trained
    broken = tmp_path / "broken.safetensors"
    with safe_open(str(out), framework="pt") as handle:
        header = handle.metadata()
    save_file({k: v for k, v in load_file(str(out)).items() if k != "aligned.std"},
              str(broken), metadata=header)
    with pytest.raises(CheckpointError, match="aligned statistics are missing"):
        load_checkpoint(broken)
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(out.read_bytes())
    update_metadata(stray, {"aligned_stats": None})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(stray)


def test_added_to_a_trained_checkpoint_equals_training_with_them(trained, paper, tmp_path,
                                                                capsys) -> None:
    """They leave the student as it is: fitted onto the paper's checkpoint they give the
    tensors and weight of training with --aligned-stats; a second time is refused."""
    from safetensors.torch import load_file

    from rd.cli import main

    category, out = trained
    added = tmp_path / "added.safetensors"
    assert main(["add-aligned-stats", "--checkpoint", str(paper), "--data",
                 str(category.root), "--category", category.category, "--out", str(added),
                 "--device", "cpu"]) == 0
    assert "aligned statistics of" in capsys.readouterr().out
    ours, theirs = load_file(str(added)), load_file(str(out))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
    assert read_metadata(added)["recipe"]["aligned_stats"] is True
    assert main(["add-aligned-stats", "--checkpoint", str(added), "--data",
                 str(category.root), "--category", category.category, "--out",
                 str(tmp_path / "twice.safetensors"), "--device", "cpu"]) != 0
    assert "already has aligned statistics" in capsys.readouterr().err


def test_auto_that_leaves_them_out_records_why(tiny_mvtec, tmp_path, monkeypatch) -> None:
    import rd.alignment

    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    monkeypatch.setattr(rd.alignment, "ALIKE_MIN_PEAK", 1.01)  # no data lines up this well
    out = tmp_path / "auto.safetensors"
    model = train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1,
                                                        batch_size=4, device="cpu",
                                                        aligned_stats="auto"),
                  out, progress=False).model
    meta = read_metadata(out)
    assert model.aligned is None and "aligned_stats" not in meta
    assert meta["aligned_auto"]["alike"] is False and "left out" in meta["aligned_auto"]["why"]


def test_the_option_is_checked(tiny_mvtec, tmp_path) -> None:
    from rd.cli import build_parser

    with pytest.raises(TrainingError, match="--aligned-stats is on, off or auto"):
        TrainConfig(aligned_stats="always").validate()
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    with pytest.raises(TrainingError, match="at least three"):
        train(category.train_samples()[:2], TrainConfig(image_size=SIZE, epochs=1,
                                                        batch_size=2, device="cpu",
                                                        aligned_stats=True),
              tmp_path / "never.safetensors", progress=False)
    args = build_parser().parse_args(["train", "--data", "d", "--aligned-stats", "auto", "out"])
    assert args.aligned_stats == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--aligned-stats", "always", "out"])
