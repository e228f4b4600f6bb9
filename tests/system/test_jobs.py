"""Training jobs: real background processes on tiny data (64 px, batch 4, CPU)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from rd import jobs
from rd.cli.jobs import submit_train_options as submit
from rd.data import MVTecCategory
from rd.manifest import read_manifest
from rd.training import (
    STOPPED_EXIT,
    TrainConfig,
    TrainingStopped,
    request_stop,
    resume_path,
    train,
)
from tests.conftest import process_state, scheduling_policy


@pytest.fixture
def root(jobs_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh user data folder beside a fresh jobs folder."""
    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    return jobs_folder


@pytest.fixture
def tiny(tiny_mvtec) -> list[str]:
    return ["--data", str(tiny_mvtec.root), "--category", tiny_mvtec.category,
            "--image-size", "64", "--batch-size", "4", "--device", "cpu",
            "--cache-teacher", "on"]


def _wait(job_id: str, states: tuple[str, ...], timeout: float = 150.0,
          records: int = 0) -> jobs.Job:
    """Poll (each poll a scheduler step) until the job is in one of ``states`` with at least
    ``records`` epochs logged."""
    deadline = time.monotonic() + timeout
    while True:
        jobs.schedule()
        job = jobs.get(job_id)
        if job.state in states and len(job.metrics()) >= records:
            return job
        assert time.monotonic() < deadline, f"{job_id} is {job.state}:\n{job.log_tail()}"
        time.sleep(0.1)


def _epochs(job: jobs.Job) -> list[int]:
    return [record["epoch"] for record in job.metrics()]


def test_invalid_requests_are_refused_before_a_job_exists(root, tiny, studio_home,
                                                          monkeypatch):
    refused = {
        "epochs must be at least 1": [*tiny, "--epochs", "0"],
        "multiple of 32": [*tiny, "--image-size", "50"],
        "no category 'nope'": [*tiny[:2], "--category", "nope"],
        "invalid training options": [*tiny, "--bogus"],
        "belong to the runner": [*tiny, "--out", "x.safetensors"],
        "MVTec-layout": ["--normal", str(root)],
        "student at 64 px": [
            *tiny, "--image-size", "128", "--init", str(studio_home.checkpoint)],
    }
    for reason, args in refused.items():
        with pytest.raises(jobs.JobError, match=reason):
            submit(args)
    with pytest.raises(jobs.JobError, match="dataset name"):
        submit(tiny, dataset="../../elsewhere")
    with pytest.raises(jobs.JobError, match="whole number >= 1"):
        submit(tiny, nproc=0)
    with pytest.raises(jobs.JobError, match="at least 8 images"):
        submit(tiny, nproc=8)
    with monkeypatch.context() as patch:
        patch.setenv(jobs.PRIORITY_ENV, "-5")
        with pytest.raises(jobs.JobError, match=r"RD_JOBS_PRIORITY.*'idle' or a niceness"):
            submit(tiny)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(jobs.JobError, match="invalid job id"):
            jobs.get(bad)
    assert jobs.list_jobs() == []
    assert not root.exists() or [p.name for p in root.iterdir()] == [".lock"]


def test_typed_submission_is_validated_and_stored(root, tiny_mvtec, monkeypatch):
    """The library takes a TrainConfig (no command line); the spec stores it as a dict."""
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    data, category = tiny_mvtec.root, tiny_mvtec.category
    with pytest.raises(jobs.JobError, match="epochs must be at least 1"):
        jobs.submit(TrainConfig(epochs=0, device="cpu"), data, category)
    with pytest.raises(jobs.JobError, match="a TrainConfig"):
        jobs.submit({"epochs": 1}, data, category)
    assert jobs.list_jobs() == []
    config = TrainConfig(epochs=3, image_size=64, batch_size=4, device="cpu")
    job = jobs.submit(config, data, category, evaluate=False, name="typed")
    assert job.config == config and job.spec["evaluate"] is False and not job.legacy
    assert job.spec["data"] == str(Path(data).resolve()) and job.spec["category"] == category
    assert json.loads((job.folder / "spec.json").read_text())["config"]["betas"] == [0.5, 0.999]


def _legacy_job(root: Path, train_args: list[str], state: str = "interrupted") -> str:
    """A job folder as the version that stored command-line options wrote it."""
    job_id = "20250101-000000-old-abcd"
    folder = root / job_id
    folder.mkdir(parents=True)
    spec = {"id": job_id, "name": "old", "dataset": "fake", "category": "widget",
            "backbone": "efficientnet_lite0", "epochs": 2, "device": "cpu", "nproc": 1,
            "resource": "cpu", "train_args": train_args, "cwd": str(root.parent),
            "idempotency_key": None, "submitted": 1.0}
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "status.json").write_text(json.dumps({"state": state, "queued_at": 1.0,
                                                    "attempts": 1, "pid": None}))
    return job_id


