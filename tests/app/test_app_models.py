"""The sidebar's model picker, versioned models and data sources, through Streamlit's AppTest.

Regression tests of issue 10: a quick job never replaces a shipped model (bug 3); one image has
one score and one verdict on every page (bug 2); the defect-type filter starts afresh on each
category (bug 1); data without a model can be browsed. Issue 13 (7): "Add folder" only takes
folders under the allowed roots, under a new name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from rd import results
from rd.checkpoints import read_metadata
from rd.data.synthetic import ensure_builtin_dataset
from rd.manifest import PROJECT_MANIFEST, read_manifest, register, user_manifest
from tests.app.apptest import open_page, settled

SHIPPED_FABRIC = "shipped:builtin/fabric-efficientnet_lite0"


@pytest.fixture(scope="module")
def builtin_data(studio_home) -> Path:
    """The built-in dataset, generated once (in the shared studio home)."""
    return ensure_builtin_dataset(studio_home.home / "builtin")


@pytest.fixture
def home(builtin_data, studio_home, tmp_path, monkeypatch) -> Path:
    """A fresh data home (RD_HOME) that sees the built-in data without regenerating it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "builtin").symlink_to(builtin_data, target_is_directory=True)
    monkeypatch.setenv("RD_HOME", str(home))
    return home


def _quick_model(studio_home, category: str = "fabric") -> None:
    """What a 1-epoch job on builtin/<category> registers: a poor model of its own."""
    meta = read_metadata(studio_home.checkpoint)
    register(user_manifest(), studio_home.checkpoint, "builtin", category, meta["backbone"],
             report={"image_auroc": 0.55}, copy=True, name="quick", metadata=meta)


def _app(source: str = "builtin", category: str = "fabric", page: str | None = None
         ) -> AppTest:
    return open_page(source, page, category)


def _picker(at: AppTest, category: str = "fabric", backbone: str = "efficientnet_lite0"):
    return at.sidebar.selectbox(key=f"model::builtin/{category}/{backbone}")


def test_a_quick_job_never_replaces_the_shipped_model(home, studio_home):
    shipped_before = PROJECT_MANIFEST.read_bytes()
    _quick_model(studio_home)
    at = _app()
    picker = _picker(at)
    (user,) = [e.id for e in read_manifest(user_manifest())]
    assert len(picker.options) == 2  # labels, best first
    assert picker.options[0].endswith("image AUROC 96.7 · shipped")
    assert picker.options[1].startswith("quick · ") and "image AUROC 55.0" in picker.options[1]
    assert picker.value == SHIPPED_FABRIC  # the best image AUROC is the default
    assert at.session_state.selection.entry.shipped
    assert PROJECT_MANIFEST.read_bytes() == shipped_before

    picker.set_value(user).run()  # the choice is remembered in the settings
    assert at.session_state.selection.entry.id == user
    settings = json.loads((home / "app_settings.json").read_text())
    assert settings["models"]["builtin/fabric"] == user
    again = _app()
    assert again.session_state.selection.entry.id == user


def test_one_score_and_one_verdict_for_fabric_stain_000(home):
    """Bug 2: the shipped fabric model's F1 threshold is stain/000's own score: grid ⚠,
    Review "Caught" and the detail "defective" (+0.0000), never "normal −0.0000"."""
    at = _app(page="screens/review.py")
    review_buttons = [b.key for b in at.button if b.key and "stain/000.png" in b.key]
    assert review_buttons and all(k.startswith("review::TP::") for k in review_buttons)

    at.switch_page("screens/inspect.py").run()
    stain = next(b for b in at.button if b.key and b.key.startswith("open::")
                 and b.key.endswith("stain/000.png"))
    stain.click().run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m for m in at.metric}
    assert metrics["Verdict"].value == "defective"
    assert metrics["Score"].delta.startswith("+0.0000")


