"""Low-level file helpers with no rd dependencies: atomic writes, hashes, the data home, and
child processes that die with their parent."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

APP_NAME = "rd-studio"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary_path)`` then rename over ``path``: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp makes the file private (0600); keep the mode a plain write would give
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_home() -> Path:
    """The user's rd data directory: $RD_HOME, else $XDG_DATA_HOME/rd-studio, else
    ~/.local/share/rd-studio.

    Nothing is created here, so importing or asking never touches the disk; callers make the
    folders they write into. A relative $XDG_DATA_HOME is ignored, as the XDG spec asks.
    """
    rd_home = os.environ.get("RD_HOME")
    if rd_home:
        return Path(rd_home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_NAME
    return Path.home() / ".local" / "share" / APP_NAME


def die_with_parent() -> None:
    """Linux: be killed when the parent process dies, so that killing a job's launcher (torchrun,
    or the job process above it) never leaves orphans training on. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a Python child of rd (a job, a watcher, a background
    export) with this checkout first on PYTHONPATH: the same rd runs there whatever folder the
    studio or the command was started from."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def background_python(code: str, *args: str) -> subprocess.Popen:
    """Run Python ``code`` (its arguments in ``sys.argv[1:]``) in a child process at background
    priority (``lower_priority``) that dies with its parent; its stderr is piped."""
    prologue = ("import sys\n"
                "from rd.files import die_with_parent, lower_priority\n"
                "lower_priority()\n"
                "die_with_parent()\n")
    return subprocess.Popen([sys.executable, "-c", prologue + code, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=child_environment())


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of Linux's ``/proc/PID/stat`` after the command name (state first, then the
    parent's pid, ...); None when there is no such process or no ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


BACKGROUND_PRIORITIES = "'idle' or a niceness from 0 to 19"


def check_background_priority(priority: str) -> str:
    """``priority`` if it is one of BACKGROUND_PRIORITIES, else ValueError saying so."""
    if priority == "idle" or (priority.isdigit() and int(priority) <= 19):
        return priority
    raise ValueError(f"a background priority is {BACKGROUND_PRIORITIES}, got {priority!r}")


def lower_priority(priority: str = "idle") -> None:
    """Make this process (and what it starts) yield the CPU to interactive work.

    ``idle``: Linux's SCHED_IDLE, which runs only on CPU time nothing else wants (nice 19 where
    it does not exist); a niceness ``"0"``…``"19"`` otherwise. On the 2-core machine the studio
    is measured on, a nice 10 neighbour still slowed a threshold move from 0.1 s to 0.55 s;
    an idle one did not (docs/performance.md).
    """
    priority = check_background_priority(priority)
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19 if priority == "idle" else int(priority))
