"""The command line, called in-process (``main([...])``), plus one check of ``python -m rd``."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from rd.cli import main
from rd.data import MVTecCategory
from rd.detector import load
from rd.model import build_model
from tests.conftest import make_fake_mvtec

FAST = ["--image-size", "64", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--quiet"]
RESNET18_FILE = "resnet18-f37072fd.pth"

# The reference code's names for our student's modules (REFERENCE.md), written out here so the
# test does not reuse the importer's own table.
TO_REFERENCE_BN = {"fuse1.0.0.": "conv1.", "fuse1.0.1.": "bn1.", "fuse1.1.0.": "conv2.",
                   "fuse1.1.1.": "bn2.", "fuse2.0.": "conv3.", "fuse2.1.": "bn3.",
                   "embed.": "bn_layer."}
TO_REFERENCE_DECODER = {"stage16.": "layer1.", "stage8.": "layer2.", "stage4.": "layer3."}


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv, match):
    """Run a command that must fail with exit 2 and one 'error:' line naming ``match``."""
    rc, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert match in lines[0], lines[0]
    return lines[0]


def snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def to_reference(student):
    """Our student state dict -> the reference code's {'bn': ..., 'decoder': ...}."""
    reference = {"bn": {}, "decoder": {}}
    for key, value in student.items():
        part, rest = key.split(".", 1)
        table = TO_REFERENCE_BN if part == "bottleneck" else TO_REFERENCE_DECODER
        prefix = next(p for p in table if rest.startswith(p))
        name = table[prefix] + rest[len(prefix):]
        if part == "bottleneck":
            reference["bn"][name] = value
        else:
            reference["decoder"][name.replace(".shortcut.", ".upsample.")] = value
    return reference


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    """One small efficientnet_lite0 checkpoint trained through the CLI, with its stdout."""
    out = tmp_path_factory.mktemp("cli") / "model.safetensors"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", "--data", str(tiny_mvtec.root), "--category", tiny_mvtec.category,
                   "--out", str(out), *FAST])
    return rc, out, stdout.getvalue()


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """Random resnet18 weights in a torch hub cache (as if downloaded) and a second file."""
    folder = tmp_path_factory.mktemp("torch_home")
    cached = folder / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)
    other = folder / "other.pth"
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    return folder, cached, other


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No downloads and an empty torch hub cache."""
    monkeypatch.setenv("RD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))


@pytest.fixture
def offline_resnet18(monkeypatch, resnet18_files):
    """No downloads; the hub cache holds (random) resnet18 ImageNet weights."""
    monkeypatch.setenv("RD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(resnet18_files[0]))
    return resnet18_files


@pytest.fixture
def small(tmp_path):
    """A fresh, writable tiny dataset to break."""
    return make_fake_mvtec(tmp_path / "data", n_train=3, n_good=1, n_defect=1)


# ------------------------------------------------------------------------------ happy paths


def test_train_writes_checkpoint_report_and_table(trained):
    rc, out, stdout = trained
    assert rc == 0
    assert out.is_file()
    report = json.loads(out.with_name("model.report.json").read_text())
    assert 0 <= report["image_auroc"] <= 1
    assert any(line.split()[:1] == ["all"] for line in stdout.splitlines())


def test_evaluate_prints_table_and_writes_json(trained, tiny_mvtec, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    rc, out, _ = run(capsys, "evaluate", "--data", tiny_mvtec.root, "--category", "widget",
                     "--checkpoint", trained[1], "--json", report_path, "--device", "cpu",
                     "--quiet", "--legacy-pro")
    assert rc == 0
    assert any(line.startswith("all ") for line in out.splitlines())
    assert "legacy per-image PRO" in out
    report = json.loads(report_path.read_text())
    for key in ("image_auroc", "pixel_auroc", "au_pro", "per_defect", "image_roc",
                "thresholds", "normal_scores", "legacy_pro"):
        assert key in report, key
    assert set(report["per_defect"]) == {"hole", "scratch"}


def test_evaluate_without_legacy_pro_leaves_it_out(trained, tmp_path, capsys):
    data = make_fake_mvtec(tmp_path / "data", n_train=1, n_good=2, n_defect=1)
    rc, _, _ = run(capsys, "evaluate", "--data", data, "--category", "widget", "--checkpoint",
                   trained[1], "--json", tmp_path / "r.json", "--device", "cpu", "--quiet")
    assert rc == 0
    assert "legacy_pro" not in json.loads((tmp_path / "r.json").read_text())


def test_predict_prints_scores_and_writes_overlay_and_map(trained, tiny_mvtec, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    checkpoint = trained[1]
    wide = tmp_path / "wide.png"  # not the model's size: the overlay keeps the image's own size
    Image.open(tiny_mvtec.root / "widget" / "test" / "hole" / "000.png").resize((100, 70)).save(
        wide)
    good = tiny_mvtec.root / "widget" / "test" / "good" / "000.png"
    rc, out, _ = run(capsys, "predict", "--checkpoint", checkpoint, wide, good,
                     "--out", tmp_path / "maps", "--device", "cpu")
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2
    expected = load(checkpoint, "cpu")
    for line, path, size in zip(lines, (wide, good), ((100, 70), (64, 64)), strict=True):
        name, score = line.split("\t")[:2]
        assert name == str(path)
        assert float(score) == pytest.approx(float(expected.predict(path).scores[0]), abs=1e-5)
        # each output keeps the image's path below the images' common folder (issue 13)
        common = Path(os.path.commonpath([wide.parent, good.parent]))
        written = tmp_path / "maps" / path.relative_to(common)
        with Image.open(written.with_suffix(".png")) as overlay:
            assert overlay.mode == "RGB" and overlay.size == size
        fused = np.load(written.with_suffix(".npy"))
        assert fused.dtype == np.float32 and fused.shape == (64, 64)
    # the scores are kept in the data home's results store, the studio's one score per image
    from rd.files import file_sha256
    from rd.results import ResultsStore, image_digest

    kept = ResultsStore(tmp_path / "home" / "results").scores(
        file_sha256(checkpoint), [image_digest(wide), image_digest(good)])
    printed = sorted(float(line.split("\t")[1]) for line in lines)  # 6 decimals
    assert sorted(kept.values()) == pytest.approx(printed, abs=1e-6)
    monkeypatch.setenv("RD_HOME", str(tmp_path / "other"))
    rc, _, _ = run(capsys, "predict", "--checkpoint", checkpoint, good, "--device", "cpu",
                   "--no-store")
    assert rc == 0 and not (tmp_path / "other" / "results").exists()


def test_info_of_checkpoint_prints_metadata(trained, capsys):
    rc, out, _ = run(capsys, "info", trained[1])
    meta = json.loads(out)
    assert rc == 0
    assert meta["backbone"] == "efficientnet_lite0" and meta["preprocess"]["size"] == 64


@pytest.mark.parametrize(("backbone", "bottleneck", "decoder"), [
    ("resnet18", "11,680,000", "3,703,168"),
    ("wide_resnet50_2", "58,885,120", "24,917,504"),
])
def test_info_parameter_counts(backbone, bottleneck, decoder, capsys):
    rc, out, _ = run(capsys, "info", "--backbone", backbone)
    assert rc == 0
    assert bottleneck in out and decoder in out


def test_holdout_moves_training_images_to_test_good(tiny_mvtec, tmp_path, capsys):
    rc, _, _ = run(capsys, "holdout", "--data", tiny_mvtec.root, "--category", "widget",
                   "--count", "3", "--out", tmp_path / "view")
    view = MVTecCategory(tmp_path / "view", "widget")
    good = [s for s in view.test_samples() if s.label == 0]
    assert rc == 0
    assert len(view.train_samples()) == tiny_mvtec.n_train - 3
    assert len(good) == tiny_mvtec.n_good + 3


def test_entry_point():
    root = Path(__file__).resolve().parents[2]
    help_text = subprocess.run([sys.executable, "-m", "rd", "--help"], cwd=root,
                               capture_output=True, text=True, check=True).stdout
    assert "import-reference" in help_text
    info = subprocess.run([sys.executable, "-m", "rd", "info", "--backbone", "resnet18"],
                          cwd=root, capture_output=True, text=True, check=True).stdout
    assert "11,680,000" in info and "3,703,168" in info


# -------------------------------------------------------------------------------- bad data


def test_missing_data_folder(tmp_path, capsys):
    fails(capsys, "train", "--data", tmp_path / "nowhere", "--category", "widget",
          "--out", tmp_path / "m.safetensors", *FAST, match="nowhere")
    assert not (tmp_path / "m.safetensors").exists()


def test_empty_train_folder(small, tmp_path, capsys):
    for image in (small / "widget" / "train" / "good").iterdir():
        image.unlink()
    fails(capsys, "train", "--data", small, "--category", "widget",
          "--out", tmp_path / "m.safetensors", *FAST, match="no images found")


def test_unknown_category_lists_the_existing_ones(small, tmp_path, capsys):
    message = fails(capsys, "train", "--data", small, "--category", "gadget",
                    "--out", tmp_path / "m.safetensors", *FAST, match="gadget")
    assert "widget" in message


def test_truncated_training_image_fails_at_start(small, tmp_path, capsys):
    good = small / "widget" / "train" / "good"
    data = (good / "000.png").read_bytes()
    (good / "bad.png").write_bytes(data[: len(data) // 2])
    fails(capsys, "train", "--data", small, "--category", "widget",
          "--out", tmp_path / "m.safetensors", *FAST, match=str(good / "bad.png"))
    assert not (tmp_path / "m.safetensors").exists()


def test_mask_of_wrong_size(trained, small, tmp_path, capsys):
    mask = small / "widget" / "ground_truth" / "hole" / "000_mask.png"
    Image.new("L", (32, 32)).save(mask)
    report = tmp_path / "r.json"
    report.write_text("{}")
    before = snapshot(report)
    fails(capsys, "evaluate", "--data", small, "--category", "widget", "--checkpoint",
          trained[1], "--json", report, "--overwrite", "--device", "cpu", "--quiet",
          match=str(mask))
    assert snapshot(report) == before  # even with --overwrite: a failed run replaces nothing


def test_mask_missing(trained, small, capsys):
    mask = small / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    fails(capsys, "evaluate", "--data", small, "--category", "widget", "--checkpoint",
          trained[1], "--device", "cpu", "--quiet", match=str(mask))


def test_predict_on_a_non_image(trained, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    fails(capsys, "predict", "--checkpoint", trained[1], text, "--out", tmp_path / "maps",
          "--device", "cpu", match=str(text))
    assert not list((tmp_path / "maps").glob("*"))


# -------------------------------------------------------------------------- bad checkpoints


def test_train_refuses_to_overwrite(trained, tiny_mvtec, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    shutil.copy(trained[1], out)
    before = snapshot(out)
    fails(capsys, "train", "--data", tiny_mvtec.root, "--category", "widget", "--out", out,
          *FAST, match="--overwrite")
    assert snapshot(out) == before


def test_init_from_another_image_size(trained, small, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    fails(capsys, "train", "--data", small, "--category", "widget", "--out", out,
          "--init", trained[1], *FAST[:-1], "--image-size", "96",
          match="made for image_size=64")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated", "pickle", "random"])
def test_unreadable_checkpoint(kind, trained, tiny_mvtec, tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    marker = tmp_path / "unpickled"
    if kind == "truncated":
        data = trained[1].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        torch.save({"bottleneck.x": torch.zeros(2), "payload": Payload(marker)}, bad)
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    image = tiny_mvtec.root / "widget" / "test" / "good" / "000.png"
    for command in (["evaluate", "--data", tiny_mvtec.root, "--category", "widget",
                     "--checkpoint", bad, "--device", "cpu", "--quiet"],
                    ["predict", "--checkpoint", bad, image, "--device", "cpu"],
                    ["info", bad]):
        fails(capsys, *command, match="not a readable safetensors checkpoint")
    assert not marker.exists()


def test_import_reference_refuses_pickled_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    reference = tmp_path / "ref.pth"
    torch.save({"bn": {}, "decoder": {}, "x": Payload(marker)}, reference)
    message = fails(capsys, "import-reference", reference, "--backbone", "efficientnet_lite0",
                    "--out", tmp_path / "m.safetensors", match="Unsupported global")
    assert "weights_only=True" in message and "False" not in message and "\x1b" not in message
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()
    torch.load(reference, weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.exists()


def test_import_reference_needs_bn_and_decoder(tmp_path, capsys):
    reference = tmp_path / "ref.pth"
    torch.save({"bn": {"conv1.weight": torch.zeros(1)}}, reference)
    fails(capsys, "import-reference", reference, "--backbone", "efficientnet_lite0",
          "--out", tmp_path / "m.safetensors", match="'bn' and 'decoder'")


def test_import_reference_of_another_backbone(tmp_path, capsys):
    reference = tmp_path / "ref.pth"
    student = build_model("resnet18", pretrained=False).student_state_dict()
    torch.save(to_reference(student), reference)
    fails(capsys, "import-reference", reference, "--backbone", "efficientnet_lite0",
          "--out", tmp_path / "m.safetensors", match="shape mismatch")
    assert not (tmp_path / "m.safetensors").exists()


def test_resnet18_without_weights_offline(offline, small, tmp_path, capsys):
    message = fails(capsys, "train", "--data", small, "--category", "widget", "--backbone",
                    "resnet18", "--out", tmp_path / "m.safetensors", *FAST, match=RESNET18_FILE)
    assert str(Path("hub") / "checkpoints") in message


def test_evaluate_with_other_teacher_weights(resnet18_files, small, tmp_path, capsys):
    _, weights_a, weights_b = resnet18_files
    out = tmp_path / "m.safetensors"
    rc, _, _ = run(capsys, "train", "--data", small, "--category", "widget", "--backbone",
                   "resnet18", "--teacher-weights", weights_a, "--out", out, "--no-evaluate",
                   *FAST)
    assert rc == 0
    fails(capsys, "evaluate", "--data", small, "--category", "widget", "--checkpoint", out,
          "--teacher-weights", weights_b, "--device", "cpu", "--quiet",
          match="teacher weights")


# ----------------------------------------------------------------------------- round trip


def test_import_reference_round_trip(offline_resnet18, tmp_path, capsys):
    model = build_model("resnet18").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights and statistics, so every tensor must land right
        for name, tensor in model.student_state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    reference = to_reference(model.student_state_dict())
    reference["bn"].update({"conv4.weight": torch.ones(8, 4, 3, 3), "bn4.weight": torch.ones(8),
                            "bn4.bias": torch.zeros(8), "bn4.running_mean": torch.zeros(8),
                            "bn4.running_var": torch.ones(8),
                            "bn4.num_batches_tracked": torch.tensor(0)})
    torch.save(reference, tmp_path / "ref.pth")
    checkpoint = tmp_path / "m.safetensors"
    rc, _, _ = run(capsys, "import-reference", tmp_path / "ref.pth", "--backbone", "resnet18",
                   "--out", checkpoint, "--image-size", "64")
    assert rc == 0
    batch = torch.randn(2, 3, 64, 64, generator=generator)
    expected = model.predict(batch)
    got = load(checkpoint, "cpu").predict(batch)
    assert expected.fused.abs().max() > 0
    np.testing.assert_allclose(got.fused, expected.fused.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.layer_maps, expected.layer_maps.numpy(), atol=1e-6, rtol=0)


def test_info_needs_a_checkpoint_or_backbone(capsys):
    fails(capsys, "info", match="--backbone")