def test_the_defect_filter_starts_afresh_on_each_category(home):
    """Bug 1: fabric → wood keeps wood's own defect types; → hex_nut shows defective images."""
    at = _app(page="screens/inspect.py")
    filters = [m for m in at.multiselect if m.label == "Defect types"]
    assert filters and "stain" in filters[0].value
    for category in ("wood", "hex_nut"):
        at.sidebar.selectbox(key="category").set_value(category).run()
        assert not at.exception, [e.value for e in at.exception]
        (shown,) = [m for m in at.multiselect if m.label == "Defect types"]
        assert set(shown.value) == set(shown.options) and len(shown.value) > 1, category


def test_data_without_a_model_can_be_browsed_and_offers_training(home, studio_home, tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(studio_home.root, root / "parts")  # parts/widget: no model registered
    settings = {"mvtec_roots": {"parts": str(root / "parts")}}
    (home / "app_settings.json").write_text(json.dumps(settings))
    at = _app(source="parts", category="widget")
    warnings = " ".join(w.value for w in at.sidebar.warning)
    assert "No model has been trained on" in warnings and "another backbone" not in warnings
    at.switch_page("screens/inspect.py").run()  # the images can be browsed all the same
    assert not at.exception, [e.value for e in at.exception]
    opens = [b for b in at.button if b.key and b.key.startswith("open::")]
    assert len(opens) == 10  # make_fake_mvtec's test set
    opens[-1].click().run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("screens/evaluate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.button(key="require_model::train").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="train::category").value == "widget"
    source = at.selectbox(key="train::source")
    assert source.options[source.value] == "parts"


def test_add_folder_only_under_allowed_roots_and_new_names(home, studio_home, tmp_path,
                                                           monkeypatch):
    allowed = tmp_path / "allowed"
    good = shutil.copytree(studio_home.root, allowed / "parts")
    clash = shutil.copytree(studio_home.root, allowed / "nested" / "builtin")
    outside = shutil.copytree(studio_home.root, tmp_path / "outside" / "other")
    monkeypatch.setenv("RD_DATA_ROOTS", str(allowed))
    at = _app()

    def add(folder: Path | str) -> AppTest:
        (field,) = [t for t in at.sidebar.text_input if t.label.startswith("Folder")]
        field.input(str(folder))
        (submit,) = [b for b in at.sidebar.button if b.label == "Add"]
        submit.click().run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    add(outside)
    assert "outside the folders" in " ".join(e.value for e in at.sidebar.error)
    add(clash)
    assert "exists already" in " ".join(e.value for e in at.sidebar.error)
    add("relative/parts")
    assert "absolute path" in " ".join(e.value for e in at.sidebar.error)
    add(good)
    roots = json.loads((home / "app_settings.json").read_text())["mvtec_roots"]
    assert roots == {"parts": str(good.resolve())}
    add(good)  # the same name again
    assert "exists already" in " ".join(e.value for e in at.sidebar.error)


def test_inspect_the_model_after_a_job_moves_the_sidebar(home, studio_home, jobs_folder):
    """A finished job's "Inspect the model" selects its data, category and model."""
    from rd import jobs
    from rd.training import TrainConfig

    folder = jobs_folder / "20260101-000000-wood-quick-0000"
    folder.mkdir(parents=True)
    shutil.copy(studio_home.checkpoint, folder / jobs.CHECKPOINT)
    config = TrainConfig(epochs=1, image_size=64, batch_size=4, device="cpu")
    spec = {"id": folder.name, "name": "wood-quick", "dataset": "builtin", "category": "wood",
            "data": str(home / "builtin"), "config": config.to_dict(), "evaluate": True,
            "backbone": config.backbone, "epochs": 1, "device": "cpu", "nproc": 1,
            "resource": "cpu", "cwd": str(home), "command": "", "idempotency_key": None,
            "submitted": 0.0}
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "status.json").write_text(json.dumps({"state": "succeeded", "attempts": 1}))
    meta = read_metadata(folder / jobs.CHECKPOINT)
    entry = register(user_manifest(), folder / jobs.CHECKPOINT, "builtin", "wood",
                     meta["backbone"], report={"image_auroc": 0.5}, copy=True, metadata=meta)

    at = _app(page="screens/train.py")
    at.button(key=f"inspect::{folder.name}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    chosen = at.session_state.selection
    assert (chosen.source.name, chosen.category, chosen.entry.id) == ("builtin", "wood",
                                                                       entry.id)
    assert at.sidebar.selectbox(key="category").value == "wood"


def test_each_data_home_evaluates_into_its_own_store(studio_home, tmp_path, monkeypatch):
    """A background evaluation done for one data home (its own results store) is not done for
    another in the same process: the second home's Review fills in too (it stayed empty when
    the app's runs were keyed by model and test set only)."""
    counts = []
    for name in ("first", "second"):
        home = tmp_path / name
        shutil.copytree(studio_home.home / "models", home / "models")
        shutil.copy(studio_home.home / "app_settings.json", home / "app_settings.json")
        monkeypatch.setenv("RD_HOME", str(home))
        at = settled(_app(studio_home.dataset, studio_home.category, "screens/review.py"))
        counts.append(sum(int(h.value.rsplit("· ", 1)[1]) for h in at.subheader))
        assert list((home / "results").glob("*/*.report.json"))
    assert counts == [10, 10]


def test_results_survive_a_restart_and_are_shared_by_tabs(home, studio_home, monkeypatch):
    """Scores and reports are stored on disk: a restarted server computes nothing again."""
    shutil.copytree(studio_home.home / "models", home / "models")
    shutil.copy(studio_home.home / "app_settings.json", home / "app_settings.json")
    at = settled(_app(studio_home.dataset, studio_home.category, "screens/review.py"))
    assert sum(int(h.value.rsplit("· ", 1)[1]) for h in at.subheader) == 10
    assert list((home / "results").glob("*/*.report.json"))

    st.cache_data.clear()  # a restart: nothing is left in memory
    st.cache_resource.clear()

    def evaluate_into(*args, **kwargs):
        raise AssertionError("evaluated again after a restart")

    monkeypatch.setattr(results, "evaluate_into", evaluate_into)
    second = settled(_app(studio_home.dataset, studio_home.category, "screens/review.py"))
    assert sum(int(h.value.rsplit("· ", 1)[1]) for h in second.subheader) == 10


def test_own_models_are_renamed_and_deleted_after_confirmation(home, studio_home):
    _quick_model(studio_home)
    (entry,) = read_manifest(user_manifest())
    at = _app(page="screens/train.py")
    assert at.selectbox(key="models::pick").value == entry.id  # shipped ones are not offered
    at.text_input(key="models::name").input("baseline")
    (rename,) = [b for b in at.button if b.label == "Rename"]
    rename.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert read_manifest(user_manifest())[0].name == "baseline"

    at.button(key=f"model::{entry.id}::delete").click().run()
    at.button(key=f"model::{entry.id}::keep").click().run()  # changed one's mind
    assert read_manifest(user_manifest()) and entry.path.exists()
    at.button(key=f"model::{entry.id}::delete").click().run()
    at.button(key=f"model::{entry.id}::confirm").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert read_manifest(user_manifest()) == [] and not entry.path.exists()
    assert PROJECT_MANIFEST.is_file()


def test_a_test_set_of_normal_images_only_is_scored_not_evaluated(home, studio_home, tmp_path):
    data = tmp_path / "goodonly"
    shutil.copytree(studio_home.root, data)
    for defect in ("scratch", "hole"):
        shutil.rmtree(data / "widget" / "test" / defect)
    shutil.rmtree(data / "widget" / "ground_truth")
    (home / "app_settings.json").write_text(json.dumps({"mvtec_roots": {"goodonly": str(data)}}))
    meta = read_metadata(studio_home.checkpoint)
    register(user_manifest(), studio_home.checkpoint, "goodonly", "widget", meta["backbone"],
             copy=True, metadata=meta)
    at = settled(_app("goodonly", "widget", "screens/evaluate.py"))
    assert any("cannot be evaluated" in i.value for i in at.info), [i.value for i in at.info]
    at = settled(at.switch_page("screens/review.py").run())
    assert sum(int(h.value.rsplit("· ", 1)[1]) for h in at.subheader) == 4  # all scored
