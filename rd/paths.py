"""Where rd keeps per-user files (the built-in dataset), outside the package and any checkout."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "rd-studio"


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
