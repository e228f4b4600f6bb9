"""Training jobs pause while someone uses the studio, so a click never waits on the CPU.

On the 2-core machine the studio is measured on, a training job beside it slowed the studio
even at SCHED_IDLE (a warm restart 3.3 s instead of 2.4 s; likely its memory traffic and the
shared caches, which no CPU priority schedules away; docs/performance.md, "Round 6"). So the
studio marks each interaction by touching
``<data home>/foreground`` (``note_use``), and every job process runs a small watcher
(``python -m rd.foreground PID``, started by ``start_watcher``) that stops the job's processes
(SIGSTOP: the job process and all it started, torchrun's ranks included) while that mark is
younger than ``$RD_JOBS_YIELD_S`` seconds (default 2; 0: never pause) and continues them
(SIGCONT) once the studio has been quiet that long. A job started where no studio runs is never
paused; one paused for a studio that then dies continues after the same quiet time. The watcher
dies with its job (``die_with_parent``) and continues whatever it stopped when told to stop.
The studio's own background processes (an ONNX export, generated data) yield the same way
(``run_yielding``).

Torch-free: the studio imports this on its first page.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rd.files import child_environment, data_home, die_with_parent, proc_stat

YIELD_ENV = "RD_JOBS_YIELD_S"
DEFAULT_YIELD_S = 2.0
POLL_S = 0.05  # how often the watcher looks at the mark: the most a click waits for the pause


def marker() -> Path:
    """The file whose modification time says when the studio was last used."""
    return data_home() / "foreground"


def note_use() -> None:
    """The studio was just used: running jobs pause until it has been quiet a while."""
    path = marker()
    try:
        os.utime(path)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    except OSError:
        pass  # a read-only data home: the jobs simply do not pause


def yield_seconds() -> float:
    """``$RD_JOBS_YIELD_S`` (seconds of quiet before a paused job continues; 0: never pause),
    ValueError when it is not a number from 0 to 3600."""
    value = os.environ.get(YIELD_ENV, "")
    if not value:
        return DEFAULT_YIELD_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise ValueError(f"${YIELD_ENV} is the seconds of quiet before a paused job continues "
                         f"(0 to 3600; 0 never pauses), got {value!r}")
    return seconds


def start_watcher(pid: int) -> subprocess.Popen | None:
    """Start the watcher of the job process ``pid`` (None when pausing is off)."""
    seconds = yield_seconds()
    if seconds == 0:
        return None
    return subprocess.Popen([sys.executable, "-m", "rd.foreground", str(pid), str(seconds),
                             str(marker())], stdin=subprocess.DEVNULL,
                            env=child_environment(), preexec_fn=die_with_parent)


def stop_watcher(watcher: subprocess.Popen | None) -> None:
    """Stop a watcher; it continues the job's processes if it had paused them."""
    if watcher is None:
        return
    watcher.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watcher.wait(timeout=5)
    if watcher.poll() is None:
        watcher.kill()
        watcher.wait()


def run_yielding(process: subprocess.Popen) -> int:
    """Wait for a background ``process`` of the studio (an export, generated data), paused
    while the studio is used as a job is; its exit code. Its output is read and dropped.

    A bad ``$RD_JOBS_YIELD_S`` (refused when a job is submitted) leaves it unpaused here."""
    try:
        watcher = start_watcher(process.pid)
    except ValueError:
        watcher = None
    try:
        process.communicate()
    finally:
        stop_watcher(watcher)
    return process.returncode


def recently_used(mark: Path, seconds: float, now: float | None = None) -> bool:
    """Whether the studio was used in the last ``seconds`` (by the mark's time)."""
    try:
        touched = mark.stat().st_mtime
    except OSError:
        return False
    return 0 <= (time.time() if now is None else now) - touched < seconds


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``; ``[pid]`` elsewhere)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            fields = proc_stat(entry) if entry.isdigit() else None
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def watch(pid: int, seconds: float, mark: Path) -> None:
    """Pause ``pid``'s processes while the studio is in use; return when ``pid`` is gone or on
    SIGTERM, its processes continued."""
    paused: list[int] = []

    def send(pids: list[int], sig: signal.Signals) -> None:
        for target in pids:
            if target != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(target, sig)

    def finish(*_: object) -> None:
        raise SystemExit(0)  # through the ``finally`` below

    signal.signal(signal.SIGTERM, finish)
    # A job runs at SCHED_IDLE, which the watcher inherits and which would leave it no CPU at
    # the very moment the studio is busy: back to the normal policy where that is allowed.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            used = recently_used(mark, seconds)
            if used and not paused:
                paused = process_tree(pid)
                send(paused, signal.SIGSTOP)
            elif not used and paused:
                send(paused, signal.SIGCONT)
                paused = []
            time.sleep(POLL_S)
    finally:
        send(paused, signal.SIGCONT)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]))
