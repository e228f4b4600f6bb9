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


def test_the_verdict_rule_flags_a_score_equal_to_the_threshold():
    """Issue 10 bug 2: one rule, ``score >= threshold`` is defective, for numbers, numpy
    scalars, arrays (the contour of flagged pixels) and ImageDetection alike."""
    import rd.detector as module
    from rd.decision import ImageDetection, is_defective, verdict

    assert (module.is_defective, module.verdict, module.ImageDetection) == (
        is_defective, verdict, ImageDetection)  # one definition, re-exported
    assert is_defective(0.5, 0.5) is True and is_defective(np.float32(0.5), 0.5) is True
    below = np.nextafter(0.5, 0.0)
    assert is_defective(below, 0.5) is False
    assert (verdict(0.5, 0.5), verdict(below, 0.5)) == ("defective", "normal")
    np.testing.assert_array_equal(is_defective(np.array([0.4, 0.5, 0.6]), 0.5),
                                  [False, True, True])
    empty = np.empty(0, np.float32)
    assert ImageDetection(0.5, empty, empty).verdict(0.5) == "defective"
    assert ImageDetection(below, empty, empty).is_defective(0.5) is False


def test_predict_rows_use_the_verdict_rule_at_the_threshold(detector, tiny_mvtec, tmp_path):
    """The command line's rows (rd.scoring) say "defective" for a score equal to the
    threshold and "normal" just below it, as every page does."""
    from rd.scoring import collect_inputs, read_rows, score

    path = next((tiny_mvtec.root / tiny_mvtec.category / "test" / "hole").iterdir())
    inputs = collect_inputs([path])
    first = tmp_path / "first.jsonl"
    score(detector, inputs, first, threshold=0.0, workers=0, progress=False)
    value = read_rows(first, "jsonl")[0]["score"]
    verdicts = []
    for name, threshold in (("at", value), ("above", float(np.nextafter(value, np.inf)))):
        out = tmp_path / f"{name}.jsonl"
        score(detector, inputs, out, threshold=threshold, workers=0, progress=False)
        [row] = read_rows(out, "jsonl")
        assert row["score"] == value
        verdicts.append(row["verdict"])
    assert verdicts == ["defective", "normal"]
