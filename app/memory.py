"""Keep Python's cyclic garbage collector from pausing the studio after every click.

Streamlit runs a full collection after each script run (its ``runner.postScriptGC``). Once
torch, ONNX Runtime, plotly and pandas are loaded the server holds some 570,000 objects, and
each full collection walked them all: 200–350 ms with every thread stopped, after every page
run and every fragment (docs/performance.md, round 7: most of a threshold move's 0.56 s).

What is alive when a user's run starts has just survived such a collection and is mostly the
libraries' own objects, so ``freeze_survivors`` moves it out of the collector's reach
(``gc.freeze``); the collection after the run then walks only what the run made. Objects that
die in a reference cycle after being frozen are reclaimed by ``collect_fully_when_quiet``: a
full collection every few minutes, at a moment nobody is clicking.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

FULL_COLLECTION_EVERY_S = 600.0


def freeze_survivors() -> None:
    """Exclude every object alive now from later collections (until ``collect_fully``)."""
    gc.freeze()


def collect_fully() -> int:
    """A full collection over every object, the frozen ones included, which are frozen again
    afterwards; returns the number of unreachable objects found."""
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found


def collect_fully_when_quiet(wait_for_quiet: Callable[[], None],
                             every_s: float = FULL_COLLECTION_EVERY_S,
                             stop: threading.Event | None = None) -> threading.Thread:
    """Start a thread that every ``every_s`` seconds waits for ``wait_for_quiet`` to return and
    then runs ``collect_fully``, until ``stop`` is set; returns that thread."""
    stop = stop or threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            wait_for_quiet()
            collect_fully()

    thread = threading.Thread(target=run, name="rd-full-collection", daemon=True)
    thread.start()
    return thread
