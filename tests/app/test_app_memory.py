"""app.memory: what survives a run leaves the garbage collector's reach, and what dies there
is still reclaimed by a full collection at a quiet moment."""

from __future__ import annotations

import gc
import threading
import time
import weakref

from app import memory
from tests.app.apptest import open_page


class _Node:
    """An object that can sit in a reference cycle and be watched through a weak reference."""

    def __init__(self) -> None:
        self.partner: _Node | None = None


def _cycle() -> weakref.ref:
    """A two-object reference cycle reachable only from the returned weak reference's target
    while the caller keeps it; the caller drops it to make the cycle garbage."""
    first, second = _Node(), _Node()
    first.partner, second.partner = second, first
    _cycle.kept = first  # type: ignore[attr-defined]
    return weakref.ref(first)


def _drop_cycle() -> None:
    del _cycle.kept  # type: ignore[attr-defined]


def test_a_page_run_freezes_what_survived(studio):
    """Each full collection after a run walked every object of the server (200–350 ms with
    torch, ONNX Runtime and plotly loaded): a user's run now freezes what is alive first."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    at = open_page(studio.dataset)
    assert gc.get_freeze_count() > 10_000  # the libraries' objects, at least
    at.run()
    collectors = [t for t in threading.enumerate() if t.name == "rd-full-collection"]
    assert len(collectors) == 1  # and one thread reclaims what dies frozen, at quiet moments


def test_a_cycle_that_dies_frozen_waits_for_the_full_collection():
    watched = _cycle()
    memory.freeze_survivors()
    _drop_cycle()
    gc.collect()
    assert watched() is not None  # frozen: an ordinary collection does not look at it
    assert memory.collect_fully() >= 2
    assert watched() is None
    assert gc.get_freeze_count() > 0  # the survivors are frozen again


def test_the_full_collection_runs_only_once_quiet():
    quiet, stop = threading.Event(), threading.Event()
    watched = _cycle()
    memory.freeze_survivors()
    _drop_cycle()
    collector = memory.collect_fully_when_quiet(quiet.wait, every_s=0.01, stop=stop)
    try:
        time.sleep(0.2)
        assert watched() is not None  # nobody has been quiet yet
        quiet.set()
        deadline = time.monotonic() + 10
        while watched() is not None:
            assert time.monotonic() < deadline, "the quiet full collection never ran"
            time.sleep(0.01)
    finally:
        stop.set()
        collector.join(5)
    assert not collector.is_alive()
