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


# ------------------------------------------------------------- issue 13: reliability cases


@pytest.mark.parametrize("bad", [
    {"lr": float("inf")}, {"lr": float("nan")}, {"betas": (0.5, float("inf"))},
    {"betas": (float("nan"), 0.9)}, {"image_size": 5_000_000}, {"device": "banana"},
    {"device": "mps"}, {"device": "meta"}, {"image_size": 64.0}, {"epochs": "3"},
    {"image_size": 32, "batch_size": 1}, {"betas": (0.5,)},
])
def test_unusable_settings_are_refused_with_the_flag_named(samples, tmp_path, bad):
    """Issue 13 items 5 and 9: inf/NaN settings, bad devices and huge sizes never train."""
    with pytest.raises(TrainingError, match=r"--|device"):
        train(samples, TrainConfig(**{**SMALL, **bad}), tmp_path / "x.safetensors",
              progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(samples, tmp_path,
                                                                       monkeypatch):
    """Issue 13 item 5: the loss turning NaN ends the run with an error; epoch 1 stays."""
    import rd.training

    real_loss, calls = rd.training.reverse_distillation_loss, []

    def loss_turning_nan(features, rebuilt):
        calls.append(1)
        loss = real_loss(features, rebuilt)
        return loss * float("nan") if len(calls) > 3 else loss  # 3 steps = epoch 1 (12 / 4)

    monkeypatch.setattr(rd.training, "reverse_distillation_loss", loss_turning_nan)
    out = tmp_path / "m.safetensors"
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2.*epoch 1 are kept"):
        train(samples, TrainConfig(epochs=3, checkpoint_every=1, **SMALL), out, progress=False)
    from rd.checkpoints import read_metadata

    assert read_metadata(out)["epochs_trained"] == 1
    assert [json.loads(line)["epoch"] for line in log_path(out).read_text().splitlines()] == [1]


def test_a_last_batch_of_one_at_32_px_is_merged(samples, tmp_path):
    """Issue 13 item 11: 9 images at batch 8 and 32 px trained into a batch-norm error."""
    from rd.training import World, _steps

    assert [size for _, size in _steps(list(range(17)), 16, World(), 32)] == [17]
    assert [size for _, size in _steps(list(range(17)), 16, World(), 64)] == [16, 1]
    assert [size for _, size in _steps(list(range(18)), 16, World(), 32)] == [16, 2]
    result = train(samples[:9], TrainConfig(**{**SMALL, "image_size": 32, "batch_size": 8,
                                                "epochs": 1}),
                   tmp_path / "m.safetensors", progress=False)
    assert result.epochs_trained == 1


def test_a_second_run_on_the_same_output_is_refused(samples, tmp_path):
    """Issue 13 item 4: two runs with one --out interleaved their logs; the second now stops."""
    import fcntl
    import os

    from rd.training import lock_path

    out = tmp_path / "m.safetensors"
    handle = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)  # another run holding the lock
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        with pytest.raises(TrainingError, match="another training run is writing"):
            train(samples, TrainConfig(epochs=1, **SMALL), out, progress=False)
        assert not out.exists() and not log_path(out).exists()
    finally:
        os.close(handle)
    train(samples, TrainConfig(epochs=1, **SMALL), out, progress=False)  # free again
    assert out.is_file() and not lock_path(out).exists()


def test_a_size_that_cannot_fit_in_memory_is_refused_with_the_need(samples, tmp_path,
                                                                   monkeypatch):
    """Issue 13 item 9: say how much memory the size needs and which size fits."""
    import rd.training

    monkeypatch.setattr(rd.training, "available_memory_bytes", lambda: 1 << 30)
    with pytest.raises(TrainingError, match=r"needs at least .* GiB.*--image-size \d+ or less"):
        train(samples, TrainConfig(**{**SMALL, "image_size": 4096, "batch_size": 16}),
              tmp_path / "m.safetensors", progress=False)


def test_a_resume_state_without_its_epoch_is_a_clear_error(samples, tmp_path):
    """Issue 13 item 9: a resume file missing 'epoch' said only "cannot resume: 'epoch'"."""
    from safetensors.torch import save_file

    out = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, str(resume_path(out)), metadata={"recipe": "{}"})
    with pytest.raises(TrainingError, match=r"lacks the 'epoch' field.*without --resume"):
        train(samples, TrainConfig(epochs=2, **SMALL), out, resume=True, progress=False)


