"""Novelty-detection data formats (tiny generated files of each), their errors, and a short run."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rd.cli import main
from rd.data import DataError
from rd.data.novelty import (
    CIFAR_RECORD,
    FASHION_MNIST_CLASSES,
    load_class_folders,
    load_idx,
    open_dataset,
    read_idx,
)
from rd.novelty import NoveltySettings, markdown_table, training_subset

RNG = np.random.default_rng(0)


def write_folders(root: Path, classes=("a", "b", "c"), n_train=4, n_test=3, size=8,
                  grey=True) -> dict[str, dict[str, list[np.ndarray]]]:
    """ROOT/{train,test}/<class>/NN.png; returns the pixels written, by split and class."""
    written: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, count in (("train", n_train), ("test", n_test)):
        written[split] = {}
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            shape = (size, size) if grey else (size, size, 3)
            images = [RNG.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
            for number, pixels in enumerate(images):
                Image.fromarray(pixels).save(folder / f"{number:02d}.png")
            written[split][cls] = images
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(root: Path, n_train=10, n_test=10, n_classes=10, gz=True) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(count) % n_classes
        images = RNG.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
            arrays[name] = array
    return arrays


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def write_cifar_bin(folder: Path, names=("cat", "dog", "ship"), per_batch=3
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Five training batches and a test batch of ``per_batch`` records each."""
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    images = RNG.integers(0, 256, (6 * per_batch, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6 * per_batch) % len(names)
    batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for number, name in enumerate(batches):
        part = slice(number * per_batch, (number + 1) * per_batch)
        (folder / name).write_bytes(cifar_records(images[part], labels[part]))
    return images, labels


# ---------------------------------------------------------------------------- the three formats


def test_class_folders_are_read_with_grey_repeated_to_rgb(tmp_path):
    written = write_folders(tmp_path)
    data = load_class_folders(tmp_path)
    assert data.classes == ("a", "b", "c")
    assert data.train.images.shape == (12, 8, 8, 3) and data.test.images.shape == (9, 8, 8, 3)
    assert data.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for channel in range(3):
        np.testing.assert_array_equal(data.test.of_class(1)[2][..., channel],
                                      written["test"]["b"][2])


def test_a_tar_gz_of_class_folders_is_unpacked_into_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    write_folders(tmp_path / "src", classes=[str(d) for d in range(10)], n_train=1, n_test=1)
    archive = tmp_path / "mnist_png.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname=".")
    data = open_dataset("mnist", archive)
    assert data.classes == tuple(str(d) for d in range(10))
    assert data.source.is_relative_to(tmp_path / "home" / "novelty")
    assert open_dataset("mnist", archive).train.images.shape == (10, 8, 8, 3)  # reuses it


def test_an_archive_member_escaping_the_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="cannot unpack"):
        open_dataset("folders", archive)
    assert not (tmp_path / "home" / "novelty" / "escaped.txt").exists()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_are_parsed(tmp_path, gz):
    arrays = write_idx(tmp_path, gz=gz)
    data = open_dataset("fashion-mnist", tmp_path) if gz else load_idx(
        tmp_path, FASHION_MNIST_CLASSES, "fashion-mnist")
    assert data.classes == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(data.train.images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert data.image_shape == (28, 28)


def test_cifar_binary_batches_are_parsed_without_unpickling(tmp_path, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle must never be used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    images, labels = write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    data = open_dataset("cifar10", tmp_path)  # the folder holding cifar-10-batches-bin
    assert data.classes == ("cat", "dog", "ship")
    np.testing.assert_array_equal(data.train.images, images[:15])
    np.testing.assert_array_equal(data.test.images, images[15:])
    np.testing.assert_array_equal(data.train.labels, labels[:15])


def test_cifar_as_class_folders(tmp_path):
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck")
    write_folders(tmp_path, classes=names, n_train=1, n_test=1, size=32, grey=False)
    assert open_dataset("cifar10", tmp_path).image_shape == (32, 32, 3)


# ----------------------------------------------------------------------------- bad input


def test_pickled_cifar_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps({"data": 1}, protocol=2))
    with pytest.raises(DataError, match=r"Python version.*binary version"):
        open_dataset("cifar10", folder)
    with pytest.raises(DataError, match="Python version"):
        open_dataset("cifar10", tmp_path)


def test_a_pickle_renamed_to_bin_and_a_broken_batch_are_refused(tmp_path):
    write_cifar_bin(tmp_path / "bin")
    (tmp_path / "bin" / "data_batch_2.bin").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataError, match="pickle"):
        open_dataset("cifar10", tmp_path / "bin")
    (tmp_path / "bin" / "data_batch_2.bin").write_bytes(bytes(CIFAR_RECORD + 5))
    with pytest.raises(DataError, match="3073-byte records"):
        open_dataset("cifar10", tmp_path / "bin")
    (tmp_path / "bin" / "batches.meta.txt").unlink()
    with pytest.raises(DataError, match=r"batches\.meta\.txt: missing"):
        open_dataset("cifar10", tmp_path / "bin")


def test_cifar_labels_beyond_the_named_classes_are_refused(tmp_path):
    write_cifar_bin(tmp_path / "bin", names=("cat", "dog", "ship"))
    (tmp_path / "bin" / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"label 2.*2 classes"):
        open_dataset("cifar10", tmp_path / "bin")


