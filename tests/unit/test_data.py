"""Tests for rd.data: image/mask reading, dataset layouts, preprocessing, and the Dataset."""

from __future__ import annotations

import shutil
import struct
import warnings
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import rd.data.images as images_module
from rd.data import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageDataset,
    ImageError,
    MVTecCategory,
    PlainFolders,
    Preprocess,
    Sample,
    decode_pixels,
    list_categories,
    list_images,
    mask_to_tensor,
    read_image,
    read_image_bytes,
    read_mask,
    read_pixels,
)
from tests.conftest import FakeMVTec, make_fake_mvtec


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def palette_image(transparency: int | bytes) -> Image.Image:
    image = Image.new("P", (3, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30])
    image.info["transparency"] = transparency
    return image


# --- read_image: every mode --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (3, 2), 100), (100, 100, 100)),
        (Image.new("LA", (3, 2), (100, 0)), (100, 100, 100)),
        (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), (10, 20, 30)),
        (palette_image(1), (10, 20, 30)),
        (palette_image(b"\x00\x80"), (10, 20, 30)),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
        (Image.new("CMYK", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (3, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("RGB", (3, 2), (10, 200, 30)), (10, 200, 30)),
    ],
    ids=[
        "L",
        "LA",
        "RGBA",
        "P-index-transparency",
        "P-bytes-transparency",
        "1",
        "CMYK-white",
        "CMYK-red",
        "RGB",
    ],
)
def test_read_image_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = read_image(image)
    assert rgb.size == (3, 2)
    assert (pixels(rgb) == expected).all()


def test_read_image_ycbcr_close_to_source() -> None:
    ycbcr = Image.new("RGB", (3, 2), (10, 200, 30)).convert("YCbCr")
    assert np.abs(pixels(read_image(ycbcr)).astype(int) - (10, 200, 30)).max() <= 2


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16)),
        Image.frombytes("I;16B", (3, 1), b"\x00\x00\x01\x01\xff\xff"),
        Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32)),
    ],
    ids=["I;16", "I;16B", "I"],
)
def test_read_image_16_bit_scaled_by_full_range(image: Image.Image) -> None:
    assert image.mode in ("I;16", "I;16B", "I")
    assert pixels(read_image(image))[0, :, 0].tolist() == [0, 1, 255]


def test_read_image_16_bit_png_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(path)
    assert pixels(read_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_read_image_mode_i_out_of_range() -> None:
    with pytest.raises(ImageError, match=r"outside 0\.\.65535"):
        read_image(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_read_image_float_mode() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    assert pixels(read_image(image))[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(ImageError, match=r"outside \[0, 1\]"):
        read_image(Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)))


def test_read_image_files_of_other_formats(tmp_path: Path) -> None:
    palette_path = tmp_path / "palette.png"
    palette_image(b"\x00\x80").save(palette_path)
    cmyk_path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(cmyk_path)
    float_path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(float_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (pixels(read_image(palette_path)) == (10, 20, 30)).all()
    assert (pixels(read_image(cmyk_path)) >= 250).all()
    assert (pixels(read_image(float_path)) == 128).all()


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (90, 90, 90)).save(path, exif=exif.tobytes())
    assert read_image(path).size == (20, 40)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 7, dtype=np.uint8), (7, 7, 7)),
        (np.full((2, 3, 1), 7, dtype=np.uint8), (7, 7, 7)),
        (np.tile(np.array([1, 2, 3], dtype=np.uint8), (2, 3, 1)), (1, 2, 3)),
        (np.tile(np.array([1, 2, 3, 0], dtype=np.uint8), (2, 3, 1)), (1, 2, 3)),
        (np.ones((2, 3), dtype=bool), (255, 255, 255)),
        (np.full((2, 3), 65535, dtype=np.uint16), (255, 255, 255)),
        (np.full((2, 3, 3), 0.5, dtype=np.float64), (128, 128, 128)),
    ],
    ids=["HW", "HW1", "HW3", "HW4", "bool", "uint16", "float"],
)
def test_read_image_arrays(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    rgb = read_image(array)
    assert rgb.size == (3, 2)
    assert (pixels(rgb) == expected).all()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
        (np.zeros((2, 3, 2), dtype=np.uint8), "not an image"),
        (np.zeros((2, 3), dtype=np.int64), "unsupported pixel type"),
        (np.full((2, 3), -0.1), "outside"),
        (np.full((2, 3), np.nan), "NaN"),
    ],
)
def test_read_image_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        read_image(array)


