"""Training jobs: ``rd train`` runs in background processes that outlive whoever started them.

**Store.** A job is a folder ``<root>/<id>/`` (root: the ``root`` argument, else
``$RD_JOBS_ROOT``, else ``<data home>/jobs``) holding ``spec.json`` (what to run, written once),
``status.json`` (state, process identity, times; rewritten atomically at each transition),
``job.log`` (the process's stdout and stderr), and the training's own files:
``model.safetensors``, its per-epoch metrics ``model.log.jsonl``, ``model.resume.safetensors`` and
``model.report.json``. The folders themselves are the store, not SQLite: the folder has to exist
anyway for the log and the checkpoints, so a database would be a second copy of the truth that
can disagree with it (a folder deleted or copied by hand); each job process writes only its own
folder; and a studio holds tens of jobs, so listing them reads tens of small files. Transitions
and scheduling are serialised by an advisory lock (``flock``) on ``<root>/.lock``.

**Spec.** What a job runs is typed: a ``TrainConfig`` (its ``to_dict``), the MVTec root and
category, whether to evaluate, the dataset name it is registered under and the number of
processes, all validated before the job folder exists. Folders written by earlier versions hold
``train_args`` (command-line options) instead: they still list, and the command line converts
them when it resumes or runs one (``migrate``); the library refuses to run them.

**Processes.** A job runs as ``python -m rd jobs run ID``, started in a new session (its own
process group, no terminal) with its output in ``job.log``, so it outlives the CLI command or the
Streamlit script run that started it. With one process it runs the pipeline
(``rd.pipeline.train_and_evaluate``) in itself; with ``nproc`` > 1 it starts ``python -m
torch.distributed.run --standalone --nproc-per-node N -m rd jobs rank ID`` (each rank runs the
same pipeline; DDP semantics: ``rd.training``) and waits for it. When training succeeds it
registers the checkpoint in the user manifest (``rd.pipeline.register_model``, with the
evaluation report stored in it), so the app lists the model at once. While it trains, a watcher
pauses its processes whenever a studio on the same data home is being used (``rd.foreground``,
``$RD_JOBS_YIELD_S``).

**Scheduling without a daemon.** ``schedule()`` is one step: it marks "running" jobs whose
processes are gone, forces overdue cancellations, then starts queued jobs in queue order while a
slot is free: one GPU job and one CPU job at a time by default (``$RD_JOBS_GPU_SLOTS``,
``$RD_JOBS_CPU_SLOTS``; 0 holds that queue). It runs on every ``python -m rd jobs`` command, once
when the app starts and on each poll of its Train page, and in a job's own process when it ends
(its exit hook starts the next queued job). A job killed outright runs no exit hook: the next of
those steps notices.

**Liveness.** A job is running while its process (the pid with the start time recorded at
launch, so a recycled pid is not trusted; a reboot changes the boot id in it) or another member of
its process group (torchrun) is alive. One found dead without having reported (crash, reboot,
``kill -9``) is marked interrupted, its log kept; ``resume`` continues it from its last resume
state, the epoch count going on.

**Cancel.** SIGTERM to the job's process (a DDP job's passes it on to torchrun, which passes it
to the ranks): the trainer finishes its current step, writes its resume state and exits with
``STOPPED_EXIT`` ("cancelled", resumable); after ``CANCEL_TIMEOUT_S`` the job's process group is
killed (the ranks, in sessions of their own, die with torchrun: ``die_with_parent``).

**Broken folders.** A job folder whose ``spec.json`` or ``status.json`` is missing, not JSON,
or lacks what listing and scheduling read is listed in state ``broken`` with the reason (its
spec shown with placeholders), so it never hides other jobs or stops a page; ``repair`` gives a
job whose status alone is damaged a fresh ``interrupted`` status (``resume`` then continues it)
and ``delete`` removes a job folder that is not running.

**Resume by stage.** A resumed job continues where it stopped: training from its resume state;
if training had finished, the evaluation; if that had finished too, only the registration, which
is skipped when the manifest already lists this very checkpoint (same SHA-256).

POSIX only (sessions, signals, flock); liveness reads ``/proc`` where it exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rd import foreground
from rd.checkpoints import read_metadata
from rd.data import MVTecCategory, list_categories
from rd.errors import RDError
from rd.evaluation import format_summary
from rd.files import (
    atomic_write,
    check_background_priority,
    child_environment,
    data_home,
    die_with_parent,
    file_sha256,
    lower_priority,
    proc_stat,
)
from rd.manifest import read_manifest, user_manifest
from rd.model import resolve_device
from rd.pipeline import register_model, train_and_evaluate
from rd.training import (
    STOPPED_EXIT,
    TrainConfig,
    TrainingStopped,
    log_path,
    request_stop,
    resume_path,
)

# A job's state is one of queued, running, succeeded, failed, cancelled, interrupted -- or
# broken: its folder cannot be read (see the module's notes).
STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
BROKEN = "broken"
ACTIVE = ("queued", "running")
RESUMABLE = ("cancelled", "interrupted")
ROOT_ENV = "RD_JOBS_ROOT"
SLOTS_ENV = {"gpu": "RD_JOBS_GPU_SLOTS", "cpu": "RD_JOBS_CPU_SLOTS"}
PRIORITY_ENV = "RD_JOBS_PRIORITY"  # rd.files.lower_priority: "idle" (default) or a niceness
CANCEL_TIMEOUT_S = 30.0
CHECKPOINT = "model.safetensors"
LOG = "job.log"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
# Job processes started by this process, polled by schedule() so none is left a zombie.
_LAUNCHED: dict[int, subprocess.Popen] = {}


class JobError(RDError, ValueError):
    """A job request or action is refused; the message says why."""


@dataclass(frozen=True)
class Progress:
    """How far a job is, read from its training log (the trainer's own record)."""

    epoch: int  # epochs completed
    epochs: int
    eta_s: float | None  # while running: remaining epochs at the mean epoch time so far

    @property
    def fraction(self) -> float:
        return min(1.0, self.epoch / self.epochs) if self.epochs else 0.0


@dataclass(frozen=True)
class Job:
    """A snapshot of one job folder: re-read it (``get``) to see later changes."""

    id: str
    folder: Path
    spec: dict[str, Any]
    status: dict[str, Any]

    @property
    def state(self) -> str:
        return self.status["state"]

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def log(self) -> Path:
        return self.folder / LOG

    @property
    def legacy(self) -> bool:
        """Written by an earlier version, with command-line options instead of a typed spec."""
        return self.state != BROKEN and "config" not in self.spec

    @property
    def config(self) -> TrainConfig:
        """The training configuration (JobError for a legacy spec, or a damaged one)."""
        if self.state == BROKEN:
            raise JobError(self.status["message"])
        if self.legacy:
            raise JobError(_legacy_message(self.id))
        try:
            return TrainConfig.from_dict(self.spec["config"])
        except RDError as error:
            raise JobError(f"job {self.id} has an invalid spec: {error}") from None

    @property
    def command(self) -> str:
        """The equivalent command line, for people to read."""
        if self.state == BROKEN:
            return f"(unknown: {self.status['reason']})"
        if self.legacy:
            return f"python -m rd train {shlex.join(self.spec.get('train_args', []))}"
        return self.spec.get("command") or (
            f"train {self.spec['backbone']} on {self.spec['data']} / {self.spec['category']}")

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of the training log (a torn or foreign line is skipped)."""
        path = log_path(self.checkpoint)
        records = []
        try:
            lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        except OSError:
            lines = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                record = json.loads(line)
                if isinstance(record, dict) and all(
                        _is_number(record.get(k)) for k in ("epoch", "loss", "seconds")):
                    records.append(record)
        return records

    def progress(self) -> Progress:
        records = self.metrics()
        done = records[-1]["epoch"] if records else 0
        epochs = self.spec["epochs"]
        eta = None
        if self.state == "running" and records:
            mean = sum(r["seconds"] for r in records) / len(records)
            eta = mean * max(0, epochs - done)
        return Progress(done, epochs, eta)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log as a terminal would show them (a progress bar's ``\\r``
        updates collapse to their last state)."""
        if not self.log.is_file():  # not a FIFO or a folder either: never block or fail
            return ""
        with self.log.open("rb") as handle:
            handle.seek(max(0, self.log.stat().st_size - 256 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
        shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
        return "\n".join(shown[-lines:])


def _legacy_message(job_id: str) -> str:
    return (f"job {job_id} was saved by an earlier version as command-line options and cannot "
            f"be run from here: `python -m rd jobs resume {job_id}` converts it, or submit it "
            "again")


def jobs_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else data_home() / "jobs"


# ------------------------------------------------------------------------------ requests


def submit(config: TrainConfig, data: str | Path, category: str, *, evaluate: bool = True,
           name: str = "", dataset: str | None = None, nproc: int = 1,
           idempotency_key: str | None = None, command: str = "",
           root: str | Path | None = None) -> Job:
    """Queue a training run of ``config`` on ``data``/``category`` (an MVTec-layout root),
    starting it at once when a slot is free.

    Everything is checked before anything is written: a refused request leaves no job. A request
    with the ``idempotency_key`` of an earlier one returns that job instead of starting another.
    ``dataset`` is the data source's name in the manifest (default: the data folder's name);
    ``command`` is the equivalent command line, shown to people.
    """
    root = jobs_root(root)
    spec = _validated(config, Path(data), category, evaluate, name, dataset, nproc)
    with _locked(root):
        for job in _all(root):
            if idempotency_key and job.spec.get("idempotency_key") == idempotency_key:
                return job
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{spec['name']}-{secrets.token_hex(2)}"
        folder = root / job_id
        folder.mkdir()
        now = time.time()
        spec = {"id": job_id, **spec, "command": command, "idempotency_key": idempotency_key,
                "submitted": now}
        _write_json(folder / "spec.json", spec)
        _write_json(folder / "status.json", {"state": "queued", "queued_at": now, "attempts": 0})
    schedule(root)
    return get(job_id, root)


def _validated(config: TrainConfig, data: Path, category: str, evaluate: bool, name: str,
               dataset: str | None, nproc: int) -> dict[str, Any]:
    """The job's spec, or JobError saying what is wrong with the request."""
    if not isinstance(config, TrainConfig):
        raise JobError(f"a job needs a TrainConfig, got {type(config).__name__}")
    _priority()  # a bad $RD_JOBS_PRIORITY is refused before a job exists
    try:
        foreground.yield_seconds()  # and a bad $RD_JOBS_YIELD_S
    except ValueError as error:
        raise JobError(str(error)) from None
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise JobError(f"the number of processes must be a whole number >= 1, got {nproc!r}")
    try:
        config = TrainConfig.from_dict(config.to_dict())  # what the job process will read
        if category not in list_categories(data):
            raise JobError(f"{data} has no category {category!r} (with train/good)")
        images = len(MVTecCategory(data, category).train_samples())
        device = resolve_device(config.device)
        if config.amp and device.type != "cuda":
            raise JobError("--amp needs a CUDA device")
        if device.type == "cuda" and nproc > 1:
            if device.index is not None:
                raise JobError(f"{nproc} processes use one GPU each: give --device cuda, "
                               f"not {config.device}")
            if nproc > torch.cuda.device_count():
                raise JobError(f"{nproc} processes need {nproc} GPUs; this machine has "
                               f"{torch.cuda.device_count()}")
        if nproc > min(config.batch_size, images):
            raise JobError(f"{nproc} processes need a batch size and a training set of at least "
                           f"{nproc} images (--batch-size is the global batch)")
        if config.init is not None:
            meta = read_metadata(config.init)
            size = meta.get("preprocess", {}).get("size")
            if (meta["backbone"], size) != (config.backbone, config.image_size):
                raise JobError(f"--init {config.init} is a {meta['backbone']} student at {size} "
                               f"px; this job trains {config.backbone} at {config.image_size} px")
    except (RDError, OSError, ValueError) as error:  # ValueError: resolve_device's "no GPU"
        raise JobError(str(error)) from None
    dataset = dataset if dataset is not None else data.resolve().name
    if dataset in ("", ".", "..") or any(c in dataset for c in "/\\\0") or len(dataset) > 100:
        raise JobError(f"invalid dataset name {dataset!r}: one folder name, no path")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:60]
    return {"name": slug or f"{category}-{config.backbone}", "dataset": dataset,
            "category": category, "data": str(data.resolve()), "config": config.to_dict(),
            "evaluate": bool(evaluate), "backbone": config.backbone, "epochs": config.epochs,
            "device": config.device, "nproc": nproc,
            "resource": "gpu" if device.type == "cuda" else "cpu", "cwd": os.getcwd()}


def migrate(job_id: str, config: TrainConfig, data: str | Path, evaluate: bool = True,
            root: str | Path | None = None) -> Job:
    """Give a job saved with command-line options (by an earlier version) its typed spec.

    ``config``, ``data`` (relative paths count from the job's working folder) and ``evaluate``
    are what its options meant: the command line parses them. The options stay in the spec
    under ``train_args``, so ``command`` still shows them.
    """
    root = jobs_root(root)
    with _locked(root):
        job = get(job_id, root)
        if job.legacy:
            spec = {**job.spec, "config": TrainConfig.from_dict(config.to_dict()).to_dict(),
                    "data": str((Path(job.spec["cwd"]) / data).resolve()),
                    "evaluate": bool(evaluate),
                    "command": f"python -m rd train {shlex.join(job.spec['train_args'])}"}
            _write_json(job.folder / "spec.json", spec)
    return get(job_id, root)


def get(job_id: str, root: str | Path | None = None) -> Job:
    """The job ``job_id``; a malformed id (a path, say) is refused before any file is read.

    A folder that cannot be read as a job is returned in state ``broken``, with the reason.
    """
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise JobError(f"invalid job id {job_id!r}")
    folder = jobs_root(root) / job_id
    if not folder.is_dir() or folder.is_symlink():
        raise JobError(f"no job {job_id} in {folder.parent}")
    spec, problem = _read_object(folder / "spec.json")
    status, status_problem = _read_object(folder / "status.json")
    problem = problem or _spec_problem(spec) or status_problem or _status_problem(status)
    if problem:
        return _broken(job_id, folder, spec, problem)
    return Job(job_id, folder, spec, status)


def list_jobs(root: str | Path | None = None) -> list[Job]:
    """Every job, in submission order (broken ones included, see the module's notes)."""
    root = jobs_root(root)
    if not root.is_dir():
        return []
    with _locked(root):  # no half-created job folder is seen
        return _all(root)


def repair(job_id: str, root: str | Path | None = None) -> Job:
    """Give a broken job whose status alone is damaged the status ``interrupted`` (resume then
    continues it from its files); a damaged spec cannot be rebuilt: delete that job."""
    root = jobs_root(root)
    with _locked(root):
        job = get(job_id, root)
        if job.state != BROKEN:
            raise JobError(f"job {job_id} is {job.state}, not broken: nothing to repair")
        spec, problem = _read_object(job.folder / "spec.json")
        problem = problem or _spec_problem(spec)
        if problem:
            raise JobError(f"job {job_id} cannot be repaired: {problem}; remove it with "
                           f"`python -m rd jobs delete {job_id}` and submit it again")
        now = time.time()
        _write_json(job.folder / "status.json", {
            "state": "interrupted", "queued_at": now, "attempts": 0, "finished_at": now,
            "message": f"repaired ({job.status['reason']}): resume continues it"})
    return get(job_id, root)


def delete(job_id: str, root: str | Path | None = None) -> Job:
    """Remove a job's folder (log, checkpoint and all); a running job must be cancelled first.
    A model the job registered stays registered."""
    root = jobs_root(root)
    with _locked(root):
        job = get(job_id, root)
        if job.state == "running" and _alive(job.status):
            raise JobError(f"job {job_id} is running: cancel it first")
        shutil.rmtree(job.folder)
    return job


def cancel(job_id: str, root: str | Path | None = None) -> Job:
    """Cancel a queued job at once; ask a running one to stop (SIGTERM, forced later)."""
    root = jobs_root(root)
    with _locked(root):
        job = get(job_id, root)
        if job.state == "queued":
            return _set(job, state="cancelled", finished_at=time.time(),
                        message="cancelled before it started")
        if job.state != "running":
            raise JobError(f"job {job_id} is {job.state}: only queued or running jobs can be "
                           "cancelled")
        if not job.status.get("cancel_requested_at"):
            job = _set(job, cancel_requested_at=time.time(), message="stopping…")
        if _alive(job.status):
            os.kill(job.status["pid"], signal.SIGTERM)
            for pid in foreground.process_tree(job.status["pid"]):  # paused for the studio:
                with contextlib.suppress(ProcessLookupError):  # it stops now, not when quiet
                    os.kill(pid, signal.SIGCONT)
    return job


def resume(job_id: str, root: str | Path | None = None) -> Job:
    """Queue a cancelled or interrupted job again; it continues from its last resume state."""
    root = jobs_root(root)
    with _locked(root):
        job = get(job_id, root)
        if job.state == BROKEN:
            raise JobError(job.status["message"])
        if job.state not in RESUMABLE:
            raise JobError(f"job {job_id} is {job.state}: only cancelled or interrupted jobs can "
                           "be resumed")
        if job.legacy:  # refused here, not once its process has started
            raise JobError(_legacy_message(job.id))
        _set(job, state="queued", queued_at=time.time(), cancel_requested_at=None,
             message="queued to resume")
    schedule(root)
    return get(job_id, root)


# ----------------------------------------------------------------------------- scheduler


def schedule(root: str | Path | None = None) -> list[Job]:
    """One scheduler step (see the module's notes); returns every job, in submission order."""
    root = jobs_root(root)
    if not root.is_dir():
        return []  # no job was ever submitted here: nothing to do, nothing to create
    with _locked(root):
        for pid, process in list(_LAUNCHED.items()):
            if process.poll() is not None:
                del _LAUNCHED[pid]
        jobs = [_checked(job) if job.state == "running" else job for job in _all(root)]
        busy = Counter(job.spec["resource"] for job in jobs if job.state == "running")
        queued = sorted((job for job in jobs if job.state == "queued"),
                        key=lambda job: job.status["queued_at"])
        for job in queued:
            kind = job.spec["resource"]
            if busy[kind] < _slots(kind):
                started = _launch(root, job)
                busy[kind] += started.state == "running"
                jobs = [started if j.id == job.id else j for j in jobs]
    return jobs


def _checked(job: Job) -> Job:
    """A running job, marked interrupted (or cancelled) if its processes are gone; an overdue
    cancellation is forced."""
    requested = job.status.get("cancel_requested_at")
    if _alive(job.status):
        if requested and time.time() - requested > CANCEL_TIMEOUT_S:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.status["pid"], signal.SIGKILL)
            return _set(job, state="cancelled", finished_at=time.time(), pid=None,
                        message=f"killed: it did not stop within {CANCEL_TIMEOUT_S:.0f} s")
        return job
    if requested:
        return _set(job, state="cancelled", finished_at=time.time(), pid=None,
                    message="stopped on request")
    return _set(job, state="interrupted", finished_at=time.time(), pid=None,
                message="its process ended without reporting (crash, reboot or kill): resume it")


def _slots(kind: str) -> int:
    value = os.environ.get(SLOTS_ENV[kind], "1")
    if not value.isdigit():
        raise JobError(f"${SLOTS_ENV[kind]} must be a whole number >= 0, got {value!r}")
    return int(value)


def _priority() -> str:
    value = os.environ.get(PRIORITY_ENV, "idle")
    try:
        return check_background_priority(value)
    except ValueError as error:
        raise JobError(f"${PRIORITY_ENV}: {error}") from None


def _launch(root: Path, job: Job) -> Job:
    """Start the job's process, in its own session, at background CPU priority: a job never
    makes the studio wait for the CPU, and alone it runs at full speed."""
    priority = _priority()
    command = [sys.executable, "-m", "rd", "jobs", "run", job.id, "--root", str(root)]
    env = child_environment(PYTHONUNBUFFERED="1")
    attempt = job.status.get("attempts", 0) + 1
    try:
        with job.log.open("a") as log:
            log.write(f"--- attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=job.spec["cwd"], env=env,
                                       start_new_session=True,
                                       preexec_fn=lambda: lower_priority(priority))
    except OSError as error:
        return _set(job, state="failed", finished_at=time.time(), message=f"cannot start: {error}")
    _LAUNCHED[process.pid] = process
    return _set(job, state="running", pid=process.pid, process=_identity(process.pid),
                attempts=attempt, started_at=time.time(), finished_at=None, exit_code=None,
                cancel_requested_at=None, message="")


# ---------------------------------------------------------------------- the job process


def run_job(job_id: str, root: str | Path | None = None) -> int:
    """What a job's process does: train, register the checkpoint, record the outcome, then
    start the next queued job (the exit hook)."""
    root = jobs_root(root)
    with _locked(root):  # held by the launcher until it has recorded this process
        job = get(job_id, root)
    if job.state != "running" or job.status.get("pid") != os.getpid():
        raise JobError(f"job {job_id} is {job.state}, not started as this process: "
                       "`jobs run` is what the scheduler starts; use `jobs resume`")
    signal.signal(signal.SIGTERM, lambda *_: request_stop())  # honoured from the first step
    try:
        watcher = foreground.start_watcher(os.getpid())  # paused while the studio is in use
    except ValueError as error:
        print(f"warning: {error}: this job does not pause for the studio", flush=True)
        watcher = None
    try:
        code = _train(job)
    finally:
        foreground.stop_watcher(watcher)
    registered = code == 0 and _reported(lambda: _register(job))
    with _locked(root):
        job = get(job_id, root)
        if code == 0 and registered:
            state, message = "succeeded", "trained, evaluated and registered"
        elif code == 0:
            state, message = "failed", f"trained, but not registered: {_last_error(job)}"
        elif code == STOPPED_EXIT or job.status.get("cancel_requested_at"):
            state, message = "cancelled", "stopped on request: resume continues it"
        else:
            state, message = "failed", _last_error(job) or f"exit code {code}"
        _set(job, state=state, message=message, exit_code=code, finished_at=time.time(),
             pid=None)
    print(f"--- job {job_id}: {state} ({message})", flush=True)
    schedule(root)
    return code


def _train(job: Job) -> int:
    """Train the job in this process, or in torchrun's; the exit code (a stop's included)."""
    if job.spec["nproc"] == 1:
        return run_rank(job)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(job.spec["nproc"]), "-m", "rd", "jobs", "rank", job.id,
               "--root", str(job.folder.parent)]
    print(f"--- {shlex.join(command)}", flush=True)
    process = subprocess.Popen(command, preexec_fn=die_with_parent)
    signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    return process.wait()


