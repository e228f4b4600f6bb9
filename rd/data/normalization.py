"""The input normalisation each teacher was trained with (per RGB channel); torch-free, so that
the backbone registry and the studio's first page can read it without importing torch."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # TensorFlow-style models, e.g. EfficientNet-Lite: [0, 1] → [-1, 1]
