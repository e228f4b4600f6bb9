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

**Processes.** A job runs as ``python -m rd jobs run ID``, started in a new session (its own
process group, no terminal) with its output in ``job.log``, so it outlives the CLI command or the
Streamlit script run that started it. With one process it runs ``python -m rd train`` in itself;
with ``nproc`` > 1 it starts ``python -m torch.distributed.run --standalone --nproc-per-node N -m
rd train`` and waits for it (DDP semantics: ``rd.training``). When training succeeds it registers
the checkpoint in the user manifest (``python -m rd register``, with the evaluation report the
train command stored in it), so the app lists the model at once.

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

POSIX only (sessions, signals, flock); liveness reads ``/proc`` where it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from rd.backbones import WeightsError
from rd.checkpoints import CheckpointError, atomic_write, read_metadata
from rd.data import DataError, MVTecCategory, list_categories
from rd.model import resolve_device
from rd.paths import data_home
from rd.training import (
    STOPPED_EXIT,
    TrainConfig,
    TrainingError,
    die_with_parent,
    log_path,
    request_stop,
    resume_path,
)

# A job's state is one of queued, running, succeeded, failed, cancelled, interrupted.
ACTIVE = ("queued", "running")
RESUMABLE = ("cancelled", "interrupted")
ROOT_ENV = "RD_JOBS_ROOT"
SLOTS_ENV = {"gpu": "RD_JOBS_GPU_SLOTS", "cpu": "RD_JOBS_CPU_SLOTS"}
CANCEL_TIMEOUT_S = 30.0
CHECKPOINT = "model.safetensors"
LOG = "job.log"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # on the job's PYTHONPATH: the same rd runs

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_NO_OUT = "\0"  # stands in for --out when validating: a job writes into its own folder
# Job processes started by this process, polled by schedule() so none is left a zombie.
_LAUNCHED: dict[int, subprocess.Popen] = {}


class JobError(ValueError):
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

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of the training log (a torn last line is skipped)."""
        path = log_path(self.checkpoint)
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
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
        if not self.log.exists():
            return ""
        with self.log.open("rb") as handle:
            handle.seek(max(0, self.log.stat().st_size - 256 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
        shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
        return "\n".join(shown[-lines:])


def jobs_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else data_home() / "jobs"


# ------------------------------------------------------------------------------ requests


def submit(train_args: Sequence[str], *, name: str = "", dataset: str | None = None,
           nproc: int = 1, idempotency_key: str | None = None,
           root: str | Path | None = None) -> Job:
    """Queue a training run (``train_args``: the options of ``python -m rd train`` except
    ``--out``), starting it at once when a slot is free.

    Everything is checked before anything is written: a refused request leaves no job. A request
    with the ``idempotency_key`` of an earlier one returns that job instead of starting another.
    ``dataset`` is the data source's name in the manifest (default: the data folder's name).
    """
    root = jobs_root(root)
    spec = _validated(list(map(str, train_args)), name, dataset, nproc)
    with _locked(root):
        for job in _all(root):
            if idempotency_key and job.spec.get("idempotency_key") == idempotency_key:
                return job
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{spec['name']}-{secrets.token_hex(2)}"
        folder = root / job_id
        folder.mkdir()
        now = time.time()
        spec = {"id": job_id, **spec, "idempotency_key": idempotency_key, "submitted": now}
        _write_json(folder / "spec.json", spec)
        _write_json(folder / "status.json", {"state": "queued", "queued_at": now, "attempts": 0})
    schedule(root)
    return get(job_id, root)


def _validated(train_args: list[str], name: str, dataset: str | None, nproc: int
               ) -> dict[str, Any]:
    """The job's spec, or JobError saying what is wrong with the request."""
    from rd.cli import build_parser  # here: rd.cli imports this module

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(["train", "--out", _NO_OUT, *train_args])
    except SystemExit:
        reason = errors.getvalue().strip().splitlines()
        raise JobError(f"invalid training options: {reason[-1] if reason else train_args}") \
            from None
    if args.out != Path(_NO_OUT) or args.resume or args.overwrite:
        raise JobError("--out, --resume and --overwrite belong to the runner: a job writes into "
                       "its own folder, and `jobs resume ID` continues it")
    if args.data is None or not args.category or args.normal is not None:
        raise JobError("a job trains on a category of an MVTec-layout folder: give --data ROOT "
                       "--category C")
    if not isinstance(nproc, int) or nproc < 1:
        raise JobError(f"the number of processes must be a whole number >= 1, got {nproc!r}")
    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        config.validate()
        if args.category not in list_categories(args.data):
            raise JobError(f"{args.data} has no category {args.category!r} (with train/good)")
        images = len(MVTecCategory(args.data, args.category).train_samples())
        device = resolve_device(args.device)
        if config.amp and device.type != "cuda":
            raise JobError("--amp needs a CUDA device")
        if device.type == "cuda" and nproc > 1:
            if device.index is not None:
                raise JobError(f"{nproc} processes use one GPU each: give --device cuda, "
                               f"not {args.device}")
            if nproc > torch.cuda.device_count():
                raise JobError(f"{nproc} processes need {nproc} GPUs; this machine has "
                               f"{torch.cuda.device_count()}")
        if nproc > min(config.batch_size, images):
            raise JobError(f"{nproc} processes need a batch size and a training set of at least "
                           f"{nproc} images (--batch-size is the global batch)")
        if args.init is not None:
            meta = read_metadata(args.init)
            size = meta.get("preprocess", {}).get("size")
            if (meta["backbone"], size) != (config.backbone, config.image_size):
                raise JobError(f"--init {args.init} is a {meta['backbone']} student at {size} px; "
                               f"this job trains {config.backbone} at {config.image_size} px")
    except (TrainingError, DataError, CheckpointError, WeightsError, OSError,
            ValueError) as error:  # ValueError: resolve_device's "no GPU", and JobError itself
        raise JobError(str(error)) from None
    dataset = dataset if dataset is not None else Path(args.data).resolve().name
    if dataset in ("", ".", "..") or any(c in dataset for c in "/\\\0") or len(dataset) > 100:
        raise JobError(f"invalid dataset name {dataset!r}: one folder name, no path")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:60]
    return {"name": slug or f"{args.category}-{config.backbone}", "dataset": dataset,
            "category": args.category, "backbone": config.backbone, "epochs": config.epochs,
            "device": args.device, "nproc": nproc,
            "resource": "gpu" if device.type == "cuda" else "cpu",
            "train_args": train_args, "cwd": os.getcwd()}