def test_an_argv_job_of_an_earlier_version_lists_and_migrates(root, tiny, monkeypatch, capsys):
    from rd.cli import main

    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    relative = os.path.relpath(tiny[1], root.parent)  # an old spec's --data relative to its cwd
    job_id = _legacy_job(root, ["--data", relative, *tiny[2:], "--epochs", "2"])
    (job,) = jobs.list_jobs()
    assert job.legacy and job.state == "interrupted" and job.progress().epochs == 2
    assert job.command == f"python -m rd train {shlex.join(job.spec['train_args'])}"
    with pytest.raises(jobs.JobError, match="earlier version"):
        jobs.resume(job_id)  # the library cannot read options; nothing changes
    assert main(["jobs", "list"]) == 0 and f"{job_id}  interrupted" in capsys.readouterr().out
    assert main(["jobs", "resume", job_id]) == 0  # the command line converts it, then resumes
    job = jobs.get(job_id)
    assert job.state == "queued" and not job.legacy
    assert job.config == TrainConfig(image_size=64, batch_size=4, device="cpu",
                                     cache_teacher="on", epochs=2)
    assert job.spec["data"] == str(Path(tiny[1]).resolve()) and job.spec["evaluate"] is True


def test_an_argv_job_whose_options_no_longer_parse_says_it_cannot_resume(root, capsys):
    from rd.cli import main

    job_id = _legacy_job(root, ["--data", "x", "--category", "widget", "--gone-flag"])
    assert [job.id for job in jobs.list_jobs()] == [job_id]
    assert main(["jobs", "resume", job_id]) == 2
    error = capsys.readouterr().err
    assert "cannot be resumed" in error and "submit it again" in error
    assert jobs.get(job_id).legacy


def test_submit_is_idempotent_per_key_and_names_are_sanitised(root, tiny, monkeypatch):
    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")  # hold the queue: nothing starts
    first = submit(tiny, name="../../etc/passwd", idempotency_key="form-1")
    again = submit(tiny, name="../../etc/passwd", idempotency_key="form-1")
    other = submit(tiny, idempotency_key="form-2")
    assert again.id == first.id != other.id
    assert first.folder.parent == root and "/" not in first.id and ".." not in first.id
    assert first.spec["name"] == "etc-passwd" and other.spec["name"] == "widget-efficientnet_lite0"
    assert [j.state for j in jobs.schedule()] == ["queued", "queued"]
    assert jobs.cancel(first.id).state == "cancelled"
    assert jobs.resume(first.id).state == "queued"
    with pytest.raises(jobs.JobError, match="only cancelled or interrupted"):
        jobs.resume(other.id)


def test_cli_commands(root, tiny, monkeypatch, capsys):
    from rd.cli import main

    monkeypatch.setenv(jobs.SLOTS_ENV["cpu"], "0")
    assert main(["jobs", "submit", *tiny, "--epochs", "2", "--name", "cli",
                 "--dataset", "fake"]) == 0
    job_id = capsys.readouterr().out.split("\t")[0]
    assert jobs.get(job_id).spec["dataset"] == "fake"
    spec = jobs.get(job_id).spec
    assert spec["command"] == f"python -m rd train {shlex.join([*tiny, '--epochs', '2'])}"
    assert TrainConfig.from_dict(spec["config"]) == TrainConfig(
        image_size=64, batch_size=4, device="cpu", cache_teacher="on", epochs=2)
    assert main(["jobs", "list"]) == 0
    assert f"{job_id}  queued" in capsys.readouterr().out
    assert main(["jobs", "cancel", job_id]) == 0
    assert main(["jobs", "show", job_id]) == 0
    assert "state     cancelled" in capsys.readouterr().out
    assert main(["jobs", "submit", *tiny, "--epochs", "0"]) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err
    assert main(["jobs", "resume", "../x"]) == 2


def test_two_jobs_with_one_slot_run_in_order_then_ddp_on_two_processes(root, tiny):
    """Queueing, success and registration, and DDP: the same 2-epoch job on one process, then
    (queued behind it) on two torchrun processes with gloo."""
    args = [*tiny, "--epochs", "2"]
    single = submit(args, name="single", dataset="one")
    ddp = submit(args, name="ddp", dataset="two", nproc=2)
    assert (single.state, ddp.state) == ("running", "queued")
    single = _wait(single.id, ("succeeded", "failed"))
    ddp = _wait(ddp.id, ("succeeded", "failed"), timeout=240)
    assert (single.state, ddp.state) == ("succeeded", "succeeded"), ddp.log_tail()
    assert ddp.status["started_at"] >= single.status["finished_at"]

    for job in (single, ddp):
        assert _epochs(job) == [1, 2]
    # The same images per global batch and the same gradient mean: only BatchNorm's per-process
    # batch statistics (and float rounding) differ.
    for one, two in zip(single.metrics(), ddp.metrics(), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=0.05)
        assert sorted(p.name for p in job.folder.glob("*.safetensors")) == [
            "model.resume.safetensors", "model.safetensors"]
    assert "torch.distributed.run" in ddp.log.read_text()
    entries = {e.dataset: e for e in read_manifest(root.parent / "home" / "models" /
                                                   "manifest.json")}
    assert set(entries) == {"one", "two"}
    for job, entry in ((single, entries["one"]), (ddp, entries["two"])):
        assert entry.verify().read_bytes() == job.checkpoint.read_bytes()
        assert entry.report["image_auroc"] is not None and entry.category == "widget"
    # For the note: the whole job (process start, training, evaluation, registration).
    seconds = {job.spec["nproc"]: job.status["finished_at"] - job.status["started_at"]
               for job in (single, ddp)}
    print(f"\nwall time of the same 2-epoch job: 1 process {seconds[1]:.1f} s, "
          f"2 DDP processes {seconds[2]:.1f} s")


