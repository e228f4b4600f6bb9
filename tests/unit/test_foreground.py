"""rd.foreground: a job's processes pause while the studio is used, and continue after."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rd import foreground
from rd.files import proc_stat
from tests.conftest import process_state, scheduling_policy

# a parent that starts a child, both idling: the job process and a torchrun rank below it
FAMILY = ("import subprocess, sys, time\n"
          "child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: "
          "time.sleep(0.01)'])\n"
          "print(child.pid, flush=True)\n"
          "while True: time.sleep(0.01)\n")


def _stopped(*pids: int) -> bool:
    """Whether any of ``pids`` is stopped (SIGSTOP)."""
    return any(process_state(pid) == "T" for pid in pids)


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def family():
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    yield parent.pid, child
    for pid in (child, parent.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    parent.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_job_and_its_children_pause_while_the_studio_is_used(family, tmp_path, monkeypatch):
    """The mark touched: the job process and its child stop within a poll; quiet for the
    yield time: both continue; the watcher told to stop while they are paused continues them
    first."""
    monkeypatch.setenv("RD_HOME", str(tmp_path))
    parent, child = family
    assert sorted(foreground.process_tree(parent)) == sorted([parent, child])
    monkeypatch.setenv(foreground.YIELD_ENV, "0.6")
    watcher = foreground.start_watcher(parent)
    try:
        time.sleep(0.3)
        assert not _stopped(parent, child)  # nobody used the studio yet
        foreground.note_use()
        assert _until(lambda: _stopped(parent) and _stopped(child), timeout=2)
        assert _until(lambda: not _stopped(parent, child), timeout=3)
        foreground.note_use()
        assert _until(lambda: _stopped(parent), timeout=2)
    finally:
        foreground.stop_watcher(watcher)
    assert watcher.returncode is not None
    assert not _stopped(parent, child)


def test_pausing_is_off_at_zero_and_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(foreground.YIELD_ENV, "0")
    assert foreground.start_watcher(os.getpid()) is None
    for bad in ("-1", "soon", "1e9"):
        monkeypatch.setenv(foreground.YIELD_ENV, bad)
        with pytest.raises(ValueError, match=foreground.YIELD_ENV):
            foreground.yield_seconds()
    monkeypatch.delenv(foreground.YIELD_ENV)
    assert foreground.yield_seconds() == foreground.DEFAULT_YIELD_S


def test_recently_used_reads_the_marks_age(tmp_path):
    mark = tmp_path / "foreground"
    assert not foreground.recently_used(mark, 2.0)  # no studio ever ran here
    mark.touch()
    now = mark.stat().st_mtime
    assert foreground.recently_used(mark, 2.0, now=now + 1.9)
    assert not foreground.recently_used(mark, 2.0, now=now + 2.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_studios_background_process_pauses_while_it_is_used(tmp_path, monkeypatch):
    """An export or data generation started by the studio (rd.files.background_python) pauses
    like a job while the studio is used, then finishes; its exit code comes back."""
    import threading

    from rd.files import background_python

    monkeypatch.setenv("RD_HOME", str(tmp_path))
    monkeypatch.setenv(foreground.YIELD_ENV, "0.6")
    done = tmp_path / "done"
    process = background_python("import time\ntime.sleep(3.0)\nopen(sys.argv[1], 'w').close()\n"
                                "raise SystemExit(3)\n", str(done))
    codes: list[int] = []
    waiting = threading.Thread(target=lambda: codes.append(foreground.run_yielding(process)))
    waiting.start()
    try:
        foreground.note_use()
        assert _until(lambda: _stopped(process.pid), timeout=2)
        assert scheduling_policy(process.pid) == os.SCHED_IDLE  # and at background priority
        for _ in range(10):  # in use for 2 s: it stays paused
            foreground.note_use()
            time.sleep(0.2)
            assert _stopped(process.pid) and not done.exists()
    finally:
        waiting.join(timeout=15)
    assert codes == [3] and done.exists()  # continued once quiet, and finished
    assert proc_stat(process.pid) is None  # reaped


def test_a_bad_setting_leaves_the_studios_background_process_unpaused(tmp_path, monkeypatch):
    from rd.files import background_python

    monkeypatch.setenv("RD_HOME", str(tmp_path))
    monkeypatch.setenv(foreground.YIELD_ENV, "soon")
    foreground.note_use()
    assert foreground.run_yielding(background_python("raise SystemExit(0)\n")) == 0


def test_the_watcher_and_background_processes_find_rd_from_any_folder(tmp_path, monkeypatch):
    """`cd ~ && streamlit run …/app/main.py`: the studio's children still import this rd (they
    failed silently with ModuleNotFoundError, so nothing paused and no export ran)."""
    from rd.files import background_python

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("RD_HOME", str(tmp_path))
    process = background_python("import rd.foreground\n")
    _, error = process.communicate(timeout=60)
    assert process.returncode == 0, error
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(30)"])
    watcher = foreground.start_watcher(sleeper.pid)
    try:
        time.sleep(1.0)
        assert watcher.poll() is None  # watching, not dead on an import error
    finally:
        foreground.stop_watcher(watcher)
        sleeper.kill()
        sleeper.wait()