def get(job_id: str, root: str | Path | None = None) -> Job:
    """The job ``job_id``; a malformed id (a path, say) is refused before any file is read."""
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise JobError(f"invalid job id {job_id!r}")
    folder = jobs_root(root) / job_id
    try:
        spec = json.loads((folder / "spec.json").read_text())
        status = json.loads((folder / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise JobError(f"no job {job_id} in {folder.parent}") from None
    return Job(job_id, folder, spec, status)


def list_jobs(root: str | Path | None = None) -> list[Job]:
    """Every job, in submission order."""
    return _all(jobs_root(root))


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
    return job


def resume(job_id: str, root: str | Path | None = None) -> Job:
    """Queue a cancelled or interrupted job again; it continues from its last resume state."""
    root = jobs_root(root)
    with _locked(root):
        job = get(job_id, root)
        if job.state not in RESUMABLE:
            raise JobError(f"job {job_id} is {job.state}: only cancelled or interrupted jobs can "
                           "be resumed")
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


def _launch(root: Path, job: Job) -> Job:
    command = [sys.executable, "-m", "rd", "jobs", "run", job.id, "--root", str(root)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    attempt = job.status.get("attempts", 0) + 1
    try:
        with job.log.open("a") as log:
            log.write(f"--- attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=job.spec["cwd"], env=env,
                                       start_new_session=True)
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
    code = _train(job)
    registered = 1
    if code == 0:
        registered = _cli(["register", str(job.checkpoint), "--dataset", job.spec["dataset"]])
    with _locked(root):
        job = get(job_id, root)
        if code == 0 and registered == 0:
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
    """Run the train command for the job (continuing from its resume state when there is one)."""
    argv = ["train", *job.spec["train_args"], "--out", str(job.checkpoint)]
    if resume_path(job.checkpoint).exists():  # written with (or before) every checkpoint
        argv.append("--resume")
    if job.spec["nproc"] == 1:
        return _cli(argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(job.spec["nproc"]), "-m", "rd", *argv]
    print(f"--- {shlex.join(command)}", flush=True)
    process = subprocess.Popen(command, preexec_fn=die_with_parent)
    signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    return process.wait()


def _cli(argv: list[str]) -> int:
    """``python -m rd ARGV`` in this process; its exit code (a stopped training's included)."""
    from rd.cli import main

    try:
        return main(argv)
    except SystemExit as stop:  # TrainingStopped, or an argparse error
        return stop.code if isinstance(stop.code, int) else 1
    except Exception:
        traceback.print_exc()
        return 1
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
        if _ID.fullmatch(folder.name) and (folder / "status.json").exists():
            with contextlib.suppress(JobError):
                jobs.append(get(folder.name, root))
    return sorted(jobs, key=lambda job: job.spec["submitted"])


def _set(job: Job, **changes: Any) -> Job:
    status = {**job.status, **changes}
    _write_json(job.folder / "status.json", status)
    return replace(job, status=status)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, process group, start time) of a process from /proc; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[2]), rest[19]


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


# ---------------------------------------------------------------------- command line


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``python -m rd jobs ...``; ``jobs submit`` takes the train command's options."""
    parser = commands.add_parser(
        "jobs", help="background training jobs: submit, list, show, cancel, resume, logs",
        description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="jobs_command", required=True)

    p = actions.add_parser("submit", parents=[commands.choices["train"]],
                           conflict_handler="resolve", help="queue a training run",
                           description="Queue `python -m rd train` with these options (all "
                           "but --out, --resume, --overwrite) and print the job id.")
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    _add_job_options(p)
    p.set_defaults(func=cmd_submit)

    for name, help_text, func in (
            ("list", "every job with its state and progress", cmd_list),
            ("show", "a job's status, progress, metrics and last log lines", cmd_show),
            ("cancel", "stop a job (its resume state is kept)", cmd_cancel),
            ("resume", "continue a cancelled or interrupted job", cmd_resume),
            ("logs", "print a job's log", cmd_logs),
            ("run", "(internal) a job's own process, as the scheduler starts it", cmd_run)):
        p = actions.add_parser(name, help=help_text)
        if name != "list":
            p.add_argument("job", help="job id (see `jobs list`)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until it ends")
        p.add_argument("--root", type=Path, help=f"jobs folder (default ${ROOT_ENV}, else "
                       "<data home>/jobs)")
        p.set_defaults(func=func)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="", help="a short name, part of the job id")
    parser.add_argument("--dataset", help="data source name the model is registered under "
                        "(default: the --data folder's name)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (one GPU each with --device cuda; gloo on the CPU): DDP "
                        "through torchrun, --batch-size being the global batch")
    parser.add_argument("--idempotency-key", help="submitting the same key again returns the "
                        "first job instead of starting another")
    parser.add_argument("--root", type=Path, help=f"jobs folder (default ${ROOT_ENV}, else "
                        "<data home>/jobs)")


