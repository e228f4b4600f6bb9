import json

import pytest
import torch

from rd.data import MVTecCategory
from rd.training import TrainConfig, TrainingError, log_path, resume_path, train

SMALL = {"image_size": 64, "batch_size": 4, "seed": 3, "device": "cpu"}


def _weights(model):
    return {k: v.clone() for k, v in model.student_state_dict().items()}


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), key


@pytest.fixture(scope="module")
def samples(tiny_mvtec):
    return MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).train_samples()


def test_training_reduces_loss_and_writes_checkpoint_and_log(samples, tmp_path):
    out = tmp_path / "model.safetensors"
    result = train(samples, TrainConfig(epochs=4, **SMALL), out, {"category": "widget"},
                   progress=False)
    assert out.is_file() and resume_path(out).is_file()
    assert result.losses[-1] < result.losses[0]
    records = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == pytest.approx(result.losses[-1])


def test_resume_continues_exactly(samples, tmp_path):
    straight = train(samples, TrainConfig(epochs=4, **SMALL), tmp_path / "a.safetensors",
                     progress=False)
    out = tmp_path / "b.safetensors"
    train(samples, TrainConfig(epochs=2, checkpoint_every=1, **SMALL), out, progress=False)
    resumed = train(samples, TrainConfig(epochs=4, **SMALL), out, resume=True, progress=False)
    assert resumed.epochs_trained == 4
    assert resumed.losses == pytest.approx(straight.losses[2:], abs=1e-6)
    _assert_same(_weights(resumed.model), _weights(straight.model), atol=1e-6)
    epochs = [json.loads(line)["epoch"] for line in log_path(out).read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_resume_refuses_changed_settings_or_missing_state(samples, tmp_path):
    out = tmp_path / "c.safetensors"
    train(samples, TrainConfig(epochs=1, **SMALL), out, progress=False)
    with pytest.raises(TrainingError, match="settings differ"):
        train(samples, TrainConfig(epochs=3, **{**SMALL, "batch_size": 2}), out, resume=True,
              progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(samples, TrainConfig(epochs=3, **SMALL), tmp_path / "none.safetensors",
              resume=True, progress=False)


def test_cached_teacher_features_give_the_uncached_result(samples, tmp_path):
    cached = train(samples, TrainConfig(epochs=2, cache_teacher="on", **SMALL),
                   tmp_path / "on.safetensors", progress=False)
    uncached = train(samples, TrainConfig(epochs=2, cache_teacher="off", **SMALL),
                     tmp_path / "off.safetensors", progress=False)
    assert cached.losses == pytest.approx(uncached.losses, abs=1e-5)
    _assert_same(_weights(cached.model), _weights(uncached.model), atol=1e-4)


def test_fine_tuning_starts_from_the_given_student(samples, tmp_path):
    base = tmp_path / "base.safetensors"
    first = train(samples, TrainConfig(epochs=3, **SMALL), base, progress=False)
    tuned = train(samples, TrainConfig(epochs=1, init=str(base), **SMALL),
                  tmp_path / "tuned.safetensors", progress=False)
    scratch = train(samples, TrainConfig(epochs=1, **SMALL), tmp_path / "s.safetensors",
                    progress=False)
    assert tuned.losses[0] < scratch.losses[0]
    assert tuned.losses[0] <= first.losses[-1] * 1.5


def test_invalid_options_are_refused_before_work(samples, tmp_path):
    for bad in ({"image_size": 50}, {"epochs": 0}, {"lr": -1.0}, {"batch_size": 0},
                {"cache_teacher": "maybe"}):
        with pytest.raises(TrainingError):
            train(samples, TrainConfig(**{**SMALL, **bad}), tmp_path / "x.safetensors",
                  progress=False)
    with pytest.raises(TrainingError, match="empty"):
        train([], TrainConfig(**SMALL), tmp_path / "x.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_defaults_are_the_paper_recipe():
    config = TrainConfig()
    assert (config.image_size, config.epochs, config.batch_size, config.lr, config.betas,
            config.seed) == (256, 200, 16, 0.005, (0.5, 0.999), 111)