def _stop_in_epoch_3(samples, config: TrainConfig, out) -> None:
    """Train ``config`` into ``out`` and stop it on request after the first step of epoch 3
    (a resume state is written every epoch)."""
    from rd.training import TrainingStopped, request_stop

    stopped = TrainConfig(**{**config.to_dict(), "betas": config.betas, "checkpoint_every": 1})
    epochs = []

    def on_epoch(record):
        epochs.append(record["epoch"])
        if len(epochs) == 2:
            request_stop()

    with pytest.raises(TrainingStopped):
        train(samples, stopped, out, progress=False, on_epoch=on_epoch)


def test_cosine_schedule_falls_toward_zero_and_resumes_exactly(samples, tmp_path):
    """--lr-schedule cosine: --lr at the first epoch, falling toward 0 (the log says each
    epoch's rate); a function of the epoch, so a stopped run resumes on the same path; the
    constant default is the paper's rate throughout."""
    from rd.training import epoch_lr

    cosine = TrainConfig(epochs=3, lr_schedule="cosine", **SMALL)
    rates = [epoch_lr(cosine, e) for e in (1, 2, 3)]
    assert rates[0] == cosine.lr and rates[0] > rates[1] > rates[2] > 0
    assert rates[2] == pytest.approx(cosine.lr * 0.25)
    assert epoch_lr(TrainConfig(epochs=3), 3) == TrainConfig().lr
    assert cosine.recipe()["lr_schedule"] == "cosine" and "lr_schedule" not in \
        TrainConfig().recipe()

    straight = train(samples, cosine, tmp_path / "a.safetensors", progress=False)
    out = tmp_path / "b.safetensors"
    _stop_in_epoch_3(samples, cosine, out)
    resumed = train(samples, cosine, out, resume=True, progress=False)
    assert resumed.losses == pytest.approx(straight.losses[2:], abs=1e-6)
    _assert_same(_weights(resumed.model), _weights(straight.model), atol=1e-6)
    logged = [json.loads(line)["lr"] for line in log_path(out).read_text().splitlines()]
    assert logged == pytest.approx(rates)
    longer = TrainConfig(**{**cosine.to_dict(), "betas": cosine.betas, "epochs": 4})
    with pytest.raises(TrainingError, match="settings differ"):
        train(samples, longer, out, resume=True, progress=False)


def test_weight_average_has_the_half_life_it_is_given():
    """--ema's average: the first step copies the weights; then, holding the weights at a new
    value, ``half_life`` steps move the average half the way there."""
    from rd.model import build_model
    from rd.training import _WeightAverage

    model = build_model("resnet18", pretrained=False)
    average = _WeightAverage(model, half_life=2)
    start = _weights(model)
    average.update()
    with torch.no_grad():
        for parameter in [*model.bottleneck.parameters(), *model.decoder.parameters()]:
            parameter.add_(1.0)
    moved = _weights(model)
    average.update()
    average.update()
    averaged = average.student_state_dict()
    name = next(k for k in start if k.endswith("weight") and start[k].is_floating_point())
    assert torch.allclose(averaged[name], (start[name] + moved[name]) / 2, atol=1e-6)


def test_weight_average_is_what_is_saved_and_resumes_exactly(samples, tmp_path):
    """--ema 1: the checkpoint holds the average, not the last weights (which the paper's run
    of the same seed ends on); a run stopped mid-epoch resumes to the same average; the
    recipe records it, the paper's recipe does not name it."""
    from rd.checkpoints import load_checkpoint

    config = TrainConfig(epochs=3, ema=1.0, **SMALL)
    assert config.recipe()["ema"] == 1.0 and "ema" not in TrainConfig().recipe()
    paper = train(samples, TrainConfig(epochs=3, **SMALL), tmp_path / "p.safetensors",
                  progress=False)
    straight = train(samples, config, tmp_path / "a.safetensors", progress=False)
    assert straight.losses == pytest.approx(paper.losses, abs=1e-6)  # same path, other output
    saved, _ = load_checkpoint(tmp_path / "a.safetensors")
    _assert_same(_weights(saved), _weights(straight.model))
    last, averaged = _weights(paper.model), _weights(straight.model)
    assert any(not torch.allclose(last[k].float(), averaged[k].float()) for k in last)

    out = tmp_path / "b.safetensors"
    _stop_in_epoch_3(samples, config, out)
    resumed = train(samples, config, out, resume=True, progress=False)
    _assert_same(_weights(resumed.model), averaged, atol=1e-6)
    with pytest.raises(TrainingError, match="settings differ"):
        train(samples, TrainConfig(epochs=4, **SMALL), out, resume=True, progress=False)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True])
def test_a_weight_average_half_life_must_be_a_non_negative_number(bad):
    with pytest.raises(TrainingError, match="--ema"):
        TrainConfig(ema=bad).validate()