def test_idx_errors_name_what_was_expected(tmp_path):
    write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\.gz"):
        open_dataset("fashion-mnist", tmp_path)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(bytes((0, 0, 0x08, 1)) + struct.pack(">I", 5) + bytes(3)))
    with pytest.raises(DataError, match=r"header says 5 = 5 bytes.*holds 3"):
        read_idx(bad, 1)
    with pytest.raises(DataError, match="magic number 0x00000801 is not 0x00000803"):
        read_idx(bad, 3)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip IDX"):
        read_idx(bad, 1)


def test_idx_label_count_and_range_are_checked(tmp_path):
    write_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(DataError, match=r"10 images but.*5 labels"):
        open_dataset("fashion-mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], np.uint8))))
    with pytest.raises(DataError, match="label 10"):
        open_dataset("fashion-mnist", tmp_path)


def test_an_empty_class_is_refused(tmp_path):
    write_idx(tmp_path, n_train=9)  # labels 0..8: class 9 has no training image
    with pytest.raises(DataError, match="'Ankle boot' has no train images"):
        open_dataset("fashion-mnist", tmp_path)
    write_folders(tmp_path / "f")
    for path in (tmp_path / "f" / "test" / "b").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="test/b: empty class"):
        open_dataset("folders", tmp_path / "f")


def test_class_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not found; expected ROOT/train/<class>"):
        open_dataset("folders", tmp_path / "nowhere")
    write_folders(tmp_path / "f")
    (tmp_path / "f" / "test" / "c").rename(tmp_path / "f" / "test" / "z")
    with pytest.raises(DataError, match=r"only in train/: \['c'\], only in test/: \['z'\]"):
        open_dataset("folders", tmp_path / "f")
    Image.new("L", (8, 8)).save(tmp_path / "f" / "train" / "loose.png")
    with pytest.raises(DataError, match="put each image in a class folder"):
        open_dataset("folders", tmp_path / "f")
    write_folders(tmp_path / "g")
    with pytest.raises(DataError, match=r"mnist expects \['0', '1'"):
        open_dataset("mnist", tmp_path / "g")
    (tmp_path / "h" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ folder"):
        open_dataset("folders", tmp_path / "h")


def test_images_of_mixed_sizes_are_refused(tmp_path):
    write_folders(tmp_path)
    Image.new("L", (9, 8)).save(tmp_path / "test" / "c" / "99.png")
    with pytest.raises(DataError, match=r"99\.png: image is 9x8 but .* is 8x8"):
        open_dataset("folders", tmp_path)


def test_a_class_name_that_does_not_exist(tmp_path):
    write_folders(tmp_path)
    data = open_dataset("folders", tmp_path)
    assert data.class_index("b") == 1 and data.class_index("2") == 2
    with pytest.raises(DataError, match=r"class 'dog' does not exist.*'a', 'b', 'c'"):
        data.class_index("dog")


# ------------------------------------------------------------------------------- protocol


def test_paper_defaults_and_training_subset():
    settings = NoveltySettings()
    assert (settings.image_size, settings.epochs, settings.batch_size, settings.lr) == (
        32, 200, 16, 0.001)
    assert not settings.resolved_normalize("mnist")
    assert not settings.resolved_normalize("fashion-mnist")
    assert settings.resolved_normalize("cifar10") and settings.resolved_normalize("folders")
    assert NoveltySettings(normalize=True).resolved_normalize("mnist")
    images = np.arange(50)
    subset = training_subset(images, 10, 3)
    assert len(subset) == 10 and (np.diff(subset) > 0).all()
    np.testing.assert_array_equal(subset, training_subset(images, 10, 3))
    assert training_subset(images, None, 3) is images


def test_markdown_puts_the_paper_beside_ours():
    report = {"dataset": "mnist", "command": "python -m rd novelty", "complete": True,
              "settings": {**NoveltySettings().__dict__, "normalize": False},
              "paper": {"auroc": [99.9, 99.9, 98.9], "mean": 99.2},
              "results": [{"index": 2, "class": "2", "auroc": 0.987, "n_train": 5,
                           "seconds": {"total": 3.0}}],
              "mean_auroc": 0.987, "seconds_total": 4.0}
    text = markdown_table(report)
    assert "| 2 2 | 98.7 | 98.9 | 5 | 3 |" in text
    assert "| **mean** | **98.7** | 98.9 |" in text and "normalisation none" in text


def test_a_short_novelty_run_writes_both_reports(tmp_path, capsys):
    write_folders(tmp_path / "data", classes=("x", "y", "z"), n_train=5, n_test=3, size=28,
                  grey=True)
    out = tmp_path / "out"
    rc = main(["novelty", "--dataset", "folders", "--root", str(tmp_path / "data"),
               "--classes", "x", "2", "--epochs", "1", "--image-size", "32", "--no-normalize",
               "--train-limit", "4", "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [r["class"] for r in report["results"]] == ["x", "z"] and report["complete"]
    for entry in report["results"]:
        assert 0.0 <= entry["auroc"] <= 1.0
        assert (entry["n_train"], entry["n_test_normal"], entry["n_test_anomalous"]) == (4, 3, 6)
        assert set(entry["roc"]) == {"fpr", "tpr", "thresholds"}
        assert entry["seconds"]["total"] > 0 and Path(entry["checkpoint"]).is_file()
    assert report["mean_auroc"] == pytest.approx(np.mean([r["auroc"] for r in
                                                          report["results"]]))
    assert report["settings"]["preprocess"] == {"size": 32, "mean": [0.0] * 3, "std": [1.0] * 3}
    assert report["command"].startswith("python -m rd novelty --dataset folders")
    assert "| **mean** |" in (out / "report.md").read_text()
