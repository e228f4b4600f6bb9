"""rd.results: the persistent store of scores and reports, keyed by content hashes."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

from rd import results
from rd.data import MVTecCategory
from rd.results import ResultsError, ResultsStore

MODEL = "a" * 64
OTHER = "b" * 64


def _digest(i: int) -> str:
    return f"{i:064x}"


def test_scores_persist_across_store_objects_and_keep_first_when_asked(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.scores(MODEL, [_digest(1)]) == {}  # nothing written yet: no database created
    assert not (tmp_path / "scores.sqlite").exists()
    store.put_scores(MODEL, {_digest(1): 0.5, _digest(2): 1.5})
    again = ResultsStore(tmp_path)  # a restarted server
    assert again.scores(MODEL, [_digest(1), _digest(2), _digest(3)]) == {_digest(1): 0.5,
                                                                       _digest(2): 1.5}
    assert again.scores(OTHER, [_digest(1)]) == {}
    again.put_scores(MODEL, {_digest(1): 9.0}, replace=False)
    assert again.scores(MODEL, [_digest(1)]) == {_digest(1): 0.5}
    again.put_scores(MODEL, {_digest(1): 9.0})
    assert again.scores(MODEL, [_digest(1)]) == {_digest(1): 9.0}


def test_bad_keys_and_scores_are_refused(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(ResultsError, match="SHA-256"):
        store.put_scores("../../etc", {_digest(1): 1.0})
    with pytest.raises(ResultsError, match="SHA-256"):
        store.report(MODEL, "../x")
    with pytest.raises(ResultsError, match="finite"):
        store.put_scores(MODEL, {_digest(1): float("nan")})
    assert store.scores(MODEL, [_digest(1)]) == {}


def _writer(root: str, start: int) -> None:
    store = ResultsStore(root)
    for i in range(start, start + 25):
        store.put_scores(MODEL, {_digest(i): float(i)})


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    context = multiprocessing.get_context("fork")  # only sqlite runs in the children
    workers = [context.Process(target=_writer, args=(str(tmp_path), k * 25)) for k in range(3)]
    for worker in workers:
        worker.start()
    threads = [threading.Thread(target=_writer, args=(str(tmp_path), 75 + k * 25))
               for k in range(2)]
    for thread in threads:
        thread.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    for thread in threads:
        thread.join(60)
    found = ResultsStore(tmp_path).scores(MODEL, [_digest(i) for i in range(125)])
    assert found == {_digest(i): float(i) for i in range(125)}


def test_reports_are_written_whole_and_an_unreadable_one_is_absent(tmp_path):
    store = ResultsStore(tmp_path)
    store.put_report(MODEL, OTHER, {"images": [], "image_auroc": 0.9})
    assert store.report(MODEL, OTHER) == {"images": [], "image_auroc": 0.9}
    assert not list(tmp_path.rglob("*.tmp"))
    (tmp_path / MODEL / f"{OTHER}.report.json").write_text('{"images": [')
    assert store.report(MODEL, OTHER) is None


def test_digests_follow_content_not_path(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"same")
    second.write_bytes(b"same")
    assert results.image_digest(first) == results.image_digest(second)
    first.write_bytes(b"changed, longer")
    assert results.image_digest(first) != results.image_digest(second)
    pixels = np.zeros((4, 4, 3), np.uint8)
    assert results.array_digest(pixels) != results.array_digest(pixels.reshape(4, 12))


def _report_for(samples, scores) -> dict:
    return {"images": [{"path": "/elsewhere/" + "/".join(Path(s.path).parts[-4:]),
                        "defect": s.defect, "label": s.label, "score": score}
                       for s, score in zip(samples, scores, strict=True)],
            "thresholds": {"f1": {"threshold": 1.0}}}


def test_a_committed_report_seeds_the_store_when_it_matches_the_test_set(tmp_path, tiny_mvtec):
    samples = MVTecCategory(tiny_mvtec.root, "widget").test_samples()
    digests = [results.image_digest(s.path) for s in samples]
    scores = [float(i) for i in range(len(samples))]
    store = ResultsStore(tmp_path)
    assert not results.seed_from_report(store, MODEL, _report_for(samples[1:], scores[1:]),
                                        samples, digests)  # one image missing: not used
    assert results.seed_from_report(store, MODEL, _report_for(samples, scores), samples,
                                    digests)
    assert store.scores(MODEL, digests) == dict(zip(digests, scores, strict=True))
    stored = store.report(MODEL, results.testset_key(samples, digests))
    local = results.localise(stored, samples, digests, store.scores(MODEL, digests))
    assert [i["path"] for i in local["images"]] == [str(s.path) for s in samples]


def test_evaluate_into_streams_scores_then_stores_the_report(tmp_path, studio_home):
    from rd.detector import load

    detector = load(studio_home.checkpoint, device="cpu")
    samples = MVTecCategory(studio_home.root, "widget").test_samples()
    digests = [results.image_digest(s.path) for s in samples]
    store = ResultsStore(tmp_path)
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append((done, len(store.scores(MODEL, digests))))

    report = results.evaluate_into(store, MODEL, detector, samples, digests, batch_size=4,
                                   on_progress=progress)
    assert seen == [(4, 4), (8, 8), (10, 10)]  # each batch stored as soon as computed
    stored = store.scores(MODEL, digests)
    assert [stored[d] for d in digests] == [i["score"] for i in report["images"]]
    assert store.report(MODEL, results.testset_key(samples, digests)) == json.loads(
        json.dumps(report))
    direct = detector.predict([samples[0].path]).scores[0]
    assert abs(stored[digests[0]] - direct) < 1e-4


def test_an_unreadable_test_image_is_left_out_and_named(tmp_path, studio_home):
    import shutil

    from rd.detector import load

    root = shutil.copytree(studio_home.root, tmp_path / "data")
    (root / "widget" / "test" / "good" / "zz-junk.png").write_bytes(b"not an image")
    detector = load(studio_home.checkpoint, device="cpu")
    samples = MVTecCategory(root, "widget").test_samples()
    digests = [results.image_digest(s.path) for s in samples]
    store = ResultsStore(tmp_path / "results")
    report = results.evaluate_into(store, MODEL, detector, samples, digests)
    assert len(report["images"]) == len(samples) - 1
    assert "zz-junk.png" in report["skipped_images"][0]
    assert len(store.scores(MODEL, digests)) == len(samples) - 1
    assert store.report(MODEL, results.testset_key(samples, digests)) is not None