def cmd_submit(args: argparse.Namespace) -> int:
    job_options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_job_options(job_options)
    options, train_args = job_options.parse_known_args(args.argv[2:])  # after "jobs submit"
    job = submit(train_args, name=options.name, dataset=options.dataset, nproc=options.nproc,
                 idempotency_key=options.idempotency_key, root=options.root)
    print(f"{job.id}\t{job.state}\t{job.folder}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [("id", "state", "epoch", "loss", "dataset/category", "backbone", "procs")]
    for job in schedule(args.root):
        progress, metrics = job.progress(), job.metrics()
        rows.append((job.id, job.state, f"{progress.epoch}/{progress.epochs}",
                     f"{metrics[-1]['loss']:.4f}" if metrics else "-",
                     f"{job.spec['dataset']}/{job.spec['category']}", job.spec["backbone"],
                     str(job.spec["nproc"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    schedule(args.root)
    job = get(args.job, args.root)
    progress = job.progress()
    eta = f", about {progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
    print(f"job       {job.id} ({job.folder})\nstate     {job.state}"
          f"{': ' + job.status['message'] if job.status.get('message') else ''}\n"
          f"progress  epoch {progress.epoch}/{progress.epochs}{eta}\n"
          f"attempts  {job.status.get('attempts', 0)}\n"
          f"command   python -m rd train {shlex.join(job.spec['train_args'])}"
          f" (processes: {job.spec['nproc']})")
    for record in job.metrics()[-5:]:
        print(f"epoch {record['epoch']:>4}  loss {record['loss']:.4f}  {record['seconds']:.1f} s")
    print(job.log_tail(15))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = cancel(args.job, args.root)
    deadline = time.monotonic() + CANCEL_TIMEOUT_S + 10
    while job.state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        schedule(args.root)  # forces the kill once CANCEL_TIMEOUT_S is over
        job = get(args.job, args.root)
    print(f"{job.id}\t{job.state}\t{job.status.get('message', '')}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    job = resume(args.job, args.root)
    print(f"{job.id}\t{job.state}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    schedule(args.root)
    job = get(args.job, args.root)
    _copy_log(job, sys.stdout, follow=args.follow, root=args.root)
    return 0


def _copy_log(job: Job, out: TextIO, follow: bool, root: Path | None) -> None:
    with job.log.open(errors="replace") as log:
        while True:
            out.write(log.read())
            out.flush()
            if not follow or job.state not in ACTIVE:
                return
            time.sleep(1.0)
            schedule(root)
            job = get(job.id, root)


def cmd_run(args: argparse.Namespace) -> int:
    return run_job(args.job, args.root)
