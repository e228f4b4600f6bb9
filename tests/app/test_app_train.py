"""The Train page through Streamlit's AppTest: submit a job, see it listed, cancel it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from rd import jobs
from rd.training import TrainConfig
from tests.app.apptest import open_page


@pytest.fixture
def jobs_root(studio, jobs_folder: Path) -> Path:
    """The shared studio data folder as RD_HOME, a fresh jobs folder."""
    return jobs_folder


def _table(at: AppTest):
    (frame,) = [d.value for d in at.dataframe if "state" in d.value.columns]
    return frame


def test_submit_list_and_cancel(studio, jobs_root):
    at = _train_page(studio)
    assert at.selectbox(key="train::category").value == studio.category  # the sidebar's
    assert at.selectbox(key="train::backbone").value == "efficientnet_lite0"
    at.number_input(key="train::epochs").set_value(500)
    at.number_input(key="train::batch").set_value(4)
    at.number_input(key="train::size::None").set_value(64)
    at.selectbox(key="train::device").set_value("cpu")
    at.button(key="train::start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    (job,) = jobs.list_jobs()
    assert job.spec["dataset"] == studio.dataset and job.spec["epochs"] == 500
    table = _table(at)
    assert list(table["job"]) == [job.id] and table["state"][0] in jobs.ACTIVE

    at.button(key="train::start").click().run()  # the same form again: the same job
    assert [j.id for j in jobs.list_jobs()] == [job.id]

    at.button(key=f"cancel::{job.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    deadline = time.monotonic() + 60
    while jobs.get(job.id).state != "cancelled":
        assert time.monotonic() < deadline, jobs.get(job.id).log_tail()
        time.sleep(0.5)
        jobs.schedule()
    at.run()
    assert list(_table(at)["state"]) == ["cancelled"]
    assert at.button(key=f"resume::{job.id}")  # offered for a cancelled job


def _buttons(at: AppTest) -> set[str]:
    return {button.key for button in at.button}


def _broken_job(studio, root: Path) -> jobs.Job:
    """A queued job (no slot: it never starts) whose status.json is then emptied (issue 13)."""
    job = jobs.submit(TrainConfig(epochs=1, image_size=64, batch_size=4, device="cpu"),
                      studio.root, studio.category, dataset=studio.dataset)
    assert job.state == "queued"
    (root / job.id / "status.json").write_text("{}\n")
    return jobs.get(job.id)


def _train_page(studio) -> AppTest:
    return open_page(studio.dataset, "screens/train.py")


def test_a_broken_job_is_listed_and_repaired(studio, jobs_root, monkeypatch):
    """Issue 13 case 2: a status.json of ``{}`` is listed as broken with its reason, never
    crashes the page; Repair makes it resumable."""
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    broken = _broken_job(studio, jobs_root)
    assert broken.state == jobs.BROKEN
    at = _train_page(studio)
    table = _table(at)
    assert list(table["job"]) == [broken.id] and list(table["state"]) == [jobs.BROKEN]
    assert "status.json has no valid 'state'" in table["problem"][0]
    assert any("cannot be read" in w.value for w in at.warning)
    assert f"resume::{broken.id}" not in _buttons(at)  # not resumable while broken

    at.button(key=f"repair::{broken.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert jobs.get(broken.id).state == "interrupted"
    assert list(_table(at)["state"]) == ["interrupted"]
    assert f"resume::{broken.id}" in _buttons(at)  # resumable now


def test_a_broken_job_is_deleted_after_confirmation(studio, jobs_root, monkeypatch):
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    kept = jobs.submit(TrainConfig(epochs=1, image_size=64, batch_size=4, device="cpu"),
                       studio.root, studio.category, dataset=studio.dataset, name="kept")
    broken = _broken_job(studio, jobs_root)
    at = _train_page(studio)
    assert dict(zip(_table(at)["job"], _table(at)["state"], strict=True)) == {
        kept.id: "queued", broken.id: jobs.BROKEN}  # one broken folder hides no other job
    at.selectbox(key="train::job").set_value(broken.id).run()
    at.button(key=f"job::{broken.id}::delete").click().run()
    at.button(key=f"job::{broken.id}::keep").click().run()  # changed one's mind
    assert (jobs_root / broken.id).is_dir()
    at.button(key=f"job::{broken.id}::delete").click().run()
    assert (jobs_root / broken.id).is_dir()  # asking is not deleting
    assert any("cannot be undone" in w.value for w in at.warning)
    at.button(key=f"job::{broken.id}::confirm").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not (jobs_root / broken.id).exists()
    assert [job.id for job in jobs.list_jobs()] == [kept.id]
    assert list(_table(at)["job"]) == [kept.id]


def test_options_beyond_the_paper_reach_the_job(studio, jobs_root, monkeypatch):
    """The folded-away options (geometry, augmentation, learning-rate schedule, weight
    average, position and aligned statistics, turn average) go into the job's configuration
    when changed, and stay the paper's when not."""
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")  # queued: no process is started
    at = _train_page(studio)
    at.selectbox(key="train::device").set_value("cpu")
    at.selectbox(key="train::augment").set_value("auto")
    at.selectbox(key="train::lr_schedule").set_value("cosine")
    at.number_input(key="train::ema").set_value(1.5)
    assert at.checkbox(key="train::position_score").disabled  # only with the statistics
    at.selectbox(key="train::position_stats").set_value("auto").run()
    assert not at.checkbox(key="train::position_score").disabled
    at.checkbox(key="train::position_score").check()
    at.selectbox(key="train::aligned_stats").set_value("auto")
    at.selectbox(key="train::turn_average").set_value("auto")
    at.button(key="train::start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    (job,) = jobs.list_jobs()
    config = job.config
    assert (config.augment, config.lr_schedule, config.ema) == ("auto", "cosine", 1.5)
    assert config.position_stats == "auto" and config.position_score is True
    assert (config.aligned_stats, config.turn_average) == ("auto", "auto")
    assert (config.resize, config.teacher_adapt) == ("squash", "none")  # the paper's
