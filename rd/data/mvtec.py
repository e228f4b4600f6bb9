"""MVTec AD folder layout and the Sample record every layout produces (the torch Dataset over
them is rd.data.dataset).

Layout: root/<category>/train/good/*, root/<category>/test/<defect>/*, and
root/<category>/ground_truth/<defect>/<stem>_mask.png for every defective test image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rd.data.images import DataError, list_images

GOOD = "good"
UNKNOWN_LABEL = -1


@dataclass(frozen=True)
class Sample:
    """One image and what is known about it.

    label: 0 normal, 1 defective, -1 unknown (a plain test folder without masks; evaluation
    refuses such samples). mask_path is the ground-truth mask file, or None when there is none:
    normal images usually, unknown labels, and defective images whose mask is missing (allowed
    only on request; pixel metrics must skip those).
    """

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _category_names(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found; check the path")
    return [p.name for p in _subfolders(root) if (p / "train" / GOOD).is_dir()]


def list_categories(root: str | Path) -> list[str]:
    """Names of the category folders under root that contain train/good, sorted."""
    root = Path(root)
    categories = _category_names(root)
    if not categories:
        raise DataError(
            f"{root}: no category folders with train/good inside; "
            "expected the MVTec layout root/<category>/train/good/*.png"
        )
    return categories


class MVTecCategory:
    """One category of an MVTec-format dataset."""

    def __init__(self, root: str | Path, category: str, allow_missing_masks: bool = False) -> None:
        self.root = Path(root)
        self.category = category
        self.allow_missing_masks = allow_missing_masks
        self.path = self.root / category
        if not self.path.is_dir():
            existing = _category_names(self.root)
            raise DataError(
                f"{self.path}: category '{category}' not found; categories in {self.root}: "
                f"{', '.join(existing) or 'none'}"
            )

    def __repr__(self) -> str:
        return f"MVTecCategory(root={str(self.root)!r}, category={self.category!r})"

    def train_samples(self) -> list[Sample]:
        """The normal training images (train/good), all label 0."""
        folder = self.path / "train" / GOOD
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; put the normal training images there")
        images = list_images(folder)
        if not images:
            raise DataError(f"{folder}: no images found; put the normal training images there")
        return [Sample(path, 0, GOOD) for path in images]

    def _test_folder(self) -> Path:
        folder = self.path / "test"
        if not folder.is_dir():
            raise DataError(
                f"{folder}: folder not found; expected test/good and test/<defect> folders"
            )
        return folder

    def defect_types(self) -> list[str]:
        """Names of the defect folders under test (every one except good), sorted."""
        return [p.name for p in _subfolders(self._test_folder()) if p.name != GOOD]

    def test_samples(self) -> list[Sample]:
        """Test images: test/good as label 0, test/<defect> as label 1 with its mask path."""
        folder = self._test_folder()
        samples = []
        for defect_dir in _subfolders(folder):
            defect = defect_dir.name
            for path in list_images(defect_dir):
                if defect == GOOD:
                    samples.append(Sample(path, 0, GOOD))
                    continue
                mask_path = self.path / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    if not self.allow_missing_masks:
                        raise DataError(
                            f"{path}: no mask at {mask_path}; add it, or pass "
                            "--allow-missing-masks to skip pixel metrics for this image"
                        )
                    mask_path = None
                samples.append(Sample(path, 1, defect, mask_path))
        if not samples:
            raise DataError(f"{folder}: no test images found in test/<defect> folders")
        return samples


def holdout_view(root: str | Path, category: str, count: int, out_root: str | Path) -> Path:
    """A symlinked copy of a category with the last ``count`` training images moved to test/good.

    MVTec categories with very few normal test images make image AUROC meaningless; this holds
    some normal training images out as extra normal test images (named ``train_<name>``),
    without touching the source folder. Returns ``out_root``.
    """
    source = MVTecCategory(root, category)
    train = source.train_samples()
    if not 0 < count < len(train):
        raise DataError(f"cannot hold out {count} of {len(train)} training images; "
                        f"choose 1..{len(train) - 1}")
    target = Path(out_root) / category
    if target.exists():
        raise DataError(f"{target} exists; choose an empty output folder")
    (target / "train" / GOOD).mkdir(parents=True)
    (target / "test" / GOOD).mkdir(parents=True)
    for sample in train[:-count]:
        (target / "train" / GOOD / sample.path.name).symlink_to(sample.path.resolve())
    for sample in train[-count:]:
        (target / "test" / GOOD / f"train_{sample.path.name}").symlink_to(sample.path.resolve())
    for sample in source.test_samples():
        folder = target / "test" / sample.defect
        folder.mkdir(exist_ok=True)
        (folder / sample.path.name).symlink_to(sample.path.resolve())
        if sample.mask_path is not None:
            masks = target / "ground_truth" / sample.defect
            masks.mkdir(parents=True, exist_ok=True)
            (masks / sample.mask_path.name).symlink_to(sample.mask_path.resolve())
    return Path(out_root)
