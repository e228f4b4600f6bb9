"""Data loading: robust image/mask reading, dataset layouts, and the shared preprocessing."""

from rd.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    DataError,
    ImageError,
    ImageSource,
    list_images,
    read_image,
    read_image_bytes,
    read_mask,
    resize_mask,
)
from rd.data.mvtec import (
    GOOD,
    UNKNOWN_LABEL,
    ImageDataset,
    MVTecCategory,
    Sample,
    holdout_view,
    list_categories,
)
from rd.data.plain import PlainFolders
from rd.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    builtin_dataset_root,
    ensure_builtin_dataset,
    generate_dataset,
    render_sample,
)
from rd.data.transforms import HALF, IMAGENET_MEAN, IMAGENET_STD, Preprocess, mask_to_tensor

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
    "ensure_builtin_dataset",
    "generate_dataset",
    "holdout_view",
    "list_categories",
    "list_images",
    "mask_to_tensor",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "render_sample",
    "resize_mask",
]
