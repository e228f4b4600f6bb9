import numpy as np
import pytest
import torch
from PIL import Image

from rd.checkpoints import save_checkpoint
from rd.data import HALF, Preprocess
from rd.detector import load
from rd.model import build_model


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("det") / "m.safetensors"
    save_checkpoint(build_model("efficientnet_lite0"), path,
                    {"preprocess": Preprocess(64, HALF, HALF).to_dict(), "fusion": "sum"})
    return load(path, device="cpu")


def test_predict_accepts_paths_pil_arrays_and_tensors(detector, tiny_mvtec):
    path = next((tiny_mvtec.root / tiny_mvtec.category / "test" / "hole").iterdir())
    image = Image.open(path)
    array = np.asarray(image.convert("RGB"))
    from_path = detector.predict(path)
    assert from_path.layer_maps.shape == (1, 3, 64, 64)
    assert from_path.fused.shape == (1, 64, 64) and from_path.scores.shape == (1,)
    for other in (image, array, [path], detector.to_batch(path)):
        np.testing.assert_array_equal(detector.predict(other).fused, from_path.fused)


def test_batch_equals_single_images(detector, tiny_mvtec):
    paths = sorted((tiny_mvtec.root / tiny_mvtec.category / "test" / "good").iterdir())
    batch = detector.predict(paths)
    assert batch.fused.shape == (len(paths), 64, 64)
    for index, path in enumerate(paths):
        np.testing.assert_allclose(detector.predict(path).fused[0], batch.fused[index],
                                   atol=1e-5)


def test_wrong_batch_shape_is_refused(detector):
    with pytest.raises(ValueError, match=r"expected a preprocessed batch"):
        detector.predict(torch.zeros(1, 3, 32, 32))