# --- read_image: failures ----------------------------------------------------------------------


def test_truncated_image_is_rejected(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for suffix in (".png", ".jpg"):
        path = tmp_path / f"whole{suffix}"
        Image.fromarray(noise).save(path)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ImageError, match=r"cut\.(png|jpg): image is truncated or corrupt"):
            read_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        read_image(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.png: file not found; check the path"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_zero_size_pil_image() -> None:
    with pytest.raises(ImageError, match="zero size"):
        read_image(Image.new("RGB", (0, 0)))


def test_max_pixels_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(ImageError, match="over the limit of 1,000; downscale it"):
        read_image(path, max_pixels=1000)
    assert read_image(path, max_pixels=4096).size == (64, 64)


def test_decompression_bomb_is_an_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="too large to decode safely"):
        read_image(path)


def test_image_error_is_a_one_line_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        read_image(tmp_path / "nope.png")
    assert isinstance(info.value, DataError)
    assert "\n" not in str(info.value)


# --- read_pixels: libspng's fast path equals read_image ---------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (8 + 25 bytes)."""
    return png[:33] + png_chunk(kind, body) + png[33:]


def interlaced_png(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (PIL writes none), every row unfiltered."""
    height, width = rgb.shape[:2]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
              (0, 1, 1, 2)]
    raw = b"".join(b"\0" + row.tobytes() for x, y, dx, dy in passes
                   for row in rgb[y::dy, x::dx] if row.size)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png_files(folder: Path) -> dict[str, Path]:
    """One PNG per case the fast path must take or leave to PIL."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate: libspng knows nothing of it
    images = {
        "rgb": (Image.fromarray(rgb), {}),
        "grey": (Image.fromarray(grey), {}),
        "grey-transparency": (Image.fromarray(grey), {"transparency": 7}),
        "rgb-transparency": (Image.fromarray(rgb), {"transparency": (1, 2, 3)}),
        "rgba": (Image.fromarray(np.dstack([rgb, grey])), {}),
        "grey-alpha": (Image.fromarray(np.dstack([grey, grey])), {}),
        "palette": (Image.fromarray(rgb).quantize(17), {}),
        "16-bit": (Image.fromarray(grey.astype(np.uint16) * 257), {}),
        "1-bit": (Image.fromarray(grey > 128), {}),
        "exif-rotated": (Image.fromarray(rgb), {"exif": exif.tobytes()}),
    }
    paths = {}
    for name, (image, options) in images.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name], **options)
    gamma = with_chunk(paths["rgb"].read_bytes(), b"gAMA", struct.pack(">I", 100000))
    paths["rgb-gamma"] = folder / "rgb-gamma.png"
    paths["rgb-gamma"].write_bytes(gamma)
    paths["rgb-interlaced"] = folder / "rgb-interlaced.png"
    paths["rgb-interlaced"].write_bytes(interlaced_png(rgb))
    return paths


FAST = {"rgb", "grey", "grey-transparency", "rgb-transparency", "rgb-gamma", "rgb-interlaced"}


