"""The Train page through Streamlit's AppTest: submit a job, see it listed, cancel it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from rd import jobs

APP = Path(__file__).resolve().parents[2] / "app" / "main.py"


@pytest.fixture
def jobs_root(studio, jobs_folder: Path) -> Path:
    """The shared studio data folder as RD_HOME, a fresh jobs folder."""
    return jobs_folder


def _table(at: AppTest):
    (frame,) = [d.value for d in at.dataframe if "state" in d.value.columns]
    return frame


def test_submit_list_and_cancel(studio, jobs_root):
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["source"] = studio.dataset
    at.run()
    at.switch_page("screens/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
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
