import json

import pytest

from rd.manifest import ManifestError, all_models, find_model, read_manifest, register


def _checkpoint(folder, name="m.safetensors", content=b"weights"):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_register_find_and_verify(tmp_path):
    manifest = tmp_path / "manifest.json"
    path = _checkpoint(tmp_path / "builtin")
    entry = register(manifest, path, "builtin", "fabric", "efficientnet_lite0",
                     command="python -m rd train ...", report={"image_auroc": 0.99})
    assert entry.file == "builtin/m.safetensors"
    found = find_model("builtin", "fabric", "efficientnet_lite0", [manifest])
    assert found == entry and found.verify() == path
    assert found.report == {"image_auroc": 0.99}
    assert find_model("builtin", "fabric", "resnet18", [manifest]) is None


def test_register_replaces_the_same_key(tmp_path):
    manifest = tmp_path / "manifest.json"
    first = _checkpoint(tmp_path, "a.safetensors", b"a")
    second = _checkpoint(tmp_path, "b.safetensors", b"b")
    register(manifest, first, "d", "c", "resnet18")
    register(manifest, second, "d", "c", "resnet18")
    register(manifest, first, "d", "c", "resnet50")
    entries = read_manifest(manifest)
    assert [(e.backbone, e.file) for e in entries] == [("resnet18", "b.safetensors"),
                                                        ("resnet50", "a.safetensors")]


def test_missing_or_modified_files_are_reported_not_used(tmp_path):
    manifest = tmp_path / "manifest.json"
    path = _checkpoint(tmp_path)
    entry = register(manifest, path, "d", "c", "resnet18")
    path.write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="does not match its SHA-256"):
        entry.verify()
    path.unlink()
    with pytest.raises(ManifestError, match="missing"):
        entry.verify()


def test_later_manifests_win_and_bad_manifests_are_named(tmp_path):
    project, user = tmp_path / "p" / "manifest.json", tmp_path / "u" / "manifest.json"
    register(project, _checkpoint(project.parent), "d", "c", "resnet18")
    register(user, _checkpoint(user.parent), "d", "c", "resnet18")
    (entry,) = all_models([project, user])
    assert entry.manifest == user
    assert read_manifest(tmp_path / "none.json") == []
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"models": [{"file": "x"}]}))
    with pytest.raises(ManifestError, match="not a valid manifest"):
        read_manifest(broken)


def test_files_outside_the_manifest_folder_are_refused(tmp_path):
    outside = _checkpoint(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match="must lie under"):
        register(tmp_path / "models" / "manifest.json", outside, "d", "c", "resnet18")


def test_committed_builtin_models_are_listed_intact_and_load():
    from rd.data.synthetic import SYNTHETIC_CATEGORIES
    from rd.detector import load
    from rd.manifest import PROJECT_MANIFEST

    entries = read_manifest(PROJECT_MANIFEST)
    assert {e.category for e in entries if e.dataset == "builtin"} == set(SYNTHETIC_CATEGORIES)
    for entry in entries:
        path = entry.verify()
        assert path.stat().st_size < 20 * 1024 * 1024
        assert "python -m rd train" in entry.command and entry.category in entry.command
        detector = load(path, device="cpu")
        assert detector.backbone == entry.backbone
        assert detector.metadata["category"] == entry.category
        assert detector.metadata["metrics"]["image_auroc"] == entry.report["image_auroc"]