def test_read_pixels_equals_read_image_for_every_png_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libspng decodes the plain 8-bit grey and RGB files, ignoring transparency
    and gamma as PIL's RGB does, and leaves the rest to PIL: every result is read_image's, bit
    for bit; and the same with the fast path switched off."""
    paths = png_files(tmp_path)
    expected = {name: np.asarray(read_image(path)) for name, path in paths.items()}
    assert np.array_equal(expected["rgb-interlaced"], expected["rgb"])  # the file is right
    decoded = []
    real_decode = imagecodecs.spng_decode
    monkeypatch.setattr(imagecodecs, "spng_decode",
                        lambda data: decoded.append(len(data)) or real_decode(data))
    for name, path in paths.items():
        decoded.clear()
        pixels = read_pixels(path)
        assert pixels.dtype == np.uint8 and pixels.shape == expected[name].shape, name
        assert pixels.flags.c_contiguous, name
        assert np.array_equal(pixels, expected[name]), name
        assert bool(decoded) == (name in FAST), name
    monkeypatch.setattr(images_module, "_plain_png_size", lambda data: None)
    for name, path in paths.items():
        assert np.array_equal(read_pixels(path), expected[name]), name


def test_corrupt_plain_pngs_read_as_read_image_reads_them(tmp_path: Path) -> None:
    """Bytes of a plain RGB PNG changed at random, or cut short: read_pixels refuses the file
    exactly when read_image does, with the same message, and otherwise gives its pixels (PIL
    does not check IDAT's CRC, libspng does; such a file goes to PIL)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 24, 3), np.uint8)
    source = tmp_path / "source.png"
    Image.fromarray(pixels).save(source)
    data = source.read_bytes()
    path = tmp_path / "x.png"
    outcomes = set()
    for _ in range(150):
        changed = bytearray(data)
        for position in rng.integers(26, len(data), rng.integers(1, 4)):
            changed[position] = rng.integers(0, 256)
        if rng.random() < 0.2:
            changed = changed[: rng.integers(40, len(changed))]
        path.write_bytes(bytes(changed))
        try:
            expected = np.asarray(read_image(path))
        except ImageError as error:
            with pytest.raises(ImageError) as refused:
                read_pixels(path)
            assert str(refused.value) == str(error)
            outcomes.add("refused")
        else:
            assert np.array_equal(read_pixels(path), expected)
            outcomes.add("read")
    assert outcomes == {"refused", "read"}  # both branches ran


def test_read_pixels_failures_say_what_read_image_says(tmp_path: Path) -> None:
    """A truncated plain PNG, the size limit (checked from the header, before
    decoding), a missing file: the messages read_image gives."""
    path = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: image is truncated or corrupt"):
        read_pixels(cut)
    with pytest.raises(ImageError, match="over the limit of 1,000; downscale it"):
        read_pixels(path, max_pixels=1000)
    with pytest.raises(ImageError, match=r"nope\.png: file not found; check the path"):
        read_pixels(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_pixels(tmp_path)
    with pytest.raises(ImageError, match=r"bytes\.png: not an image"):
        decode_pixels(b"hello", "bytes.png")


def test_messages_from_bytes_name_the_file(tmp_path: Path) -> None:
    """A float TIFF with NaN read from bytes (a file's, or an upload's) is refused under its
    own name, not "<PIL image>"."""
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)).save(path)
    with pytest.raises(ImageError, match=r"nan\.tif: float image has NaN"):
        read_pixels(path)
    with pytest.raises(ImageError, match=r"^upload\.tif: float image has NaN"):
        read_image_bytes(path.read_bytes(), "upload.tif")


def test_preprocess_pixels_of_a_file_or_array_at_its_size(tmp_path: Path) -> None:
    """A file's pixels at the model's size are used as decoded, a writable copy when needed;
    other sizes are resized as before."""
    preprocess = Preprocess(size=16)
    noise = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = tmp_path / "at-size.png"
    Image.fromarray(noise).save(path)
    assert np.array_equal(preprocess.pixels(path).numpy(), noise)
    assert np.array_equal(preprocess.pixels(str(path)).numpy(), noise)
    frozen = noise.copy()
    frozen.flags.writeable = False
    assert preprocess.pixels(frozen).numpy().flags.writeable
    larger = np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(larger).save(path)
    expected = np.array(Image.fromarray(larger).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(preprocess.pixels(path).numpy(), expected)


# --- masks -------------------------------------------------------------------------------------


def test_read_mask_binarises_any_mode(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    expected = [[False, True, True, True]]
    grey = tmp_path / "grey.png"
    Image.fromarray(values).save(grey)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.repeat(values[:, :, None], 3, axis=2)).save(rgb)
    bits = tmp_path / "bits.png"
    Image.fromarray(values > 0).save(bits)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 1, 300, 65535]], dtype=np.uint16)).save(deep)
    for path in (grey, rgb, bits, deep):
        mask = read_mask(path)
        assert mask.dtype == np.bool_
        assert mask.tolist() == expected, path.name


