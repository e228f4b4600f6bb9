"""Tests for the built-in generated dataset (rd.data.synthetic) and the user data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from rd.data import (
    GOOD,
    SYNTHETIC_CATEGORIES,
    DataError,
    ImageDataset,
    MVTecCategory,
    builtin_dataset_root,
    ensure_builtin_dataset,
    generate_dataset,
    list_categories,
    read_mask,
    render_sample,
    synthetic,
)
from rd.files import data_home

SMALL = {"n_train": 2, "n_test_good": 2, "n_per_defect": 2}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every category with two images per folder, shared read-only by the module."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), **SMALL)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes(small: Path, tmp_path: Path) -> None:
    again = files(generate_dataset(tmp_path, **SMALL))
    assert again == files(small)
    # Per category: 2 train, 2 good, dataset.json, and 2 images and 2 masks per defect kind.
    assert len(again) == sum(5 + 4 * len(kinds) for kinds in SYNTHETIC_CATEGORIES.values())


def test_another_seed_gives_other_images(small: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path, ["fabric"], seed=1, **SMALL)
    for path in (tmp_path / "fabric").rglob("*.png"):
        if "ground_truth" not in path.parts:
            assert path.read_bytes() != (small / path.relative_to(tmp_path)).read_bytes()
    assert json.loads((tmp_path / "fabric" / "dataset.json").read_text())["seed"] == 1


def test_files_are_the_rendered_samples(small: Path) -> None:
    for category, kinds in SYNTHETIC_CATEGORIES.items():
        for kind in (GOOD, kinds[0]):
            image, mask = render_sample(category, "test", kind, 1)
            assert np.array_equal(pixels(small / category / "test" / kind / "001.png"), image)
            if kind != GOOD:
                written = pixels(small / category / "ground_truth" / kind / "001_mask.png")
                assert np.array_equal(written, mask.astype(np.uint8) * 255)


# --- layout --------------------------------------------------------------------------------------


def test_layout_reads_as_mvtec(small: Path) -> None:
    assert list_categories(small) == sorted(SYNTHETIC_CATEGORIES)
    for category, kinds in SYNTHETIC_CATEGORIES.items():
        data = MVTecCategory(small, category)
        assert len(data.train_samples()) == 2
        assert data.defect_types() == sorted(kinds)
        samples = data.test_samples()
        assert len(samples) == 2 + 2 * len(kinds)
        for sample in samples:
            image = Image.open(sample.path)
            assert (image.mode, image.size) == ("RGB", (256, 256))
            if sample.label == 1:
                assert sample.mask_path is not None
                mask = Image.open(sample.mask_path)
                assert (mask.mode, mask.size) == ("L", image.size)
                assert set(np.unique(np.asarray(mask))) <= {0, 255}
                assert read_mask(sample.mask_path).any()
        ImageDataset(samples).check()


def test_dataset_json_records_how_it_was_made(small: Path) -> None:
    meta = json.loads((small / "hex_nut" / "dataset.json").read_text())
    assert meta["version"] == synthetic.GENERATOR_VERSION
    assert meta["seed"] == 0
    assert meta["counts"]["train/good"] == 2
    assert meta["counts"]["test/chip"] == 2
    assert "no licence restrictions" in meta["licence"]


# --- defects and masks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("category", "kind"),
    [(category, kind) for category, kinds in SYNTHETIC_CATEGORIES.items() for kind in kinds],
)
def test_mask_covers_exactly_what_the_defect_changed(category: str, kind: str) -> None:
    for index in range(3):
        image, mask = render_sample(category, "test", kind, index)
        clean, no_mask = render_sample(category, "test", kind, index, defect=False)
        changed = (image != clean).any(axis=2)
        assert not no_mask.any()
        assert changed.sum() > 20, "the defect must be visible"
        assert not (changed & ~mask).any(), "every changed pixel lies inside the mask"
        assert mask.mean() < 0.06, "defects stay small, as in MVTec"
        # The mask is the defect's footprint, not a loose box around it.
        assert changed.sum() > 0.3 * mask.sum()


def test_normal_images_differ_from_each_other(small: Path) -> None:
    for category in SYNTHETIC_CATEGORIES:
        train = [pixels(p) for p in sorted((small / category / "train" / GOOD).iterdir())]
        test = [pixels(p) for p in sorted((small / category / "test" / GOOD).iterdir())]
        for a in test:
            for b in train:
                assert np.abs(a.astype(int) - b.astype(int)).mean() > 3
        assert not np.array_equal(train[0], train[1])


def test_defect_free_rendering_is_the_same_scene() -> None:
    image, _ = render_sample("wood", "test", "scratch", 0)
    clean, _ = render_sample("wood", "test", "scratch", 0, defect=False)
    other, _ = render_sample("wood", "test", "scratch", 1, defect=False)
    assert (image == clean).all(axis=2).mean() > 0.95
    assert (other == clean).all(axis=2).mean() < 0.5


@pytest.mark.parametrize(
    ("category", "split", "kind"),
    [("tile", "test", GOOD), ("wood", "train", "crack"), ("wood", "test", "chip"),
     ("wood", "val", GOOD)],
)
def test_render_sample_names_what_exists(category: str, split: str, kind: str) -> None:
    with pytest.raises(DataError, match="synthetic category"):
        render_sample(category, split, kind, 0)


# --- writing: atomic, skipped when complete, careful with foreign folders -----------------------


def test_second_call_rewrites_nothing(tmp_path: Path) -> None:
    generate_dataset(tmp_path, ["wood"], **SMALL)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    generate_dataset(tmp_path, ["wood"], **SMALL)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["wood"]  # no staging folders left


def test_other_counts_replace_the_category(tmp_path: Path) -> None:
    generate_dataset(tmp_path, ["wood"], **SMALL)
    generate_dataset(tmp_path, ["wood"], n_train=3, n_test_good=1, n_per_defect=1)
    assert len(MVTecCategory(tmp_path, "wood").train_samples()) == 3
    assert not (tmp_path / "wood" / "test" / GOOD / "001.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wood"]


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail_late(array: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        Image.fromarray(array).save(path)

    monkeypatch.setattr(synthetic, "_save_png", fail_late)
    with pytest.raises(OSError, match="disk full"):
        generate_dataset(tmp_path, ["fabric"], **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_never_touched(tmp_path: Path) -> None:
    (tmp_path / "fabric" / "train" / GOOD).mkdir(parents=True)
    with pytest.raises(DataError, match="not made by"):
        generate_dataset(tmp_path, ["fabric"], **SMALL)
    assert [p.name for p in (tmp_path / "fabric").rglob("*")] == ["train", GOOD]


def test_rejects_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least one image"):
        generate_dataset(tmp_path, ["wood"], n_train=0)


# --- where the built-in dataset lives -----------------------------------------------------------


def test_data_home_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RD_HOME", str(tmp_path / "rd"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "rd"
    monkeypatch.delenv("RD_HOME")
    assert data_home() == tmp_path / "xdg" / "rd-studio"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/xdg")
    assert data_home() == tmp_path / "home" / ".local" / "share" / "rd-studio"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert data_home() == tmp_path / "home" / ".local" / "share" / "rd-studio"
    assert not (tmp_path / "home").exists()  # asking creates nothing


def test_builtin_dataset_goes_to_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    made = []
    monkeypatch.setenv("RD_HOME", str(tmp_path))
    monkeypatch.setattr(synthetic, "generate_dataset",
                        lambda root, categories=None: made.append(root) or root)
    assert ensure_builtin_dataset() == builtin_dataset_root() == tmp_path / "builtin"
    assert ensure_builtin_dataset(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert made == [tmp_path / "builtin", tmp_path / "elsewhere"]


# --- hard categories (opt-in): non-square images, thin and faint defects -------------------------


@pytest.mark.parametrize("category", sorted(synthetic.HARD_CATEGORIES))
def test_hard_categories_are_deterministic_with_exact_masks(category: str) -> None:
    height, width = synthetic.HARD_IMAGE_SIZES[category]
    for kind in synthetic.HARD_CATEGORIES[category]:
        image, mask = render_sample(category, "test", kind, 0)
        again, _ = render_sample(category, "test", kind, 0)
        clean, empty = render_sample(category, "test", kind, 0, defect=False)
        assert image.shape == (height, width, 3) and np.array_equal(image, again)
        assert not empty.any() and mask.any()
        changed = (image != clean).any(axis=2)
        assert not (changed & ~mask).any()  # every changed pixel is in the mask
        assert changed.sum() >= 0.5 * mask.sum()  # and the mask is mostly changed pixels
        if kind in ("crack", "scratch"):  # hairline: nowhere thicker than 3 px
            assert ndimage.distance_transform_edt(mask).max() <= 2.0
        if kind == "uneven":  # a large faint region, a few grey levels
            assert 0.05 < mask.mean() < 0.45
            difference = np.abs(image.astype(int) - clean.astype(int))[mask].mean()
            assert difference < 15


def test_hard_categories_are_opt_in(tmp_path: Path) -> None:
    assert not set(synthetic.HARD_CATEGORIES) & set(SYNTHETIC_CATEGORIES)
    root = generate_dataset(tmp_path, ["metal_strip"], n_train=1, n_test_good=1, n_per_defect=1)
    assert list_categories(root) == ["metal_strip"]
    meta = json.loads((root / "metal_strip" / "dataset.json").read_text())
    assert meta["image_size"] == [256, 1024]
    train = pixels(root / "metal_strip" / "train" / GOOD / "000.png")
    assert train.shape == (256, 1024, 3)
    assert (train[..., 0] == train[..., 1]).all()  # grey
