import json
from pathlib import Path

import pytest

from rd.files import file_sha256
from rd.manifest import (
    PROJECT_MANIFEST,
    ManifestError,
    all_models,
    delete_model,
    find_model,
    get_model,
    models_for,
    read_manifest,
    register,
    rename_model,
)


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


def test_every_registration_is_a_new_entry_and_the_best_is_the_default(tmp_path):
    manifest = tmp_path / "manifest.json"
    first = _checkpoint(tmp_path, "a.safetensors", b"a")
    second = _checkpoint(tmp_path, "b.safetensors", b"b")
    good = register(manifest, first, "d", "c", "resnet18", report={"image_auroc": 0.9})
    quick = register(manifest, second, "d", "c", "resnet18", report={"image_auroc": 0.6},
                     name="quick")
    assert [e.file for e in read_manifest(manifest)] == ["a.safetensors", "b.safetensors"]
    assert good.id != quick.id and quick.name == "quick"
    assert [e.id for e in models_for("d", "c", manifests=[manifest])] == [good.id, quick.id]
    assert find_model("d", "c", "resnet18", [manifest]) == good
    assert get_model(quick.id, [manifest]) == quick
    with pytest.raises(ManifestError, match="already registered"):
        register(manifest, first, "d", "c", "resnet50")  # never a second entry for a file


def test_a_copy_never_replaces_a_file_and_takes_its_report_along(tmp_path):
    manifest = tmp_path / "models" / "manifest.json"
    outside = _checkpoint(tmp_path / "job", "model.safetensors", b"one")
    (tmp_path / "job" / "model.report.json").write_text("{}")
    meta = {"created_utc": "2026-01-01T00:00:00+00:00", "epochs_trained": 2,
            "recipe": {"lr": 0.005}}
    first = register(manifest, outside, "d", "c", "resnet18", copy=True, metadata=meta)
    outside.write_bytes(b"two")
    second = register(manifest, outside, "d", "c", "resnet18", copy=True, metadata=meta)
    assert first.path != second.path
    assert first.path.read_bytes() == b"one" and second.path.read_bytes() == b"two"
    assert first.verify() == first.path and first.report_path.read_text() == "{}"
    assert (first.epochs, first.options, first.created) == (2, {"lr": 0.005},
                                                            "2026-01-01T00:00:00+00:00")
    assert len(read_manifest(manifest)) == 2


@pytest.mark.parametrize("field, value", [
    ("dataset", "../../../../elsewhere/x"), ("category", "/abs/category"),
    ("category", "../data/transistor"), ("backbone", ".."), ("dataset", ""),
    ("category", "a/b")])
def test_names_are_checked_before_anything_is_written(tmp_path, field, value):
    outside = _checkpoint(tmp_path / "job", content=b"weights")
    names = {"dataset": "d", "category": "c", "backbone": "resnet18", field: value}
    manifest = tmp_path / "models" / "manifest.json"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ManifestError, match=f"invalid {field}"):
        register(manifest, outside, names["dataset"], names["category"], names["backbone"],
                 copy=True)
    assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("file", ["../elsewhere/m.safetensors", "/etc/passwd",
                                  "a/../../m.safetensors", "~/m.safetensors"])
def test_manifest_entries_outside_their_folder_are_refused(tmp_path, file):
    target = _checkpoint(tmp_path / "elsewhere")
    manifest = tmp_path / "models" / "manifest.json"
    manifest.parent.mkdir()
    entry = {"dataset": "d", "category": "c", "backbone": "resnet18", "file": file,
             "sha256": file_sha256(target)}  # the hash would match
    manifest.write_text(json.dumps({"version": 1, "models": [entry]}))
    with pytest.raises(ManifestError, match="relative to the manifest"):
        read_manifest(manifest)


def test_rename_and_delete_own_models_only(tmp_path):
    manifest = tmp_path / "manifest.json"
    keep = register(manifest, _checkpoint(tmp_path, "a.safetensors", b"a"), "d", "c", "r18")
    gone = register(manifest, _checkpoint(tmp_path, "b.safetensors", b"b"), "d", "c", "r18")
    assert rename_model(keep.id, "baseline", manifest).name == "baseline"
    with pytest.raises(ManifestError, match="at most"):
        rename_model(keep.id, "x" * 200, manifest)
    delete_model(gone.id, manifest)
    assert not gone.path.exists() and keep.path.exists()
    assert [(e.id, e.name) for e in read_manifest(manifest)] == [(keep.id, "baseline")]
    with pytest.raises(ManifestError, match="no model"):
        delete_model(gone.id, manifest)
    shipped = read_manifest(PROJECT_MANIFEST)[0]
    assert shipped.shipped and shipped.id.startswith("shipped:")
    before = PROJECT_MANIFEST.read_bytes()
    for action in (lambda: delete_model(shipped.id, PROJECT_MANIFEST),
                   lambda: rename_model(shipped.id, "mine", PROJECT_MANIFEST),
                   lambda: register(PROJECT_MANIFEST, shipped.path, "d", "c", "r18")):
        with pytest.raises(ManifestError, match="read-only"):
            action()
    assert PROJECT_MANIFEST.read_bytes() == before


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


def test_every_manifest_is_listed_and_bad_manifests_are_named(tmp_path):
    project, user = tmp_path / "p" / "manifest.json", tmp_path / "u" / "manifest.json"
    register(project, _checkpoint(project.parent, "p.safetensors"), "d", "c", "resnet18")
    register(user, _checkpoint(user.parent, "u.safetensors"), "d", "c", "resnet18")
    assert [e.manifest for e in all_models([project, user])] == [project, user]
    assert read_manifest(tmp_path / "none.json") == []
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ManifestError, match="not a valid manifest"):
        read_manifest(broken)
    broken.write_text(json.dumps({"models": [{"file": "x"}]}))
    with pytest.raises(ManifestError, match="invalid dataset"):
        read_manifest(broken)
    broken.write_text(json.dumps({"models": [{"dataset": "d", "category": "c", "backbone": "b",
                                              "file": "x", "sha256": "0", "report": [1]}]}))
    with pytest.raises(ManifestError, match="'report'"):
        read_manifest(broken)


def test_files_outside_the_manifest_folder_are_refused(tmp_path):
    outside = _checkpoint(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match="must lie under"):
        register(tmp_path / "models" / "manifest.json", outside, "d", "c", "resnet18")


def test_committed_builtin_models_are_listed_intact_and_load():
    from rd.data.synthetic import SYNTHETIC_CATEGORIES
    from rd.detector import load

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


def _register_copies(manifest: str, checkpoint: str, count: int) -> None:
    for _ in range(count):
        register(Path(manifest), Path(checkpoint), "d", "c", "resnet18", copy=True)


def test_concurrent_registrations_keep_every_model(tmp_path):
    import multiprocessing

    manifest = tmp_path / "models" / "manifest.json"
    checkpoint = _checkpoint(tmp_path / "job")
    context = multiprocessing.get_context("fork")  # only file work in the children
    workers = [context.Process(target=_register_copies, args=(str(manifest), str(checkpoint), 3))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = read_manifest(manifest)
    assert len(entries) == 9 and len({e.file for e in entries}) == 9
    assert all(e.verify() for e in entries)