def test_read_mask_resize_is_nearest(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 255
    Image.fromarray(mask).save(path)
    resized = read_mask(path, size=(8, 6))
    assert resized.shape == (8, 6)
    assert resized.dtype == np.bool_
    expected = np.zeros((8, 6), dtype=bool)
    expected[:4, :3] = True
    assert (resized == expected).all()


def test_read_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        read_mask(tmp_path / "missing_mask.png")


def test_mask_to_tensor() -> None:
    mask = np.zeros((4, 4), dtype=np.float32)
    mask[:2, :2] = 0.8
    mask[2:, 2:] = 0.3
    tensor = mask_to_tensor(mask, 8)
    assert tensor.shape == (1, 8, 8)
    assert tensor.dtype == torch.float32
    assert tensor.sum().item() == 16
    assert tensor[0, :4, :4].eq(1).all()


# --- list_images -------------------------------------------------------------------------------


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.webp", ".hidden.png", "notes.txt", "d.TIFF"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.TIFF"]
    with pytest.raises(DataError, match="folder not found"):
        list_images(tmp_path / "absent")


# --- MVTec layout ------------------------------------------------------------------------------


def test_categories_and_samples(tiny_mvtec: FakeMVTec) -> None:
    assert list_categories(tiny_mvtec.root) == ["widget"]
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    train = category.train_samples()
    assert len(train) == tiny_mvtec.n_train
    assert {(s.label, s.defect, s.mask_path) for s in train} == {(0, "good", None)}
    assert category.defect_types() == ["hole", "scratch"]
    test = category.test_samples()
    assert len(test) == tiny_mvtec.n_good + 2 * tiny_mvtec.n_defect
    for sample in test:
        if sample.defect == "good":
            assert (sample.label, sample.mask_path) == (0, None)
        else:
            assert sample.label == 1
            assert sample.mask_path == (
                tiny_mvtec.root
                / "widget"
                / "ground_truth"
                / sample.defect
                / f"{sample.path.stem}_mask.png"
            )


def test_missing_root_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset root not found"):
        list_categories(tmp_path / "absent")
    with pytest.raises(DataError, match="dataset root not found"):
        MVTecCategory(tmp_path / "absent", "widget")
    with pytest.raises(DataError, match="no category folders"):
        list_categories(tmp_path)


def test_missing_category_lists_existing(tmp_path: Path) -> None:
    make_fake_mvtec(tmp_path, "widget", n_train=1, n_good=1, n_defect=1, size=16)
    make_fake_mvtec(tmp_path, "gadget", n_train=1, n_good=1, n_defect=1, size=16)
    with pytest.raises(DataError, match=r"'sprocket' not found; categories in .*: gadget, widget"):
        MVTecCategory(tmp_path, "sprocket")


def test_empty_or_missing_train_and_test(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path, n_train=1, n_good=1, n_defect=1, size=16)
    category = MVTecCategory(root, "widget")
    for image in list_images(root / "widget" / "train" / "good"):
        image.unlink()
    with pytest.raises(DataError, match="train/good: no images found"):
        category.train_samples()
    (root / "widget" / "train" / "good").rmdir()
    with pytest.raises(DataError, match="train/good: folder not found"):
        category.train_samples()
    shutil.rmtree(root / "widget" / "test")
    with pytest.raises(DataError, match="test: folder not found"):
        category.test_samples()
    with pytest.raises(DataError, match="test: folder not found"):
        category.defect_types()