def run_rank(job: Job) -> int:
    """One training process of the job (the only one, or a torchrun rank): the pipeline,
    continuing from the job's resume state when there is one; an exit code."""
    def pipeline() -> None:
        config = job.config
        resume = resume_path(job.checkpoint).exists()  # written with every checkpoint
        outcome = train_and_evaluate(
            MVTecCategory(job.spec["data"], job.spec["category"]), config, job.checkpoint,
            metadata={"command": job.command}, resume=resume, overwrite=True,
            evaluate_after=job.spec["evaluate"], progress=True)
        if outcome.result.rank:
            return
        print("\n".join(outcome.summary()))
        if outcome.report is not None:
            print(format_summary(outcome.report))
            print(f"report {outcome.report_path}")

    try:
        return 0 if _reported(pipeline) else 2
    except TrainingStopped as stop:
        return stop.code


def _register(job: Job) -> None:
    """Register the job's model, unless an interrupted attempt already did (same file)."""
    digest = file_sha256(job.checkpoint)
    for entry in read_manifest(user_manifest()):
        if entry.sha256 == digest and entry.dataset == job.spec["dataset"]:
            print(f"already registered as {entry.dataset}/{entry.category}/{entry.backbone} -> "
                  f"{entry.path}")
            return
    entry = register_model(job.checkpoint, job.spec["dataset"])
    print(f"registered {entry.dataset}/{entry.category}/{entry.backbone} -> {entry.path}")


