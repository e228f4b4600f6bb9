"""Plain folders for users whose data is not in the MVTec layout.

normal_dir holds normal training images. test_dir is either flat (labels come from masks) or has
sub-folders named like MVTec's test/ (good/ is normal, any other folder is a defect type).
A mask for test image x.png is x.<suffix> or x_mask.<suffix> (any image suffix) in mask_dir,
or in mask_dir/<defect>/ when test_dir has sub-folders.

Flat test_dir labels: 1 if the image has a mask with any positive pixel, 0 if its mask is empty
or it has no mask (masks are usually drawn for defects only), and -1 (unknown) for every image
when no mask_dir is given; evaluation refuses unknown labels.
"""

from __future__ import annotations

from pathlib import Path

from rd.data.images import DataError, list_images, read_mask
from rd.data.mvtec import GOOD, UNKNOWN_LABEL, Sample, _subfolders

DEFECT = "defect"
UNKNOWN = "unknown"
_MASK_SUFFIX = "_mask"


def _mask_index(folder: Path) -> dict[str, Path]:
    """Map each test-image stem to its mask file in folder."""
    index: dict[str, Path] = {}
    for path in list_images(folder):
        stem = path.stem.removesuffix(_MASK_SUFFIX)
        if stem in index:
            raise DataError(
                f"{folder}: two masks for image '{stem}' ({index[stem].name}, {path.name}); "
                "keep one"
            )
        index[stem] = path
    return index


class PlainFolders:
    """A folder of normal images, an optional test folder and an optional mask folder."""

    def __init__(
        self,
        normal_dir: str | Path,
        test_dir: str | Path | None = None,
        mask_dir: str | Path | None = None,
    ) -> None:
        self.normal_dir = Path(normal_dir)
        self.test_dir = None if test_dir is None else Path(test_dir)
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        for folder in (self.normal_dir, self.test_dir, self.mask_dir):
            if folder is not None and not folder.is_dir():
                raise DataError(f"{folder}: folder not found; check the path")

    def __repr__(self) -> str:
        return (
            f"PlainFolders(normal_dir={str(self.normal_dir)!r}, test_dir={self.test_dir!r}, "
            f"mask_dir={self.mask_dir!r})"
        )

    def train_samples(self) -> list[Sample]:
        """The normal training images, all label 0."""
        images = list_images(self.normal_dir)
        if not images:
            raise DataError(f"{self.normal_dir}: no images found; put normal images there")
        return [Sample(path, 0, GOOD) for path in images]

    def test_samples(self) -> list[Sample]:
        """Test images with labels and mask paths as described in the module docstring."""
        if self.test_dir is None:
            raise DataError("no test folder was given; pass test_dir to evaluate")
        subfolders = _subfolders(self.test_dir)
        loose = list_images(self.test_dir)
        if subfolders and loose:
            raise DataError(
                f"{self.test_dir}: has both images and sub-folders; put every test image in a "
                "sub-folder (good/, <defect>/) or remove the sub-folders"
            )
        samples = self._from_subfolders(subfolders) if subfolders else self._from_flat(loose)
        if not samples:
            raise DataError(f"{self.test_dir}: no test images found")
        return samples

    def _from_subfolders(self, subfolders: list[Path]) -> list[Sample]:
        samples = []
        for folder in subfolders:
            defect = folder.name
            masks_dir = None if self.mask_dir is None else self.mask_dir / defect
            masks = _mask_index(masks_dir) if masks_dir and masks_dir.is_dir() else {}
            for path in list_images(folder):
                label = 0 if defect == GOOD else 1
                samples.append(Sample(path, label, defect, masks.get(path.stem)))
        return samples

    def _from_flat(self, images: list[Path]) -> list[Sample]:
        if self.mask_dir is None:
            return [Sample(path, UNKNOWN_LABEL, UNKNOWN) for path in images]
        masks = _mask_index(self.mask_dir)
        samples = []
        for path in images:
            mask_path = masks.get(path.stem)
            if mask_path is not None and read_mask(mask_path).any():
                samples.append(Sample(path, 1, DEFECT, mask_path))
            else:
                samples.append(Sample(path, 0, GOOD, mask_path))
        return samples