def test_missing_mask(tmp_path: Path) -> None:
    root = make_fake_mvtec(tmp_path, n_train=1, n_good=1, n_defect=2, size=16)
    (root / "widget" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"hole/001\.png: no mask at .*001_mask\.png"):
        MVTecCategory(root, "widget").test_samples()
    samples = MVTecCategory(root, "widget", allow_missing_masks=True).test_samples()
    missing = [s for s in samples if s.mask_path is None and s.label == 1]
    assert [(s.defect, s.path.name) for s in missing] == [("hole", "001.png")]


# --- plain folders -----------------------------------------------------------------------------


def save_image(path: Path, size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 120, 120)).save(path)


def save_mask(path: Path, positive: bool, size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size[::-1], dtype=np.uint8)
    mask[2:5, 2:5] = 255 if positive else 0
    Image.fromarray(mask).save(path)


def test_plain_without_masks_has_unknown_labels(tmp_path: Path) -> None:
    for name in ("n1.png", "n2.jpg"):
        save_image(tmp_path / "normal" / name)
    save_image(tmp_path / "test" / "t1.png")
    plain = PlainFolders(tmp_path / "normal", tmp_path / "test")
    assert [s.path.name for s in plain.train_samples()] == ["n1.png", "n2.jpg"]
    assert [(s.label, s.defect) for s in plain.test_samples()] == [(-1, "unknown")]
    with pytest.raises(DataError, match="no test folder was given"):
        PlainFolders(tmp_path / "normal").test_samples()


def test_plain_flat_labels_from_masks(tmp_path: Path) -> None:
    save_image(tmp_path / "normal" / "n.png")
    for name in ("a.png", "b.png", "c.png"):
        save_image(tmp_path / "test" / name)
    save_mask(tmp_path / "masks" / "a_mask.bmp", positive=True)
    save_mask(tmp_path / "masks" / "b.png", positive=False)
    plain = PlainFolders(tmp_path / "normal", tmp_path / "test", tmp_path / "masks")
    got = [(s.path.name, s.label, s.defect, s.mask_path) for s in plain.test_samples()]
    assert got == [
        ("a.png", 1, "defect", tmp_path / "masks" / "a_mask.bmp"),
        ("b.png", 0, "good", tmp_path / "masks" / "b.png"),
        ("c.png", 0, "good", None),
    ]
    save_mask(tmp_path / "masks" / "a.png", positive=True)
    with pytest.raises(DataError, match="two masks for image 'a'"):
        plain.test_samples()


def test_plain_subfolders(tmp_path: Path) -> None:
    save_image(tmp_path / "normal" / "n.png")
    save_image(tmp_path / "test" / "good" / "g.png")
    save_image(tmp_path / "test" / "dent" / "d1.png")
    save_image(tmp_path / "test" / "dent" / "d2.png")
    save_mask(tmp_path / "masks" / "dent" / "d1_mask.png", positive=True)
    plain = PlainFolders(tmp_path / "normal", tmp_path / "test", tmp_path / "masks")
    got = [(s.path.name, s.label, s.defect, s.mask_path) for s in plain.test_samples()]
    assert got == [
        ("d1.png", 1, "dent", tmp_path / "masks" / "dent" / "d1_mask.png"),
        ("d2.png", 1, "dent", None),
        ("g.png", 0, "good", None),
    ]
    save_image(tmp_path / "test" / "loose.png")
    with pytest.raises(DataError, match="both images and sub-folders"):
        plain.test_samples()


def test_plain_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        PlainFolders(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        PlainFolders(tmp_path / "empty").train_samples()


# --- ImageDataset ------------------------------------------------------------------------------


def test_dataset_items(tiny_mvtec: FakeMVTec) -> None:
    category = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category)
    dataset = ImageDataset(category.test_samples(), Preprocess(size=32))
    dataset.check()
    by_defect = {}
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"image", "label", "mask", "path", "defect"}
        assert item["image"].shape == (3, 32, 32)
        assert item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 32, 32)
        assert item["mask"].dtype == torch.float32
        assert isinstance(item["label"], int)
        assert isinstance(item["path"], str)
        by_defect.setdefault(item["defect"], []).append(item)
        pixels, mask = dataset.pixels_and_mask(index)  # what the lanes read: the same image
        assert torch.equal(dataset.preprocess.normalize(torch.from_numpy(pixels)), item["image"])
        assert np.array_equal(mask, item["mask"][0].numpy() > 0.5)
    assert all(item["mask"].sum() == 0 for item in by_defect["good"])
    for defect in ("scratch", "hole"):
        assert all(item["mask"].sum() > 0 for item in by_defect[defect])
        assert set(torch.unique(by_defect[defect][0]["mask"]).tolist()) == {0.0, 1.0}


