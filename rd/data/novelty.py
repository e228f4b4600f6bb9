"""Labelled classification datasets for one-class novelty detection (supplementary Appendix B).

The protocol needs whole labelled train and test sets, so every format is read into memory as
uint8 arrays of one image size: (N, H, W) grey or (N, H, W, 3) RGB. Formats:

- class folders: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (MNIST's PNGs, CIFAR-10 as
  images, any dataset laid out so); a ``.tar.gz`` of that layout is unpacked once under
  ``data_home()/novelty/<name>-<SHA-256 prefix>`` (keyed by content, so a different archive of
  the same name is never served an old extraction; safely: no member can land outside it, and
  it may unpack to at most ``MAX_UNPACK_RATIO`` times its size);
- gzip IDX: the original MNIST / Fashion-MNIST files, parsed here with numpy;
- CIFAR-10 binary batches (``cifar-10-batches-bin``). Its Python version is refused: it is a
  pickle, and unpickling a downloaded file can run arbitrary code.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rd.data.images import DataError, ImageError, list_images, read_image
from rd.download import DownloadError, UnpackBudget
from rd.files import data_home, file_sha256

MNIST_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_UNSIGNED_BYTE = 0x08

CIFAR_BIN_FOLDER = "cifar-10-batches-bin"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch.bin"
CIFAR_META = "batches.meta.txt"
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # one label byte, then R, G and B planes
CIFAR_PICKLE_NAMES = ("data_batch_1", "test_batch", "batches.meta")
PICKLE_PROTOCOL_2 = 0x80  # first byte of the Python version's batches

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    """Images and their class indices."""

    images: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64

    def of_class(self, index: int) -> np.ndarray:
        return self.images[self.labels == index]


@dataclass(frozen=True)
class NoveltyDataset:
    """A labelled train and test set; every class has images in both."""

    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    source: Path

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])

    def class_index(self, name: str) -> int:
        """Index of a class given by name, or by its index when no class has that name."""
        if name in self.classes:
            return self.classes.index(name)
        if name.isdigit() and int(name) < len(self.classes):
            return int(name)
        raise DataError(f"class {name!r} does not exist in {self.name}; its classes are "
                        f"{', '.join(repr(c) for c in self.classes)} (or their indices "
                        f"0..{len(self.classes) - 1})")


def _checked(name: str, classes: Sequence[str], splits: dict[str, Split], source: Path
             ) -> NoveltyDataset:
    """Refuse what would make the protocol meaningless: mixed sizes, empty or unknown classes."""
    shapes = {split: s.images.shape[1:] for split, s in splits.items()}
    if shapes["train"] != shapes["test"]:
        raise DataError(f"{source}: training images are {shapes['train']} but test images are "
                        f"{shapes['test']}; all images of a dataset must have one size")
    for split, part in splits.items():
        if len(part.images) != len(part.labels):
            raise DataError(f"{source}: {split} has {len(part.images)} images but "
                            f"{len(part.labels)} labels; every image needs exactly one label")
        unknown = part.labels[(part.labels < 0) | (part.labels >= len(classes))]
        if unknown.size:
            raise DataError(f"{source}: {split} has label {int(unknown[0])}, but the dataset "
                            f"names {len(classes)} classes (labels 0..{len(classes) - 1})")
        counts = np.bincount(part.labels, minlength=len(classes))
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(f"{source}: class {empty[0]!r} has no {split} images; every class "
                            "needs training and test images")
    if len(classes) < 2:
        raise DataError(f"{source}: found {len(classes)} class; novelty detection needs at "
                        "least two (one normal, the others anomalous)")
    return NoveltyDataset(name, tuple(classes), splits["train"], splits["test"], source)


# ------------------------------------------------------------------------------ class folders


def archive_cache(archive: Path) -> Path:
    """Where ``archive`` is unpacked: named after it and the start of its SHA-256."""
    stem = archive.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    return data_home() / "novelty" / f"{stem}-{file_sha256(archive)[:16]}"


def unpack_archive(archive: Path) -> Path:
    """Unpack a .tar.gz once under ``data_home()/novelty``; returns the folder holding train/."""
    target = archive_cache(archive)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Unpacked beside the target and renamed at the end: an interrupted run leaves no half.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
        budget = UnpackBudget(archive)

        def checked(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            budget.take(member)
            return tarfile.data_filter(member, path)  # no absolute paths, ../ or links out

        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter=checked)
        except DownloadError as error:
            shutil.rmtree(tmp)
            raise DataError(str(error)) from None
        except (tarfile.TarError, OSError, EOFError) as error:
            shutil.rmtree(tmp)
            raise DataError(f"{archive}: cannot unpack ({error}); expected a .tar.gz of "
                            "train/<class>/ and test/<class>/ folders") from None
        try:
            tmp.rename(target)
        except OSError:  # another run finished the same archive first: use theirs
            shutil.rmtree(tmp)
    tops = [p for p in target.iterdir() if p.is_dir()]
    if not (target / "train").is_dir() and len(tops) == 1:
        return tops[0]  # an archive with one top folder around train/ and test/
    return target


def _read_folder_images(folder: Path, reference: list[tuple[Path, tuple[int, int]]]
                        ) -> list[np.ndarray]:
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: empty class: no images; every class needs training and "
                        "test images")
    images = []
    for path in paths:
        try:
            pixels = np.asarray(read_image(path))
        except ImageError as error:
            raise DataError(str(error)) from None
        size = (pixels.shape[1], pixels.shape[0])
        if not reference:
            reference.append((path, size))
        elif size != reference[0][1]:
            first, first_size = reference[0]
            raise DataError(f"{path}: image is {size[0]}x{size[1]} but {first} is "
                            f"{first_size[0]}x{first_size[1]}; all images of a dataset must "
                            "have one size (resize them first)")
        images.append(pixels)
    return images


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = list_images(folder)
    if loose:
        raise DataError(f"{folder}: holds images directly ({loose[0].name}); put each image in "
                        f"a class folder: {folder}/<class>/{loose[0].name}")
    return names


def load_class_folders(root: str | Path, name: str = "folders",
                       expected_classes: Sequence[str] | None = None) -> NoveltyDataset:
    """``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (or a .tar.gz of them).

    Classes are the folder names, sorted; images are read as RGB (grey repeated to 3 channels).
    """
    root = Path(root)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        root = unpack_archive(root)
    layout = "ROOT/train/<class>/<images> and ROOT/test/<class>/<images>"
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected {layout}")
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise DataError(f"{root}: no {' or '.join(f'{m}/' for m in missing)} folder; expected "
                        f"{layout}")
    classes = _class_names(root / "train")
    test_classes = _class_names(root / "test")
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(f"{root}: train/ and test/ must hold the same class folders; only in "
                        f"train/: {only_train or 'none'}, only in test/: {only_test or 'none'}")
    if expected_classes is not None and sorted(expected_classes) != classes:
        raise DataError(f"{root}: class folders are {classes or 'none'}; {name} expects "
                        f"{sorted(expected_classes)}")
    reference: list[tuple[Path, tuple[int, int]]] = []
    splits = {}
    for split in SPLITS:
        images, labels = [], []
        for index, cls in enumerate(classes):
            found = _read_folder_images(root / split / cls, reference)
            images.extend(found)
            labels.extend([index] * len(found))
        splits[split] = Split(np.stack(images), np.asarray(labels, dtype=np.int64))
    return _checked(name, classes, splits, root)


# ------------------------------------------------------------------------------------ IDX


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    expected = ", ".join(f"{n}.gz" for pair in IDX_FILES.values() for n in pair)
    raise DataError(f"{root}: missing {stem}.gz; expected the four IDX files {expected}")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes (gzip or plain) with ``ndim`` dimensions, validated."""
    path = Path(path)
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error}); expected a gzip IDX file") from None
    header = 4 + 4 * ndim
    magic = data[:4]
    expected = bytes((0, 0, IDX_UNSIGNED_BYTE, ndim))
    if magic != expected:
        raise DataError(f"{path}: magic number 0x{magic.hex()} is not 0x{expected.hex()} (IDX, "
                        f"unsigned bytes, {ndim} dimensions); is it the right file?")
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != size:
        raise DataError(f"{path}: header says {'x'.join(map(str, shape))} = {size} bytes of "
                        f"data, but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_idx(root: str | Path, classes: Sequence[str], name: str) -> NoveltyDataset:
    """The four MNIST-style IDX files in ``root`` (``*.gz`` or uncompressed)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; expected the IDX files of {name} "
                        "(Fashion-MNIST: apt-get install dataset-fashion-mnist, then "
                        "--root /usr/share/datasets/fashion-mnist)")
    splits = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images = read_idx(_idx_file(root, images_stem), 3)
        labels = read_idx(_idx_file(root, labels_stem), 1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{root}: {images_stem} holds {len(images)} images but "
                            f"{labels_stem} holds {len(labels)} labels; they must match")
        splits[split] = Split(images, labels)
    return _checked(name, classes, splits, root)


# -------------------------------------------------------------------------- CIFAR-10 binary


def is_cifar_binary(root: Path) -> bool:
    return (root / CIFAR_BIN_FOLDER).is_dir() or (root / CIFAR_TEST_BATCH).is_file()


def refuse_cifar_pickle(root: Path) -> None:
    """Stop at CIFAR-10's Python version before anything could unpickle it."""
    if (root / "cifar-10-batches-py").is_dir() or any(
            (root / n).is_file() for n in CIFAR_PICKLE_NAMES):
        raise DataError(f"{root}: this is CIFAR-10's Python version (pickled batches), which is "
                        "never read: unpickling a file can run arbitrary code. Use the binary "
                        f"version (cifar-10-binary.tar.gz, folder {CIFAR_BIN_FOLDER} with "
                        f"{', '.join(CIFAR_TRAIN_BATCHES)}, {CIFAR_TEST_BATCH}, {CIFAR_META})")


def read_cifar_batch(path: Path) -> Split:
    """One binary batch: records of a label byte and a 32x32 image as R, G, B planes."""
    if not path.is_file():
        raise DataError(f"{path}: missing; expected the CIFAR-10 binary batches "
                        f"{', '.join(CIFAR_TRAIN_BATCHES)} and {CIFAR_TEST_BATCH}")
    data = path.read_bytes()
    if data[:1] == bytes((PICKLE_PROTOCOL_2,)):
        raise DataError(f"{path}: a Python pickle, not a CIFAR-10 binary batch; pickles are "
                        "never read (unpickling can run code): use cifar-10-batches-bin")
    if not data or len(data) % CIFAR_RECORD:
        raise DataError(f"{path}: {len(data)} bytes is not a whole number of {CIFAR_RECORD}-byte "
                        "records (1 label byte + 32x32x3 pixels)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), records[:, 0].astype(np.int64))


def load_cifar_binary(root: str | Path) -> NoveltyDataset:
    """CIFAR-10's binary version: ``root`` is cifar-10-batches-bin or the folder holding it."""
    root = Path(root)
    refuse_cifar_pickle(root)
    if (root / CIFAR_BIN_FOLDER).is_dir():
        root = root / CIFAR_BIN_FOLDER
    meta = root / CIFAR_META
    if not meta.is_file():
        raise DataError(f"{meta}: missing; the class names (labels) come from it, one per line")
    classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    batches = [read_cifar_batch(root / n) for n in CIFAR_TRAIN_BATCHES]
    train = Split(np.concatenate([b.images for b in batches]),
                  np.concatenate([b.labels for b in batches]))
    return _checked("cifar10", classes, {"train": train,
                                         "test": read_cifar_batch(root / CIFAR_TEST_BATCH)}, root)


# ------------------------------------------------------------------------------ by name

DATASETS = ("mnist", "fashion-mnist", "cifar10", "folders")


def open_dataset(name: str, root: str | Path) -> NoveltyDataset:
    """``name`` read from ``root``: the format each dataset comes in (see the module doc)."""
    root = Path(root)
    if name == "mnist":
        return load_class_folders(root, name, MNIST_CLASSES)
    if name == "fashion-mnist":
        return load_idx(root, FASHION_MNIST_CLASSES, name)
    if name == "cifar10":
        if root.is_dir():
            refuse_cifar_pickle(root)
            if is_cifar_binary(root):
                return load_cifar_binary(root)
        return load_class_folders(root, name, CIFAR10_CLASSES)
    if name == "folders":
        return load_class_folders(root)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
