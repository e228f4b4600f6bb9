"""Teacher adaptation (rd.adapt): bn changes only the deepest stage's statistics, blended with
ImageNet's; ssl moves only the deepest stage, a little; an adapted teacher travels in the
checkpoint and the ONNX export."""

from __future__ import annotations

import pytest
import torch

from rd.adapt import BN_BLEND, adapt_teacher
from rd.checkpoints import load_checkpoint, read_metadata
from rd.data import HALF, MVTecCategory, Preprocess
from rd.detector import load
from rd.geometry import Geometry, training_dataset
from rd.teacher import build_teacher
from rd.training import TrainConfig, train

SIZE = 64
PRE = Preprocess(SIZE, HALF, HALF)


@pytest.fixture(scope="module")
def normals(tiny_mvtec):
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    return category, training_dataset(category.train_samples(), PRE, Geometry())


def _state(teacher) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def test_bn_changes_only_the_deepest_stage_statistics(normals) -> None:
    _, dataset = normals
    teacher = build_teacher("efficientnet_lite0")
    before = _state(teacher)
    info = adapt_teacher(teacher, dataset, "bn", batch_size=4)
    after = teacher.state_dict()
    deepest = {f"extractor.blocks.{len(teacher.extractor.blocks) - 1}."}
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith(tuple(deepest)) for k in changed)
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               for k in changed)
    for key in changed:
        if key.endswith("running_var"):  # the blend keeps at least half the ImageNet variance
            assert bool((after[key] >= BN_BLEND * before[key] - 1e-7).all())
    assert info["method"] == "bn" and teacher.adapted == "bn"
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ssl_moves_only_the_deepest_stage_a_little(normals) -> None:
    _, dataset = normals
    teacher = build_teacher("efficientnet_lite0")
    before = _state(teacher)
    info = adapt_teacher(teacher, dataset, "ssl", batch_size=4)
    after = teacher.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    last = f"extractor.blocks.{len(teacher.extractor.blocks) - 1}."
    assert changed and all(k.startswith(last) for k in changed)
    assert 0 < info["weight_drift"] < 1.0
    assert teacher.adapted == "ssl" and not any(p.requires_grad for p in teacher.parameters())
    again = build_teacher("efficientnet_lite0")
    adapt_teacher(again, dataset, "ssl", batch_size=4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())  # seeded


def test_unknown_adaptation_is_refused(normals) -> None:
    with pytest.raises(ValueError, match="teacher adaptation"):
        adapt_teacher(build_teacher("efficientnet_lite0"), normals[1], "finetune")


def test_bn_adapted_teacher_round_trips_through_checkpoint_and_onnx(normals, tmp_path) -> None:
    category, _ = normals
    out = tmp_path / "bn.safetensors"
    config = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, device="cpu",
                         teacher_adapt="bn")
    trained = train(category.train_samples(), config, out, progress=False).model
    meta = read_metadata(out)
    assert meta["teacher_adapt"]["method"] == "bn"
    assert meta["recipe"]["teacher_adapt"] == "bn"
    model, _ = load_checkpoint(out)
    assert model.teacher.adapted == "bn"
    for key, value in trained.teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[key], value.cpu()), key
    detector = load(out, "cpu")
    batch = detector.to_batch([s.path for s in category.test_samples()[:2]])
    plain = build_teacher("efficientnet_lite0")
    assert not all(torch.equal(v, model.teacher.state_dict()[k])
                   for k, v in plain.state_dict().items())  # the adaptation did travel

    from rd.export import TOLERANCE, export_onnx, verify_onnx

    onnx_path = export_onnx(detector, tmp_path / "bn.onnx")
    differences = verify_onnx(onnx_path, detector, batch)
    assert max(differences.values()) <= TOLERANCE


def test_the_paper_checkpoint_holds_no_teacher(normals, tmp_path) -> None:
    category, _ = normals
    out = tmp_path / "paper.safetensors"
    train(category.train_samples(), TrainConfig(image_size=SIZE, epochs=1, batch_size=4,
                                                device="cpu"), out, progress=False)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert not any(k.startswith("teacher.") for k in handle.keys())  # noqa: SIM118
    meta = read_metadata(out)
    assert "teacher_adapt" not in meta and "geometry" not in meta
    assert set(meta["recipe"]) == {"backbone", "image_size", "epochs", "batch_size", "lr",
                                   "betas", "seed", "amp", "init", "normalize"}