def test_dataset_mask_covers_the_defect(tiny_mvtec: FakeMVTec) -> None:
    sample = next(
        s
        for s in MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).test_samples()
        if s.defect == "scratch"
    )
    item = ImageDataset([sample], Preprocess(size=tiny_mvtec.size))[0]
    image = np.asarray(read_image(sample.path))
    assert (image[item["mask"][0].numpy() > 0] == 255).all()


def test_dataset_batches_with_default_collate(tiny_mvtec: FakeMVTec) -> None:
    samples = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).train_samples()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, Preprocess(size=32)), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["label"].tolist() == [0, 0, 0, 0]


def test_mask_size_mismatch(tmp_path: Path) -> None:
    save_image(tmp_path / "x.png", size=(16, 12))
    save_mask(tmp_path / "x_mask.png", positive=True, size=(8, 8))
    dataset = ImageDataset([Sample(tmp_path / "x.png", 1, "dent", tmp_path / "x_mask.png")])
    message = r"x_mask\.png: mask is 8x8 \(h x w\) but image .*x\.png is 12x16"
    with pytest.raises(DataError, match=message):
        dataset[0]
    with pytest.raises(DataError, match=message):
        dataset.check()


def test_check_lists_bad_files(tmp_path: Path) -> None:
    save_image(tmp_path / "ok.png")
    samples = [Sample(tmp_path / "ok.png", 0, "good")]
    for i in range(7):
        (tmp_path / f"bad{i}.png").write_text("not an image")
        samples.append(Sample(tmp_path / f"bad{i}.png", 0, "good"))
    with pytest.raises(DataError) as info:
        ImageDataset(samples).check()
    message = str(info.value)
    assert message.startswith("7 of 8 samples cannot be used: ")
    assert "bad0.png: not an image" in message
    assert "bad5.png" not in message
    assert message.endswith("and 2 more")
    assert "\n" not in message


# --- Preprocess --------------------------------------------------------------------------------


def test_preprocess_normalises_constant_grey() -> None:
    tensor = Preprocess(size=8)(Image.new("RGB", (20, 10), (128, 128, 128)))
    assert tensor.shape == (3, 8, 8)
    assert tensor.dtype == torch.float32
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
        expected = (128 / 255 - mean) / std
        assert torch.allclose(tensor[channel], torch.full((8, 8), expected), atol=1e-6)
    half = Preprocess(size=4, mean=HALF, std=HALF)(np.zeros((4, 4), dtype=np.uint8))
    assert torch.allclose(half, torch.full((3, 4, 4), -1.0))


def test_preprocess_resize_matches_pil_bilinear() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    tensor = Preprocess(size=16, mean=(0, 0, 0), std=(1, 1, 1))(noise)
    expected = np.array(Image.fromarray(noise).resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(tensor, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_preprocess_pixels_then_normalize_is_the_same_tensor() -> None:
    """Decoding workers hand over uint8 pixels and the batch is normalised later: bit for bit
    what the one-step path gives, for one image and a batch."""
    preprocess = Preprocess(size=16)
    images = [np.random.default_rng(seed).integers(0, 256, (40, 30, 3), dtype=np.uint8)
              for seed in range(3)]
    pixels = torch.stack([preprocess.pixels(image) for image in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16, 3)
    batch = preprocess.normalize(pixels)
    for index, image in enumerate(images):
        assert torch.equal(batch[index], preprocess(image))
        assert torch.equal(preprocess.normalize(pixels[index]), preprocess(image))


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), (HALF, HALF),
                                       ((0.1, 0.7, 0.33), (0.05, 1.3, 0.27))])
