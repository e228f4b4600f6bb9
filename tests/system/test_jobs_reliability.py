"""Issue 13 items 2 and 3: broken job folders never hide jobs or crash a page; a job resumes
from the stage that was interrupted; a junk test image is skipped, not fatal."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from rd import jobs
from rd.training import TrainConfig
from tests.conftest import make_fake_mvtec

SMALL = {"image_size": 64, "batch_size": 4, "epochs": 2, "device": "cpu"}


def _cli(*argv: object) -> tuple[int, str, str]:
    from rd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def held(jobs_folder, tiny_mvtec, monkeypatch):
    """Two queued jobs that never start (no CPU slot)."""
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    first = jobs.submit(TrainConfig(**SMALL), tiny_mvtec.root, tiny_mvtec.category, name="a")
    second = jobs.submit(TrainConfig(**SMALL), tiny_mvtec.root, tiny_mvtec.category, name="b")
    return first, second


@pytest.mark.parametrize("damage", [
    ("status.json", "{}"), ("status.json", '{"state": "queued", "queued'),
    ("status.json", "[]"), ("status.json", '{"state": "running"}'), ("status.json", None),
    ("spec.json", '{"id": 1}'), ("spec.json", ""), ("spec.json", '{"submitted": "x"}'),
], ids=["status-empty-object", "status-truncated", "status-list", "running-without-pid",
        "status-missing", "spec-wrong", "spec-empty", "spec-bad-time"])
def test_a_broken_job_is_listed_with_its_reason_and_hides_nothing(held, damage):
    """`echo '{}' > status.json` made `jobs list` raise KeyError; a truncated one hid the job."""
    first, second = held
    name, text = damage
    path = first.folder / name
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    listed = {job.id: job for job in jobs.list_jobs()}
    assert set(listed) == {first.id, second.id}
    assert listed[second.id].state == "queued"
    broken = listed[first.id]
    assert broken.state == jobs.BROKEN and name in broken.status["message"]
    assert broken.progress().epoch == 0 and broken.command.startswith("(unknown")
    code, out, err = _cli("jobs", "list")
    assert code == 0 and f"{first.id}: broken: {name}" in out and second.id in out, err
    code, out, _ = _cli("jobs", "show", first.id)
    assert code == 0 and "broken" in out
    code, _, err = _cli("jobs", "resume", first.id)
    assert code == 2 and "jobs repair" in err


def test_repair_makes_a_damaged_status_resumable_and_delete_removes(held):
    first, second = held
    (first.folder / "status.json").write_text('{"state": "run')
    code, out, err = _cli("jobs", "repair", first.id)
    assert code == 0 and "interrupted" in out, err
    assert jobs.get(first.id).state == "interrupted"
    assert jobs.resume(first.id).state == "queued"
    (second.folder / "spec.json").write_text("{")
    code, _, err = _cli("jobs", "repair", second.id)
    assert code == 2 and "cannot be repaired" in err and "jobs delete" in err
    code, _, err = _cli("jobs", "delete", second.id)
    assert code == 0 and not second.folder.exists(), err
    assert [job.id for job in jobs.list_jobs()] == [first.id]
    code, _, err = _cli("jobs", "delete", "../../etc")
    assert code == 2 and "invalid job id" in err


def test_the_train_page_opens_with_a_broken_job(studio, held):
    from streamlit.testing.v1 import AppTest

    first, _ = held
    (first.folder / "status.json").write_text("{}")
    (first.folder / "model.log.jsonl").write_text('[1]\n{"epoch": "x"}\n{"loss": 1}\n')
    app = Path(__file__).resolve().parents[2] / "app" / "main.py"
    at = AppTest.from_file(str(app), default_timeout=120)
    at.session_state["source"] = studio.dataset
    at.run()
    at.switch_page("screens/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    (frame,) = [d.value for d in at.dataframe if "state" in d.value.columns]
    assert jobs.BROKEN in list(frame["state"])


# ----------------------------------------------------------------- item 3: resume by stage


def test_train_resumed_after_its_last_epoch_evaluates_instead_of_refusing(tiny_mvtec,
                                                                         tmp_path):
    """Killed during the final evaluation, `--resume` said "already reached epoch N"."""
    out = tmp_path / "m.safetensors"
    data = ["--data", tiny_mvtec.root, "--category", tiny_mvtec.category]
    fast = ["--image-size", "64", "--epochs", "2", "--batch-size", "4", "--device", "cpu",
            "--quiet"]
    code, _, err = _cli("train", *data, "--out", out, "--no-evaluate", *fast)  # the "kill"
    assert code == 0, err
    before = out.read_bytes()
    code, stdout, err = _cli("train", *data, "--out", out, "--resume", *fast)
    assert code == 0, err
    assert "resumed at the evaluation" in stdout
    report = out.with_name("m.report.json")
    assert json.loads(report.read_text())["n_images"] > 0
    assert out.read_bytes() != before  # the metrics were stored in it
    code, stdout, err = _cli("train", *data, "--out", out, "--resume", *fast)
    assert code == 0 and "nothing left to do" in stdout, err


def test_a_junk_test_image_is_reported_and_skipped(tmp_path):
    """It made `train` exit 2 after the checkpoint was written, failing a good model's job."""
    root = make_fake_mvtec(tmp_path / "data", n_train=4, n_good=2, n_defect=2)
    junk = root / "widget" / "test" / "good" / "zz-junk.png"
    junk.write_bytes(b"not an image")
    code, stdout, err = _cli("train", "--data", root, "--category", "widget", "--out",
                             tmp_path / "m.safetensors", "--image-size", "64", "--epochs", "1",
                             "--batch-size", "4", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "skipped 1 test image(s)" in stdout and "zz-junk.png" in stdout
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["n_images"] == 2 + 2 * 2 and "zz-junk.png" in report["skipped_images"][0]


def test_a_job_killed_during_evaluation_resumes_to_success(jobs_folder, studio, tiny_mvtec,
                                                           monkeypatch):
    """The job stage order: its training finished (files in its folder), then the process was
    killed; `resume` evaluates and registers instead of failing on "already reached epoch"."""
    from rd.manifest import read_manifest, user_manifest

    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    job = jobs.submit(TrainConfig(**SMALL), tiny_mvtec.root, tiny_mvtec.category, name="k")
    code, _, err = _cli("train", "--data", tiny_mvtec.root, "--category", tiny_mvtec.category,
                        "--out", job.checkpoint, "--no-evaluate", "--image-size", "64",
                        "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet")
    assert code == 0, err
    status = {**job.status, "state": "interrupted", "message": "killed during evaluation"}
    (job.folder / "status.json").write_text(json.dumps(status))
    registered = len(read_manifest(user_manifest()))
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "1")
    jobs.resume(job.id)
    finished = _wait(job.id)
    assert finished.state == "succeeded", finished.log_tail(30)
    assert "resumed at the evaluation" in finished.log.read_text()
    assert len(read_manifest(user_manifest())) == registered + 1
    # registration is not repeated when a later attempt finds it done
    (job.folder / "status.json").write_text(json.dumps({**finished.status,
                                                        "state": "interrupted"}))
    jobs.resume(job.id)
    again = _wait(job.id)
    assert again.state == "succeeded" and "already registered" in again.log.read_text()
    assert len(read_manifest(user_manifest())) == registered + 1
    shutil.rmtree(job.folder)


def _wait(job_id: str, timeout: float = 120) -> jobs.Job:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs.schedule()
        job = jobs.get(job_id)
        if job.state not in jobs.ACTIVE:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {jobs.get(job_id).state}")
