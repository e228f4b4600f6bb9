"""Low-level file helpers with no rd dependencies: atomic writes, hashes, the data home, and
child processes that die with their parent."""

from __future__ import annotations

import hashlib
import os
import signal
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
