"""The Evaluate and Review pages, driven through Streamlit's AppTest on a tiny trained model."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from tests.app.apptest import open_page, settled

SOURCE = "fakeparts"  # tests/conftest.py studio_home: source name = manifest dataset
BARE = "fakeparts_nomasks"  # the same images without ground_truth/
CATEGORY = "widget"
N_NORMAL, N_DEFECTIVE = 4, 6  # make_fake_mvtec's test set: 4 good, 3 scratch + 3 hole


@pytest.fixture
def app_home(studio):
    """The shared studio data folder (tests/conftest.py) as the user's RD_HOME."""
    return studio.home


def _open(page: str, source: str = SOURCE) -> AppTest:
    return settled(open_page(source, page))


def _metrics(at: AppTest) -> dict[str, str]:
    return {metric.label.split(" ·")[0]: metric.value for metric in at.metric}


def _threshold_slider(at: AppTest):
    (slider,) = [s for s in at.slider if s.label.startswith("Threshold")]
    return slider


def test_evaluate_threshold_drives_the_confusion_matrix(app_home):
    at = _open("screens/evaluate.py")
    assert _metrics(at)["Image AUROC"] != "—"
    slider = _threshold_slider(at)
    slider.set_value(slider.max).run()
    high = _metrics(at)
    assert (high["TP"], high["FN"], high["FP"], high["TN"]) == ("0", str(N_DEFECTIVE), "0",
                                                                str(N_NORMAL))
    slider = _threshold_slider(at)
    slider.set_value(slider.min).run()
    low = _metrics(at)
    assert (low["TP"], low["FN"], low["FP"], low["TN"]) == (str(N_DEFECTIVE), "0",
                                                            str(N_NORMAL), "0")
    assert low["Recall (TPR)"] == "1.000" and low["FPR"] == "1.000"

    at.button(key="suggest::fpr_0.01").click().run()
    assert not at.exception
    assert _metrics(at)["FP"] == "0"  # FPR ≤ 1% of 4 normal images: no false alarm
    assert _threshold_slider(at).value < slider.max

    table = at.dataframe[0].value
    assert {"scratch", "hole", "all defects"} <= set(table["defect"])
    compared = at.dataframe[1].value
    assert sorted(compared["backbone"]) == ["efficientnet_lite0", "resnet18"]


def test_review_galleries_follow_the_shared_threshold(app_home):
    at = _open("screens/evaluate.py")
    slider = _threshold_slider(at)
    slider.set_value((slider.min + slider.max) / 3).run()
    counts = _metrics(at)

    settled(at.switch_page("screens/review.py").run())
    headers = [header.value for header in at.subheader]
    assert [h.split(" (")[0] for h in headers] == [
        "Missed defects", "False alarms", "Caught defects", "Passed normal images"]
    numbers = [int(h.rsplit("· ", 1)[1]) for h in headers]
    assert sum(numbers) == N_NORMAL + N_DEFECTIVE
    assert numbers == [int(counts[k]) for k in ("FN", "FP", "TP", "TN")]

    layers = [b for b in at.button if b.key and b.key.startswith("review::")]
    assert len(layers) == N_NORMAL + N_DEFECTIVE
    layers[0].click().run()
    assert not at.exception, [e.value for e in at.exception]


def test_pages_without_masks_show_no_pixel_metrics(app_home):
    at = _open("screens/evaluate.py", BARE)
    metrics = _metrics(at)
    assert metrics["Pixel AUROC"] == metrics["AU-PRO (FPR ≤ 30%)"] == "—"
    assert metrics["Image AUROC"] != "—"
    assert any("Pixel AUROC and AU-PRO: —" in info.value for info in at.info)
    assert set(at.dataframe[0].value["pixel AUROC"]) == {"—"}

    settled(at.switch_page("screens/review.py").run())
    assert sum(int(h.value.rsplit("· ", 1)[1]) for h in at.subheader) == N_NORMAL + N_DEFECTIVE


def test_novelty_report_draws_one_roc_curve_per_class(app_home):
    roc = {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 1.0, 1.0], "thresholds": [2.0, 1.0, 0.0]}
    report = {"dataset": "mnist", "mean_auroc": 0.94, "paper": {"auroc": [99.9, 99.9],
                                                                "mean": 99.2},
              "results": [{"class": str(i), "index": i, "auroc": 0.9 + i / 20, "n_train": 5,
                           "roc": roc} for i in range(2)]}
    at = _open("screens/evaluate.py")
    uploader = at.file_uploader(key="novelty_report")
    at = uploader.upload("report.json", json.dumps(report).encode(), "application/json").run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Mean AUROC"] == "94.0"
    at.file_uploader(key="novelty_report").clear().upload("report.json", b"{", "").run()
    assert not at.exception
    assert any("Cannot read this report" in e.value for e in at.error)