def test_cancel_stops_after_a_step_and_keeps_the_resume_state(root, tiny):
    job = submit([*tiny, "--epochs", "500", "--checkpoint-every", "1"])
    job = _wait(job.id, ("running",), records=1)
    # A background job yields the CPU to the studio: it runs at the idle priority.
    assert scheduling_policy(job.status["pid"]) == os.SCHED_IDLE
    jobs.cancel(job.id)
    job = _wait(job.id, ("cancelled",), timeout=60)
    assert job.status["exit_code"] == STOPPED_EXIT
    assert "stopped on request at epoch" in job.log.read_text()
    assert resume_path(job.checkpoint).is_file() and job.progress().epoch < 500
    with pytest.raises(jobs.JobError, match="only queued or running"):
        jobs.cancel(job.id)


def test_kill_9_marks_interrupted_and_resume_continues_the_epoch_count(root, tiny):
    job = submit([*tiny, "--epochs", "12", "--checkpoint-every", "1"])
    job = _wait(job.id, ("running",), records=3)
    os.kill(job.status["pid"], signal.SIGKILL)
    job = _wait(job.id, ("interrupted",), timeout=30)
    before = job.metrics()
    assert job.status["pid"] is None and 3 <= len(before) < 12
    assert "attempt 1" in job.log.read_text()

    job = _wait(jobs.resume(job.id).id, ("succeeded", "failed"))
    assert job.state == "succeeded", job.log_tail()
    assert job.status["attempts"] == 2 and "attempt 2" in job.log.read_text()
    assert _epochs(job) == list(range(1, 13))
    # Not restarted: the epochs before the kill (but the last, which may have been logged just
    # before its resume state was written) were not trained again, their records unchanged.
    assert job.metrics()[:len(before) - 1] == before[:-1]


def test_a_stop_mid_epoch_resumes_exactly(tiny_mvtec, tmp_path):
    """What SIGTERM does, in process: stop after a step, then continue from that very step."""
    samples = MVTecCategory(tiny_mvtec.root, tiny_mvtec.category).train_samples()
    config = TrainConfig(epochs=3, image_size=64, batch_size=4, seed=3, device="cpu",
                         cache_teacher="on")
    straight = train(samples, config, tmp_path / "a.safetensors", progress=False)
    out = tmp_path / "b.safetensors"
    with pytest.raises(TrainingStopped) as stopped:
        train(samples, config, out, progress=False,
              on_epoch=lambda record: record["epoch"] == 1 and request_stop())
    assert (stopped.value.code, stopped.value.epoch, stopped.value.step) == (STOPPED_EXIT, 1, 1)
    resumed = train(samples, config, out, resume=True, progress=False)
    assert resumed.losses == pytest.approx(straight.losses[1:], abs=1e-6)
    for key, value in straight.model.student_state_dict().items():
        assert (resumed.model.student_state_dict()[key].float() - value.float()).abs().max() \
            <= 1e-6, key


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_job_pauses_while_the_studio_is_used_and_a_cancel_still_stops_it(root, tiny,
                                                                           monkeypatch):
    """rd.foreground end to end: the studio's mark pauses a running job (no epoch is logged
    while it is paused), quiet lets it go on, and a cancel stops a paused job at once."""
    from rd import foreground

    monkeypatch.setenv(foreground.YIELD_ENV, "1")  # the job process inherits it
    job = submit([*tiny, "--epochs", "500", "--checkpoint-every", "1"])
    job = _wait(job.id, ("running",), records=2)
    pid = job.status["pid"]

    def touch_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            foreground.note_use()
            time.sleep(0.1)

    touch_for(0.5)
    assert process_state(pid) == "T"
    logged = len(job.metrics())
    touch_for(2.0)  # an epoch here takes a fraction of a second when the job runs
    assert process_state(pid) == "T" and len(job.metrics()) == logged
    _wait(job.id, ("running",), records=logged + 2, timeout=30)  # quiet: it goes on

    touch_for(0.5)
    assert process_state(pid) == "T"
    jobs.cancel(job.id)
    deadline = time.monotonic() + 20
    while (job := jobs.get(job.id)).state == "running":  # the studio stays in use meanwhile
        assert time.monotonic() < deadline, job.log_tail()
        touch_for(0.2)
        jobs.schedule()
    assert job.state == "cancelled" and job.status["exit_code"] == STOPPED_EXIT

    def command(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    assert not [p for p in os.listdir("/proc") if p.isdigit() and "rd.foreground" in command(p)]
