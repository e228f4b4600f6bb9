"""``python -m rd jobs ...``: background training jobs (``rd.jobs``) from the command line."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from rd import jobs
from rd.cli import train as train_cli
from rd.errors import RDError
from rd.jobs import ACTIVE, CANCEL_TIMEOUT_S, ROOT_ENV, Job, JobError
from rd.training import TrainConfig

_NO_OUT = "\0"  # stands in for --out when parsing a job's options: a job writes into its folder


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``jobs submit`` takes the train command's options (``commands`` must already hold it)."""
    parser = commands.add_parser(
        "jobs", help="background training jobs: submit, list, show, cancel, resume, repair, "
        "delete, logs",
        description=jobs.__doc__.split("\n\n")[0])
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
            ("repair", "give a broken job whose status is damaged a resumable status",
             cmd_repair),
            ("delete", "remove a job's folder (not while it runs)", cmd_delete),
            ("logs", "print a job's log", cmd_logs),
            ("run", "(internal) a job's own process, as the scheduler starts it", cmd_run),
            ("rank", "(internal) one torchrun process of a multi-process job", cmd_rank)):
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


def parse_train_options(train_args: Sequence[str]) -> tuple[TrainConfig, Path, str, bool]:
    """A job's training options (``train``'s, without --out) as (config, data root, category,
    evaluate); JobError says what is wrong with them."""
    parser = argparse.ArgumentParser(prog="python -m rd", add_help=False)
    train_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(["train", "--out", _NO_OUT, *map(str, train_args)])
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
    try:
        config = train_cli.train_config(args)
    except RDError as error:  # TrainingError
        raise JobError(str(error)) from None
    return config, args.data, args.category, not args.no_evaluate


def submit_train_options(train_args: Sequence[str], **options: Any) -> Job:
    """``jobs.submit`` for the options of ``python -m rd train`` (all but --out)."""
    config, data, category, evaluate = parse_train_options(train_args)
    command = f"python -m rd train {shlex.join(map(str, train_args))}"
    return jobs.submit(config, data, category, evaluate=evaluate, command=command, **options)


def migrate_legacy(job_id: str, root: Path | None) -> Job:
    """Convert a job saved by an earlier version (command-line options) to its typed spec."""
    job = jobs.get(job_id, root)
    if not job.legacy:
        return job
    try:
        config, data, _, evaluate = parse_train_options(job.spec["train_args"])
    except JobError as error:
        raise JobError(f"job {job_id} was saved by an earlier version and cannot be resumed "
                       f"({error}): submit it again") from None
    return jobs.migrate(job_id, config, data, evaluate, root)


def cmd_submit(args: argparse.Namespace) -> int:
    job_options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_job_options(job_options)
    options, train_args = job_options.parse_known_args(args.argv[2:])  # after "jobs submit"
    job = submit_train_options(train_args, name=options.name, dataset=options.dataset,
                               nproc=options.nproc, idempotency_key=options.idempotency_key,
                               root=options.root)
    print(f"{job.id}\t{job.state}\t{job.folder}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [("id", "state", "epoch", "loss", "dataset/category", "backbone", "procs")]
    listed = jobs.schedule(args.root)
    for job in listed:
        progress, metrics = job.progress(), job.metrics()
        rows.append((job.id, job.state, f"{progress.epoch}/{progress.epochs}",
                     f"{metrics[-1]['loss']:.4f}" if metrics else "-",
                     f"{job.spec['dataset']}/{job.spec['category']}", job.spec["backbone"],
                     str(job.spec["nproc"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for job in listed:
        if job.state == jobs.BROKEN:
            print(f"{job.id}: {job.status['message']}")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    job = jobs.repair(args.job, args.root)
    print(f"{job.id}\t{job.state}\t{job.status.get('message', '')}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    job = jobs.delete(args.job, args.root)
    print(f"deleted {job.id} ({job.folder})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    jobs.schedule(args.root)
    job = jobs.get(args.job, args.root)
    progress = job.progress()
    eta = f", about {progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
    print(f"job       {job.id} ({job.folder})\nstate     {job.state}"
          f"{': ' + job.status['message'] if job.status.get('message') else ''}\n"
          f"progress  epoch {progress.epoch}/{progress.epochs}{eta}\n"
          f"attempts  {job.status.get('attempts', 0)}\n"
          f"command   {job.command} (processes: {job.spec['nproc']})")
    for record in job.metrics()[-5:]:
        print(f"epoch {record['epoch']:>4}  loss {record['loss']:.4f}  {record['seconds']:.1f} s")
    print(job.log_tail(15))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = jobs.cancel(args.job, args.root)
    deadline = time.monotonic() + CANCEL_TIMEOUT_S + 10
    while job.state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        jobs.schedule(args.root)  # forces the kill once CANCEL_TIMEOUT_S is over
        job = jobs.get(args.job, args.root)
    print(f"{job.id}\t{job.state}\t{job.status.get('message', '')}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    migrate_legacy(args.job, args.root)
    job = jobs.resume(args.job, args.root)
    print(f"{job.id}\t{job.state}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    jobs.schedule(args.root)
    job = jobs.get(args.job, args.root)
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
            jobs.schedule(root)
            job = jobs.get(job.id, root)


def cmd_run(args: argparse.Namespace) -> int:
    migrate_legacy(args.job, args.root)  # one queued before an upgrade
    return jobs.run_job(args.job, args.root)


def cmd_rank(args: argparse.Namespace) -> int:
    return jobs.run_rank(jobs.get(args.job, args.root))
