"""Reading images and masks from any common file or array into one predictable form.

Every reader fully decodes its input, so a corrupt file fails here with a one-line message that
names it, not later inside a training loop. Alpha channels are dropped (not composited): anomaly
models see the stored colour values, which is what an RGB export of the same file would hold.

Decoded size is capped before decoding, from the header: a small file can decode to a huge
image (a 250 KB PNG of 79 megapixels costs the server most of a gigabyte). Files read from disk
may have up to ``$RD_MAX_PIXELS`` pixels (default 80 million); uploads (``read_image_bytes``) up
to ``$RD_MAX_UPLOAD_PIXELS`` (default 25 million).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
from PIL import Image, ImageOps

from rd.errors import RDError

DEFAULT_MAX_PIXELS = 80_000_000
DEFAULT_MAX_UPLOAD_PIXELS = 25_000_000
MAX_PIXELS_ENV = "RD_MAX_PIXELS"
MAX_UPLOAD_PIXELS_ENV = "RD_MAX_UPLOAD_PIXELS"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

ImageSource = str | Path | Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(RDError, ValueError):
    """A dataset or file cannot be used; the message says which one and what to do."""


class ImageError(DataError):
    """One image or mask cannot be read; the message names the file and the fix."""


def _fail(name: str, problem: str, action: str) -> ImageError:
    return ImageError(f"{name}: {problem}; {action}")


def pixel_limit(upload: bool = False) -> int:
    """Most pixels an image may decode to: ``$RD_MAX_PIXELS`` (files) or
    ``$RD_MAX_UPLOAD_PIXELS`` (uploads), else the defaults."""
    variable = MAX_UPLOAD_PIXELS_ENV if upload else MAX_PIXELS_ENV
    default = DEFAULT_MAX_UPLOAD_PIXELS if upload else DEFAULT_MAX_PIXELS
    value = os.environ.get(variable, "").strip().replace("_", "")
    if not value:
        return default
    if not value.isdigit() or int(value) <= 0:
        raise DataError(f"${variable} must be a positive whole number of pixels, got "
                        f"{os.environ[variable]!r}")
    return int(value)


def _check_size(name: str, width: int, height: int, max_pixels: int | None,
                upload: bool = False) -> None:
    if width <= 0 or height <= 0:
        raise _fail(name, f"image has zero size ({width}x{height})", "re-export or remove it")
    limit = pixel_limit(upload) if max_pixels is None else max_pixels
    if width * height > limit:
        variable = MAX_UPLOAD_PIXELS_ENV if upload else MAX_PIXELS_ENV
        raise _fail(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limit:,}",
            f"downscale it first, or raise the limit with the environment variable "
            f"{variable}=<pixels>",
        )


def _decode(image: Image.Image, name: str, max_pixels: int | None, upload: bool = False
            ) -> Image.Image:
    """Check the size from the header, force a full decode, and turn upright per EXIF."""
    _check_size(name, image.width, image.height, max_pixels, upload)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise _fail(
            name, f"image is truncated or corrupt ({exc})", "re-export or remove it"
        ) from exc
    return ImageOps.exif_transpose(image)


def _check_file(path: Path) -> None:
    if not path.is_file():
        problem = "is a folder, not an image file" if path.is_dir() else "file not found"
        raise _fail(str(path), problem, "check the path")


def _open(source: str | Path | Image.Image, max_pixels: int | None
          ) -> tuple[Image.Image, str]:
    """Open and fully decode a path or PIL image; returns (image, name for messages)."""
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        return _decode(source, name, max_pixels), name
    path = Path(source)
    _check_file(path)
    return _open_file(path, str(path), max_pixels), str(path)


def _open_file(file: Path | BinaryIO, name: str, max_pixels: int | None,
               upload: bool = False) -> Image.Image:
    """Open and fully decode a file, turning PIL's exceptions into ImageError."""
    try:
        # Our own max_pixels check covers the range where PIL only warns; PIL's hard limit
        # (DecompressionBombError above 2x Image.MAX_IMAGE_PIXELS) still applies on top.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as exc:
        raise _fail(name, "image is too large to decode safely", "downscale it first") from exc
    except MemoryError as exc:
        raise _fail(name, "not enough memory to open it", "downscale it first") from exc
    except Image.UnidentifiedImageError as exc:
        raise _fail(
            name, "not an image or an unsupported format", "convert it to PNG or remove it"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise _fail(name, f"image header is corrupt ({exc})", "re-export or remove it") from exc
    with image:
        return _decode(image, name, max_pixels, upload)


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """An RGB image from encoded bytes (an upload), with the same checks as ``read_image``.

    ``max_pixels`` defaults to the upload limit (``$RD_MAX_UPLOAD_PIXELS``), checked from the
    header before anything is decoded.
    """
    limit = pixel_limit(upload=True) if max_pixels is None else max_pixels
    return _to_rgb(_open_file(io.BytesIO(data), name, limit, upload=max_pixels is None), name,
                   limit)


def image_file_bytes(path: str | Path) -> bytes:
    """An image file's bytes, for ``decode_pixels`` (and its digest, from the same read)."""
    path = Path(path)
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(str(path), f"cannot be read ({exc.strerror or exc})",
                    "check its permissions") from exc


def _plain_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG that libspng turns into exactly ``read_image``'s pixels: 8-bit
    grey or RGB, no EXIF (orientation). Alpha, palettes and 16 bits go through PIL's
    conversions."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in (0, 2) or b"eXIf" in data:
        return None
    return width, height


def decode_pixels(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """``read_image`` of an image file's bytes as (H, W, 3) uint8 RGB pixels, bit for bit.

    Plain 8-bit grey or RGB PNGs, the commonest inspection export, are decoded by libspng
    (imagecodecs) without holding the GIL: 1.4-1.5x PIL's decode plus its conversion to an
    array, in one thread or two (benchmarks/decoding.py; docs/performance.md, round 20). Every
    other file, and one libspng refuses, goes to PIL with ``read_image``'s checks and messages.
    ``max_pixels`` as there.
    """
    size = _plain_png_size(data)
    if size is not None:
        _check_size(name, *size, max_pixels)
        try:
            pixels = imagecodecs.spng_decode(data)
        except imagecodecs.SpngError:  # corrupt or truncated: PIL's reading below says how
            pixels = None
        if pixels is not None:  # grey as PIL's RGB conversion makes it: the level thrice
            return pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
    return np.asarray(_to_rgb(_open_file(io.BytesIO(data), name, max_pixels), name, max_pixels))


def read_pixels(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """``read_image`` of a file as (H, W, 3) uint8 RGB pixels, bit for bit, decoded the fast
    way where there is one (``decode_pixels``)."""
    return decode_pixels(image_file_bytes(path), str(path), max_pixels)


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Map bool, uint8, uint16 (full 0..65535 range) or float [0, 1] data to uint8."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return np.round(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise _fail(name, "float image has NaN or infinite values", "fix the data")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise _fail(
                name,
                f"float image has values in [{array.min():g}, {array.max():g}], outside [0, 1]",
                "rescale it to [0, 1] or save it as 8-bit",
            )
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise _fail(
        name, f"unsupported pixel type {array.dtype}", "use uint8, uint16, bool or float in [0, 1]"
    )


def _array_to_rgb(array: np.ndarray, name: str, max_pixels: int | None) -> Image.Image:
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3]
    elif array.ndim != 2:
        raise _fail(name, f"array shape {array.shape} is not an image", "use (H,W), (H,W,1|3|4)")
    _check_size(name, array.shape[1], array.shape[0], max_pixels)
    pixels = np.ascontiguousarray(_to_uint8(array, name))
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return Image.fromarray(pixels)


def _wide_mode_array(image: Image.Image, name: str) -> np.ndarray:
    """Pixels of a 16-bit, 32-bit integer or float image, as uint16 or float32."""
    array = np.asarray(image)
    if image.mode == "I":
        # 16-bit PNGs and TIFFs often decode to mode I; treat its values as 16-bit data.
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise _fail(
                name,
                "32-bit integer image has values outside 0..65535",
                "save it as 8- or 16-bit",
            )
        return array.astype(np.uint16)
    return array


def read_image(source: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Read a path, PIL image or array as an upright 8-bit RGB PIL image.

    16-bit data is scaled by its full range (65535 -> 255) rather than clipped, float data must
    lie in [0, 1], and alpha is dropped. ``max_pixels`` defaults to ``$RD_MAX_PIXELS`` (80
    million). Raises ImageError for anything unusable.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, "<array>", max_pixels)
    return _to_rgb(*_open(source, max_pixels), max_pixels)


def _to_rgb(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    """A decoded image of any mode as 8-bit RGB; ``name`` for the messages."""
    if image.mode == "RGB":
        return image
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return _array_to_rgb(_wide_mode_array(image, name), name, max_pixels)
    if image.mode in ("P", "PA"):
        # Via RGBA so palette transparency is honoured without PIL's byte-transparency warning.
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise _fail(
            name, f"colour mode {image.mode} is not supported", "save it as RGB or greyscale"
        ) from exc


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a boolean (H, W) mask to size=(h, w) with nearest neighbour, keeping it binary."""
    height, width = size
    pixels = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
    return np.asarray(pixels.resize((width, height), Image.Resampling.NEAREST)) > 0


def read_mask(
    source: str | Path | Image.Image,
    size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read a ground-truth mask of any mode as a bool (H, W) array: any non-zero pixel is defect.

    size=(h, w) resizes with nearest neighbour so the mask stays binary.
    """
    image, name = _open(source, max_pixels)
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        mask = np.asarray(image) > 0
    else:
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        try:
            mask = np.asarray(image.convert("L")) > 0
        except ValueError as exc:
            raise _fail(
                name, f"colour mode {image.mode} is not supported", "save the mask as greyscale"
            ) from exc
    return mask if size is None else resize_mask(mask, size)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in folder (not sub-folders), sorted by name, hidden files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; check the path")
    return sorted(
        (
            path
            for path in folder.iterdir()
            if not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
        ),
        key=lambda path: path.name,
    )
