"""Streaming folder scoring: inputs, rows, errors, resume after a torn write, saved maps."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from rd import scoring
from rd.detector import load
from rd.scoring import COLUMNS, ScoringError, collect_inputs, read_rows, score
from tests.conftest import save_seeded_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_seeded_checkpoint(tmp_path_factory.mktemp("scoring") / "tiny.safetensors",
                                  SIZE, threshold=0.0)


@pytest.fixture(scope="module")
def detector(checkpoint):
    found = load(checkpoint, "cpu")
    found.batch_size = 4
    return found


@pytest.fixture
def folder(tmp_path):
    """11 images in nested folders (two share a name), one corrupt file, one non-image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for index in range(11):
        sub = root / ("a" if index % 2 else "b") / ("deep" if index > 7 else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40 + index, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{index:02d}.png")
    Image.fromarray(pixels).save(root / "a" / "img00.png")  # same name as b/img00.png
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


def _scores_one_by_one(detector, paths):
    return {p: float(detector.predict(p).scores[0]) for p in paths}


def test_collect_inputs_folders_globs_and_lists(folder, tmp_path):
    inputs = collect_inputs([folder])
    assert len(inputs.paths) == 13 and inputs.paths == sorted(inputs.paths)
    assert str(folder / "notes.txt") not in inputs.paths
    relative = {str(inputs.relative(p)) for p in inputs.paths}
    assert len(relative) == 13 and "a/img00.png" in relative and "b/img00.png" in relative
    pattern = collect_inputs([str(folder / "**" / "deep" / "*.png")])
    assert len(pattern.paths) == 3
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nimages/a/img01.png\n\n" + str(folder / "b/img02.png") + "\n")
    both = collect_inputs([folder / "a" / "img01.png"], listing)  # duplicates scored once
    assert [p.split("/")[-1] for p in both.paths] == ["img01.png", "img02.png"]
    with pytest.raises(ScoringError, match="no such file"):
        collect_inputs([folder / "missing"])
    with pytest.raises(ScoringError, match="matches no image"):
        collect_inputs([str(folder / "*.jpg")])


def test_csv_rows_scores_errors_and_verdicts(detector, folder, tmp_path):
    inputs = collect_inputs([folder])
    out = tmp_path / "scores.csv"
    summary = score(detector, inputs, out, workers=2, progress=False)
    rows = read_rows(out, "csv")
    assert [r["path"] for r in rows] == inputs.paths  # every image once, in input order
    assert summary.scored == 13 and summary.errors == 1
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["verdict"] == "error" and broken["error"] and broken["score"] == ""
    good = [r for r in rows if not r["error"]]
    expected = _scores_one_by_one(detector, [r["path"] for r in good])
    for row in good:
        assert abs(float(row["score"]) - expected[row["path"]]) <= 1e-5
        assert row["verdict"] == "defective"  # the checkpoint's threshold is 0
        image = Image.open(row["path"])
        assert (int(row["width"]), int(row["height"])) == image.size
        assert float(row["seconds"]) > 0
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)


def _fails_at_call(monkeypatch, detector, method: str, failing_call: int) -> None:
    """``detector.<method>`` raises "out of memory" at its ``failing_call``-th call."""
    calls = []
    original = getattr(detector, method)

    def failing(batch):
        calls.append(len(batch))
        if len(calls) == failing_call:
            raise RuntimeError("out of memory")
        return original(batch)

    monkeypatch.setattr(detector, method, failing)


def test_a_model_failure_stops_after_the_rows_before_it(checkpoint, folder, tmp_path,
                                                        monkeypatch):
    """The model runs in its own thread, a batch ahead of the rows being written: its error
    still reaches the caller, and every batch before it is in the output."""
    failing = load(checkpoint, "cpu")
    failing.batch_size = 4
    _fails_at_call(monkeypatch, failing, "predict_tensor", 2)
    out = tmp_path / "scores.csv"
    with pytest.raises(RuntimeError, match="out of memory"):
        score(failing, collect_inputs([folder]), out, workers=0, progress=False)
    assert len(read_rows(out, "csv")) == 4  # the first batch's rows, flushed


@pytest.fixture(scope="module")
def onnx_detector(checkpoint):
    """The users' default on a CPU: the export in ONNX Runtime, two cores' worth of lanes."""
    pytest.importorskip("onnxruntime")
    from rd.runtime import OnnxDetector, load_runtime

    found, _ = load_runtime(checkpoint, "cpu", "onnxruntime")
    assert isinstance(found, OnnxDetector)
    found.batch_size, found.threads = 8, 2
    return found


def _lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rd-lane")]


