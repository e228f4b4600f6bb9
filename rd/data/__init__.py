"""Data loading: robust image/mask reading, dataset layouts, and the shared preprocessing."""

from rd.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    DataError,
    ImageError,
    ImageSource,
    decode_pixels,
    image_file_bytes,
    list_images,
    read_image,
    read_image_bytes,
    read_mask,
    read_pixels,
    resize_mask,
)
from rd.data.mvtec import (
    GOOD,
    UNKNOWN_LABEL,
    MVTecCategory,
    Sample,
    holdout_view,
    list_categories,
)
from rd.data.normalization import HALF, IMAGENET_MEAN, IMAGENET_STD
from rd.data.plain import PlainFolders
from rd.lazy import lazy_attributes

# Names resolved on first use (PEP 562): their modules import torch (transforms, dataset) or
# scipy (synthetic), which listing and showing images, the studio's first page, does not need.
_LAZY = {
    "ImageDataset": "rd.data.dataset",
    "SYNTHETIC_CATEGORIES": "rd.data.synthetic",
    "builtin_dataset_root": "rd.data.synthetic",
    "ensure_builtin_dataset": "rd.data.synthetic",
    "generate_dataset": "rd.data.synthetic",
    "render_sample": "rd.data.synthetic",
    "Preprocess": "rd.data.transforms",
    "mask_to_tensor": "rd.data.transforms",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "GOOD",
    "HALF",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "SYNTHETIC_CATEGORIES",
    "UNKNOWN_LABEL",
    "DataError",
    "ImageDataset",
    "ImageError",
    "ImageSource",
    "MVTecCategory",
    "PlainFolders",
    "Preprocess",
    "Sample",
    "builtin_dataset_root",
    "decode_pixels",
    "ensure_builtin_dataset",
    "generate_dataset",
    "holdout_view",
    "image_file_bytes",
    "list_categories",
    "list_images",
    "mask_to_tensor",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_pixels",
    "render_sample",
    "resize_mask",
]
