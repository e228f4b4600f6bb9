"""The options beyond the paper on the command line: --preset fills them, explicit flags win,
and the paper's recipe is what no flag gives."""

from __future__ import annotations

import pytest

from rd.cli import build_parser
from rd.cli.train import train_config
from rd.training import PRESETS, TrainConfig, TrainingError

BASE = ["train", "--data", "x", "--category", "y", "--out", "o.safetensors", "--device", "cpu"]


def config_of(*flags: str) -> TrainConfig:
    return train_config(build_parser().parse_args([*BASE, *flags]))


def test_no_flag_is_the_paper() -> None:
    config = config_of()
    assert (config.resize, config.teacher_adapt, config.augment) == ("squash", "none", "none")
    assert config.recipe() == TrainConfig(device="cpu").recipe()


def test_flags_reach_the_config_and_its_recipe() -> None:
    config = config_of("--resize", "tile", "--tile-scale", "0.5", "--teacher-adapt", "bn",
                       "--augment", "hflip,blur", "--position-stats")
    assert config.recipe()["resize"] == "tile" and config.recipe()["tile_scale"] == 0.5
    assert config.recipe()["teacher_adapt"] == "bn"
    assert config.recipe()["augment"] == "hflip,blur"
    assert config.recipe()["position_stats"] is True
    assert "position_stats" not in config_of().recipe()
    assert config_of("--position-stats", "auto", "--position-score").recipe()[
        "position_stats"] == "auto"


def test_position_stats_are_on_off_auto_envelope_or_adaptive(capsys) -> None:
    with pytest.raises(SystemExit):
        config_of("--position-stats", "always")
    assert "'auto', 'envelope', 'adaptive' or nothing" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="on, off, auto, envelope or adaptive"):
        TrainConfig(position_stats="yes").validate()
    assert TrainConfig.from_dict({"position_stats": "auto"}).position_stats == "auto"
    assert config_of("--position-stats", "adaptive", "--position-score").position_score
    with pytest.raises(TrainingError, match="on, off, auto, envelope or adaptive"):
        TrainConfig.from_dict({"position_stats": 1})


def test_preset_fills_options_and_explicit_flags_win(monkeypatch) -> None:
    monkeypatch.setitem(PRESETS, "robust", {"resize": "multiscale", "teacher_adapt": "bn"})
    config = config_of("--preset", "robust")
    assert (config.resize, config.teacher_adapt) == ("multiscale", "bn")
    config = config_of("--preset", "robust", "--teacher-adapt", "none")
    assert (config.resize, config.teacher_adapt) == ("multiscale", "none")


def test_bad_values_are_refused() -> None:
    with pytest.raises(TrainingError, match="--augment"):
        config_of("--augment", "sharpen")
    with pytest.raises(TrainingError, match="tile scale"):
        config_of("--resize", "tile", "--tile-scale", "0")


def test_the_fixtured_preset_is_the_combination_that_won_on_parts_in_place() -> None:
    config = config_of("--preset", "fixtured")
    assert (config.resize, config.augment, config.ema, config.position_stats,
            config.position_score) == ("multiscale", "auto", 1.0, True, True)
    without = config_of("--preset", "fixtured", "--no-position-stats")  # neither, then
    assert (without.position_stats, without.position_score) == (False, False)
    assert config_of("--preset", "fixtured", "--no-position-score").position_score is False
    unsure = config_of("--preset", "fixtured", "--position-stats", "auto")  # the README's
    assert (unsure.resize, unsure.position_stats, unsure.position_score) == (
        "multiscale", "auto", True)


def test_position_score_needs_position_stats() -> None:
    assert config_of("--position-stats", "--position-score").recipe()["position_score"] is True
    assert "position_score" not in config_of("--position-stats").recipe()
    with pytest.raises(TrainingError, match="add --position-stats"):
        config_of("--position-score")


def test_the_robust_preset_is_the_combination_that_won_every_dataset() -> None:
    config = config_of("--preset", "robust")
    assert (config.resize, config.augment, config.ema, config.position_stats,
            config.position_score, config.aligned_stats, config.turn_average) == (
        "multiscale", "auto", 1.0, "adaptive", True, "auto", "auto")
    forced = config_of("--preset", "robust", "--turn-average", "--no-aligned-stats")
    assert (forced.turn_average, forced.aligned_stats) == (True, False)
    assert config_of("--preset", "robust", "--no-turn-average").turn_average is False
    assert config.recipe()["turn_average"] == "auto"