def test_normalizing_a_numpy_array_is_bit_for_bit_the_tensors(mean, std) -> None:
    """The threads that feed ONNX Runtime normalise with numpy: every pixel value in every
    channel (all there is to a per-value map) gives exactly the tensor's float."""
    preprocess = Preprocess(size=16, mean=mean, std=std)
    every_value = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 16, 16, 3)
    array = preprocess.normalize(every_value)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    assert array.shape == (1, 3, 16, 16) and array.flags.c_contiguous
    assert np.array_equal(array, preprocess.normalize(torch.from_numpy(every_value)).numpy())
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(preprocess.normalize(image), preprocess(image).numpy())


def test_preprocess_dict_round_trip() -> None:
    preprocess = Preprocess(size=128, mean=HALF, std=HALF)
    stored = preprocess.to_dict()
    assert stored == {"size": 128, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert Preprocess.from_dict(stored) == preprocess
    assert Preprocess.from_dict(Preprocess().to_dict()) == Preprocess()
    with pytest.raises(ValueError, match=r"missing keys \['std'\]"):
        Preprocess.from_dict({"size": 256, "mean": [0, 0, 0]})
    with pytest.raises(ValueError, match=r"unknown keys \['crop'\]"):
        Preprocess.from_dict({**stored, "crop": 224})


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"size": 2.5}, {"mean": (0.5, 0.5)}, {"std": (1.0, 0.0, 1.0)}]
)
def test_preprocess_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Preprocess"):
        Preprocess(**kwargs)


# --- real data ---------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_hazelnut(shared_mvtec: Path) -> None:
    assert "hazelnut" in list_categories(shared_mvtec)
    category = MVTecCategory(shared_mvtec, "hazelnut")
    train = category.train_samples()
    test = category.test_samples()
    assert len(train) == 50
    assert len(test) == 10
    assert sum(s.mask_path is not None for s in test) == 8
    assert category.defect_types() == ["crack", "cut", "hole", "print"]
    dataset = ImageDataset(test)
    dataset.check()
    item = dataset[[s.label for s in test].index(1)]
    assert item["image"].shape == (3, 256, 256)
    assert item["mask"].sum() > 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb's
    few hundred kilobytes look like before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_uploads_have_their_own_lower_pixel_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 item 8: a 79-megapixel upload was decoded (0.5-0.9 GB); now refused from the
    header, with the setting that raises the cap named."""
    from rd.data import read_image_bytes

    with pytest.raises(ImageError, match=r"79,000,000 pixels, over the limit of 25,000,000.*"
                                         r"RD_MAX_UPLOAD_PIXELS"):
        read_image_bytes(_png_header(10_000, 7_900), "bomb.png")
    monkeypatch.setenv("RD_MAX_UPLOAD_PIXELS", "1000")
    buffer = __import__("io").BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        read_image_bytes(buffer.getvalue(), "small.png")
    monkeypatch.setenv("RD_MAX_UPLOAD_PIXELS", "lots")
    with pytest.raises(DataError, match=r"\$RD_MAX_UPLOAD_PIXELS must be a positive whole"):
        read_image_bytes(buffer.getvalue(), "small.png")


def test_limit_messages_name_settings_that_exist(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 item 10: "raise max_pixels" and "allow_missing_masks=True" named no flag."""
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setenv("RD_MAX_PIXELS", "1000")
    with pytest.raises(ImageError, match="environment variable RD_MAX_PIXELS=<pixels>") as info:
        read_image(path)
    assert "max_pixels" not in str(info.value)
    monkeypatch.setenv("RD_MAX_PIXELS", "5000")
    assert read_image(path).size == (64, 64)
    root = make_fake_mvtec(tmp_path / "data")
    next((root / "widget" / "ground_truth" / "hole").iterdir()).unlink()
    with pytest.raises(DataError, match="pass --allow-missing-masks to skip") as info:
        MVTecCategory(root, "widget").test_samples()
    assert "=True" not in str(info.value)
