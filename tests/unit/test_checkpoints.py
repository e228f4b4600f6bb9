import json

import pytest
import torch
from safetensors.torch import save_file

from rd.checkpoints import (
    CheckpointError,
    load_checkpoint,
    read_metadata,
    reference_to_student,
    save_checkpoint,
    update_metadata,
)
from rd.data import HALF, Preprocess
from rd.files import atomic_write
from rd.model import build_model

META = {"preprocess": Preprocess(64, HALF, HALF).to_dict(), "fusion": "sum",
        "category": "widget"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0").eval()


def test_round_trip_restores_student_and_metadata(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {**META, "metrics": {"image_auroc": 0.9}})
    loaded, meta = load_checkpoint(path)
    assert meta["backbone"] == "efficientnet_lite0"
    assert meta["teacher_weights"] == "efficientnet-lite0-57934424.pth"
    assert meta["metrics"]["image_auroc"] == 0.9
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.eval().predict(x).fused, model.predict(x).fused)


def test_checkpoint_holds_no_teacher(model, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, META)
    keys = load_file(str(path)).keys()
    assert keys and not any(k.startswith("teacher.") for k in keys)


def test_expectations_are_checked(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, META)
    with pytest.raises(CheckpointError, match="image_size=64, not 256"):
        load_checkpoint(path, expect={"image_size": 256})
    with pytest.raises(CheckpointError, match="backbone='efficientnet_lite0', not 'resnet18'"):
        load_checkpoint(path, expect={"backbone": "resnet18"})


def test_wrong_tensors_are_named(model, tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = dict(model.student_state_dict())
    tensors.pop("decoder.stage4.0.conv1.weight")
    tensors["bottleneck.fuse2.0.weight"] = torch.zeros(1)
    meta = {"rd": json.dumps({**META, "format": "rd4ad-student", "format_version": 1,
                              "backbone": "efficientnet_lite0",
                              "teacher_weights": model.teacher.weights_id})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*shape mismatch"):
        load_checkpoint(path)


def test_foreign_and_broken_files_are_refused(model, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="without rd metadata"):
        read_metadata(plain)
    good = tmp_path / "good.safetensors"
    save_checkpoint(model, good, META)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"bn": {}}, pickled)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_metadata(pickled)
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "missing.safetensors")


def test_failed_write_keeps_the_previous_file(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, META)
    before = path.read_bytes()

    def failing(temporary):
        temporary.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_update_metadata_merges(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, META)
    update_metadata(path, {"normal_scores": {"mean": 1.0}})
    meta = read_metadata(path)
    assert meta["normal_scores"] == {"mean": 1.0} and meta["category"] == "widget"


def test_reference_names_map_onto_ours():
    reference = {
        "bn": {"conv1.weight": 1, "bn3.bias": 2, "bn_layer.0.downsample.0.weight": 3,
               "conv4.weight": 4, "bn4.running_mean": 5},
        "decoder": {"layer1.0.upsample.1.weight": 6, "layer3.1.conv2.weight": 7},
    }
    assert reference_to_student(reference) == {
        "bottleneck.fuse1.0.0.weight": 1, "bottleneck.fuse2.1.bias": 2,
        "bottleneck.embed.0.downsample.0.weight": 3,
        "decoder.stage16.0.shortcut.1.weight": 6, "decoder.stage4.1.conv2.weight": 7,
    }