def test_onnxruntime_lanes_decode_and_score_in_the_same_threads(onnx_detector, folder,
                                                                tmp_path, monkeypatch):
    """By default ONNX Runtime on a CPU scores in lanes: each thread decodes its chunk and runs
    the model on it, with no decoding processes; the rows are those of the process path."""
    inputs = collect_inputs([folder])
    loader_rows = tmp_path / "loader.csv"
    score(onnx_detector, inputs, loader_rows, workers=0, progress=False)

    decoded_in: set[str] = set()
    get_item = scoring._ImageFiles.__getitem__

    def recording(dataset, index):
        decoded_in.add(threading.current_thread().name.split("_")[0])
        return get_item(dataset, index)

    monkeypatch.setattr(scoring._ImageFiles, "__getitem__", recording)
    monkeypatch.setattr(scoring, "DataLoader", None)  # no process path
    out = tmp_path / "lanes.csv"
    summary = score(onnx_detector, inputs, out, progress=False)
    assert decoded_in == {"rd-lane"} and not _lane_threads()
    assert summary.scored == 13 and summary.errors == 1
    rows, expected = read_rows(out, "csv"), read_rows(loader_rows, "csv")
    assert [r["path"] for r in rows] == inputs.paths  # in input order
    for got, want in zip(rows, expected, strict=True):
        assert (got["error"], got["verdict"], got["width"], got["height"]) == (
            want["error"], want["verdict"], want["width"], want["height"])
        if not got["error"]:
            assert abs(float(got["score"]) - float(want["score"])) <= 1e-6
            assert float(got["seconds"]) > 0


def test_a_failure_in_a_lane_stops_after_the_rows_before_it(onnx_detector, folder, tmp_path,
                                                            monkeypatch):
    """The chunk after the first batch fails: the error reaches the caller, the first batch's
    rows are in the output, and no lane thread is left running."""
    _fails_at_call(monkeypatch, onnx_detector, "predict_chunk", 3)
    monkeypatch.setattr(onnx_detector, "threads", 1)  # one lane: the chunks run in order
    out = tmp_path / "scores.csv"
    with pytest.raises(RuntimeError, match="out of memory"):
        score(onnx_detector, collect_inputs([folder]), out, progress=False)
    assert len(read_rows(out, "csv")) == 8 and not _lane_threads()


