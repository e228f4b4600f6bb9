"""The app's model: torch at once, ONNX Runtime swapped in once its export is ready."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest


def test_first_image_does_not_wait_for_the_onnx_export(studio, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from app import state
    from rd.runtime import OnnxDetector

    monkeypatch.setenv("RD_RUNTIME", "auto")  # the suite's default is torch (tests/conftest.py)
    checkpoint = shutil.copy(studio.checkpoint, tmp_path / "model.safetensors")
    mtime = (tmp_path / "model.safetensors").stat().st_mtime
    first = state.load_model(str(checkpoint), mtime, "cpu")
    assert not isinstance(first, OnnxDetector)  # served by torch while the export runs
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    deadline = time.monotonic() + 300
    while not isinstance(now := state.load_model(str(checkpoint), mtime, "cpu"), OnnxDetector):
        assert time.monotonic() < deadline, "the ONNX Runtime model never replaced torch"
        time.sleep(0.5)
    assert list(tmp_path.glob("model.*.onnx"))  # cached beside the checkpoint
    ours, theirs = now.predict([image]), first.predict([image])
    assert np.allclose(ours.fused, theirs.fused, atol=1e-5)


def test_the_export_waits_until_nobody_clicked_for_a_while(monkeypatch):
    """Any CPU work beside the browser slows a click's answer on 2 cores: the background export
    starts only after QUIET_S seconds without a page or interactive fragment run."""
    import threading

    from app import state

    monkeypatch.setattr(state, "QUIET_S", 0.5)
    started: list[float] = []
    state.note_activity()
    waiter = threading.Thread(target=lambda: (state.wait_for_quiet(),
                                              started.append(time.monotonic())))
    waiter.start()
    for _ in range(5):
        time.sleep(0.2)
        assert not started
        state.note_activity()
    last = time.monotonic()
    waiter.join(timeout=10)
    assert started and started[0] >= last + 0.45


def test_a_page_run_counts_as_activity(studio):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from app import state

    before = state._ACTIVITY["last"]
    app = Path(__file__).resolve().parents[2] / "app" / "main.py"
    AppTest.from_file(str(app), default_timeout=120).run()
    assert state._ACTIVITY["last"] > before


def _fragment_script() -> None:
    import streamlit as st

    from app import state

    @state.interactive_fragment
    def part() -> None:
        st.button("again")

    part()


def test_the_quiet_counts_from_the_end_of_each_run(studio, monkeypatch):
    """A first page that loads a model for seconds is not a quiet moment: background work (the
    export, generated data) waits QUIET_S after a page's or a fragment's run *ends*."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from app import state

    marks: list[str] = []
    monkeypatch.setattr(state, "note_run_ended", lambda: marks.append("end"))
    monkeypatch.setattr(state, "note_activity", lambda: marks.append("start"))
    app = Path(__file__).resolve().parents[2] / "app" / "main.py"
    AppTest.from_file(str(app), default_timeout=120).run()
    assert marks[-1] == "end"  # the page's last act

    marks.clear()
    at = AppTest.from_function(_fragment_script, default_timeout=60).run()
    at.button[0].click().run()
    assert marks == ["start", "end", "start", "end"]
