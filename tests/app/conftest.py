"""Fixtures of the app tests: a data source with two categories whose defect types differ."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

SOURCE = "twoparts"


@pytest.fixture(autouse=True)
def _unfrozen_afterwards():
    """Page runs freeze the objects alive (app/memory.py): the test process lets the garbage
    collector see them again once a test is over."""
    yield
    gc.unfreeze()


@pytest.fixture
def two_categories(studio, tmp_path, monkeypatch):
    """A data source with two categories whose defect types differ (widget: hole, scratch;
    gadget: crack, hole), the studio's tiny model registered for both, and a third category
    (spare) without a model."""
    import json
    import shutil

    import streamlit as st

    from rd.manifest import register
    from tests.conftest import make_fake_mvtec

    home = Path(shutil.copytree(studio.home, tmp_path / "home"))
    root = tmp_path / "twoparts"
    make_fake_mvtec(root, "widget")
    make_fake_mvtec(root, "gadget", seed=1)
    make_fake_mvtec(root, "spare", seed=2)
    for folder in ("test", "ground_truth"):
        (root / "gadget" / folder / "scratch").rename(root / "gadget" / folder / "crack")
    for category in ("widget", "gadget"):
        checkpoint = shutil.copy(studio.checkpoint, home / "models" / f"two_{category}.safetensors")
        register(home / "models" / "manifest.json", Path(checkpoint), SOURCE, category,
                 "efficientnet_lite0")
    settings = json.loads((home / "app_settings.json").read_text())
    settings["mvtec_roots"][SOURCE] = str(root)
    (home / "app_settings.json").write_text(json.dumps(settings))
    monkeypatch.setenv("RD_HOME", str(home))
    # The app's process-wide caches (background evaluation runs among them) belong to the
    # previous test's data home, where they are done; this home's results store is empty.
    st.cache_resource.clear()
    st.cache_data.clear()
    return root


@pytest.fixture
def rerun_until():
    """Rerun an AppTest until ``done(at)`` holds: the studio scores test sets in a background
    thread, and AppTest does not run the pages' self-refreshing fragments."""
    import time

    def rerun(at, done, timeout_s: float = 180):
        deadline = time.monotonic() + timeout_s
        while not done(at):
            assert time.monotonic() < deadline, "the page did not get its results in time"
            time.sleep(0.3)
            at.run()
            assert not at.exception, [e.value for e in at.exception]
        return at

    return rerun