def test_jsonl_threshold_override_and_no_overwrite(detector, folder, tmp_path):
    inputs = collect_inputs([folder / "a"])
    out = tmp_path / "scores.jsonl"
    score(detector, inputs, out, threshold=1e9, workers=0, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(inputs.paths) and {r["verdict"] for r in rows} == {"normal"}
    assert all(isinstance(r["score"], float) for r in rows)
    with pytest.raises(ScoringError, match="--resume"):
        score(detector, inputs, out, progress=False)


@pytest.mark.parametrize("output_format", ["csv", "jsonl"])
def test_resume_after_a_torn_write_loses_and_repeats_nothing(detector, folder, tmp_path,
                                                              output_format):
    inputs = collect_inputs([folder])
    full = tmp_path / f"full.{output_format}"
    score(detector, inputs, full, workers=0, progress=False)
    lines = full.read_bytes().splitlines(keepends=True)
    cut = tmp_path / f"cut.{output_format}"
    keep = 6 if output_format == "csv" else 5  # the CSV has a header line
    cut.write_bytes(b"".join(lines[:keep]) + lines[keep][:7])  # killed inside a write
    summary = score(detector, inputs, cut, resume=True, workers=1, progress=False)
    assert summary.skipped == 5 and summary.scored == 8
    resumed, expected = read_rows(cut, output_format), read_rows(full, output_format)
    assert [r["path"] for r in resumed] == inputs.paths  # none lost, none twice, in order
    assert resumed[:5] == expected[:5]  # the complete rows were kept as they were
    for got, want in zip(resumed, expected, strict=True):
        assert got["error"] == want["error"]
        if not got["error"]:
            assert abs(float(got["score"]) - float(want["score"])) <= 1e-5
    again = score(detector, inputs, cut, resume=True, progress=False)
    assert again.scored == 0 and len(read_rows(cut, output_format)) == 13


def test_resume_refuses_a_foreign_file(detector, folder, tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("name,value\nx,1\n")
    with pytest.raises(ScoringError, match="columns"):
        score(detector, collect_inputs([folder]), out, resume=True, progress=False)


def test_save_maps_defective_only_keeps_relative_paths(detector, folder, tmp_path):
    inputs = collect_inputs([folder])
    maps = tmp_path / "maps"
    threshold = float(np.median(list(_scores_one_by_one(
        detector, [p for p in inputs.paths if "broken" not in p]).values())))
    rows = []
    score(detector, inputs, None, threshold=threshold, save_maps="defective", maps_dir=maps,
          progress=False, print_row=rows.append)
    flagged = [line.split("\t")[0] for line in rows if line.endswith("\tdefective")]
    saved = sorted(p.relative_to(maps) for p in maps.rglob("*.npy"))
    assert len(flagged) == 6 and len(saved) == 6
    assert sorted(inputs.relative(p).with_suffix(".npy") for p in flagged) == saved
    fused = np.load(maps / saved[0])
    assert fused.shape == (SIZE, SIZE) and fused.dtype == np.float32
    assert all((maps / s).with_suffix(".png").exists() for s in saved)
    assert any(line.split("\t")[1] == "error" for line in rows)
    shutil.rmtree(maps)
    with pytest.raises(ScoringError, match="--out DIR"):
        score(detector, inputs, None, save_maps="all", progress=False)


def test_command_line_folder_to_csv_and_resume(checkpoint, folder, tmp_path, capsys):
    from rd.cli import main

    out = tmp_path / "rows.csv"
    argv = ["predict", "--checkpoint", str(checkpoint), str(folder), "--csv", str(out),
            "--device", "cpu", "--runtime", "torch", "--batch-size", "3", "--workers", "1"]
    assert main(argv) == 0
    _, err = capsys.readouterr()
    assert "scored 13 images (1 unreadable, 12 defective)" in err and "runtime: torch" in err
    rows = read_rows(out, "csv")
    assert [r["path"] for r in rows] == collect_inputs([folder]).paths
    assert main(argv) == 2  # never over an existing output without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert "scored 0 images" in capsys.readouterr().err and read_rows(out, "csv") == rows


def test_command_line_fails_only_when_no_image_can_be_read(checkpoint, tmp_path, capsys):
    from rd.cli import main

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["predict", "--checkpoint", str(checkpoint), str(text), "--device", "cpu",
                 "--runtime", "torch"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{text}\terror\t") and err.startswith("error: no image could be")


def test_letterbox_checkpoint_scores_each_image_at_its_own_size(tmp_path, folder):
    """A checkpoint trained with another geometry (rd.geometry) is scored image by image the
    way ``Detector.detect`` fits it, not squashed through the batched loader."""
    path = save_seeded_checkpoint(
        tmp_path / "letterbox.safetensors", SIZE,
        geometry={"mode": "letterbox", "tile_scale": 1.0, "overlap": 0.25})
    letterbox = load(path, "cpu")
    inputs = collect_inputs([folder / "a"])
    out = tmp_path / "rows.jsonl"
    score(letterbox, inputs, out, workers=1, progress=False)
    rows = read_rows(out, "jsonl")
    assert [r["path"] for r in rows] == inputs.paths
    for row in rows:
        assert row["verdict"] == "" and row["error"] is None  # no threshold stored
        assert abs(row["score"] - letterbox.detect(row["path"]).score) <= 1e-5


def test_one_score_per_image_and_model_with_the_results_store(detector, folder, tmp_path):
    """predict keeps each image's score in the store and, for an image scored before under the
    same model (by the studio), prints that score and its verdict: one verdict everywhere."""
    from rd.results import ResultsStore, image_digest

    store, model = ResultsStore(tmp_path / "results"), "ab" * 32
    inputs = collect_inputs([folder])
    score(detector, inputs, tmp_path / "first.jsonl", workers=0, progress=False, store=store,
          model=model)
    rows = {r["path"]: r for r in read_rows(tmp_path / "first.jsonl", "jsonl")
            if r["score"] is not None}
    digests = {path: image_digest(path) for path in rows}
    kept = store.scores(model, digests.values())
    assert {path: kept[digests[path]] for path in rows} == pytest.approx(
        {path: row["score"] for path, row in rows.items()})
    studio_path = sorted(rows)[0]
    store.put_scores(model, {digests[studio_path]: -1.0})  # the studio's score, below 0.0
    score(detector, inputs, tmp_path / "second.jsonl", workers=0, progress=False,
          store=store, model=model)
    again = {r["path"]: r for r in read_rows(tmp_path / "second.jsonl", "jsonl")}
    assert again[studio_path]["score"] == -1.0 and again[studio_path]["verdict"] == "normal"
    assert all(again[path]["score"] == pytest.approx(row["score"])
               for path, row in rows.items() if path != studio_path)
    with pytest.raises(ScoringError, match="SHA-256"):
        score(detector, inputs, tmp_path / "third.jsonl", store=store)