def _reported(step) -> bool:
    """Run ``step()``; an error goes to the log as ``error: ...`` (a traceback if unexpected).
    Whether it succeeded."""
    try:
        step()
        return True
    except (RDError, OSError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {message}", file=sys.stderr)
        return False
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        traceback.print_exc()
        return False
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _last_error(job: Job) -> str:
    lines = [line for line in job.log_tail(200).splitlines() if line.startswith("error:")]
    return lines[-1].removeprefix("error:").strip() if lines else ""


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _all(root: Path) -> list[Job]:
    jobs = []
    for folder in root.iterdir() if root.is_dir() else []:
        if _ID.fullmatch(folder.name) and folder.is_dir():
            with contextlib.suppress(JobError):
                jobs.append(get(folder.name, root))
    return sorted(jobs, key=lambda job: job.spec["submitted"])


def _read_object(path: Path) -> tuple[dict[str, Any], str | None]:
    """A JSON object from ``path``, or ({}, what is wrong with the file)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return {}, f"{path.name} cannot be read ({first[:120]})"
    if not isinstance(value, dict):
        return {}, f"{path.name} is not a JSON object"
    return value, None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# What listing, scheduling and the pages read of a spec: each field's check, and what a broken
# job shows instead.
_SPEC_FIELDS: dict[str, tuple[Any, Any]] = {
    "submitted": (_is_number, 0.0), "resource": (lambda v: v in ("cpu", "gpu"), "cpu"),
    "epochs": (_is_count, 0), "nproc": (_is_count, 1), "name": (lambda v: isinstance(v, str), "?"),
    "dataset": (lambda v: isinstance(v, str), "?"), "category": (lambda v: isinstance(v, str), "?"),
    "backbone": (lambda v: isinstance(v, str), "?"), "cwd": (lambda v: isinstance(v, str), "."),
}


def _spec_problem(spec: dict[str, Any]) -> str | None:
    for name, (valid, _) in _SPEC_FIELDS.items():
        if name not in spec:
            return f"spec.json lacks {name!r}"
        if not valid(spec[name]):
            return f"spec.json has a bad {name!r} ({spec[name]!r:.60})"
    if "config" in spec:
        if not isinstance(spec["config"], dict):
            return "spec.json has a bad 'config' (not an object)"
    elif not (isinstance(spec.get("train_args"), list)
              and all(isinstance(a, str) for a in spec["train_args"])):
        return "spec.json has neither a 'config' nor 'train_args'"
    return None


def _status_problem(status: dict[str, Any]) -> str | None:
    state = status.get("state")
    if state not in STATES:
        return f"status.json has no valid 'state' ({state!r:.40})"
    if state == "queued" and not _is_number(status.get("queued_at")):
        return "status.json of a queued job lacks 'queued_at'"
    if state == "running" and not _is_count(status.get("pid")):
        return "status.json of a running job lacks its 'pid'"
    if not isinstance(status.get("attempts", 0), int):
        return "status.json has a bad 'attempts'"
    return None


def _broken(job_id: str, folder: Path, spec: dict[str, Any], problem: str) -> Job:
    """A job that cannot be read, showing what could be read of its spec, and why."""
    submitted = 0.0
    with contextlib.suppress(OSError):
        submitted = folder.stat().st_mtime
    shown = {name: spec[name] if name in spec and valid(spec[name]) else default
             for name, (valid, default) in _SPEC_FIELDS.items()}
    if not _is_number(spec.get("submitted")):
        shown["submitted"] = submitted
    message = (f"broken: {problem}: `python -m rd jobs repair {job_id}` or "
               f"`python -m rd jobs delete {job_id}`")
    return Job(job_id, folder, shown, {"state": BROKEN, "reason": problem, "message": message})


def _set(job: Job, **changes: Any) -> Job:
    status = {**job.status, **changes}
    _write_json(job.folder / "status.json", status)
    return replace(job, status=status)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, process group, start time) of a process from /proc; None if there is none."""
    fields = proc_stat(pid)
    return None if fields is None else (fields[0], int(fields[2]), fields[19])


def _identity(pid: int) -> str | None:
    """Boot id and start time of a process: what tells it from a later one with the same pid."""
    stat = _stat(pid)
    if stat is None:
        return None
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{boot.read_text().strip() if boot.exists() else ''}:{stat[2]}"


def _alive(status: dict[str, Any]) -> bool:
    """Whether a running job's processes are still there (see the module's notes)."""
    pid = status.get("pid")
    if not pid:
        return False
    if not Path("/proc/self/stat").exists():  # no /proc: the kernel knows the group
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    leader = _stat(pid)
    if leader is not None and leader[0] != "Z":
        return _identity(pid) == status.get("process")
    # The leader is gone (or a zombie): torchrun and its ranks may still be running in its group.
    others = (_stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return any(stat is not None and stat[1] == pid and stat[0] != "Z" for stat in others)
