"""``torchrun --nproc-per-node 2 -m rd predict``: two CPU processes (gloo) share the images and
write one merged output in input order, equal to a single process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rd.checkpoints import save_checkpoint
from rd.data import HALF, Preprocess
from rd.model import build_model
from rd.scoring import collect_inputs, read_rows

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    checkpoint = folder / "tiny.safetensors"
    save_checkpoint(build_model("efficientnet_lite0"), checkpoint,
                    {"preprocess": Preprocess(SIZE, HALF, HALF).to_dict(), "fusion": "sum",
                     "metrics": {"thresholds": {"f1": 2.0}}})
    rng = np.random.default_rng(0)
    for index in range(9):
        sub = folder / "images" / f"part{index % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(
            sub / f"{index}.png")
    (folder / "images" / "part0" / "broken.png").write_bytes(b"no image")
    return checkpoint, folder / "images"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def _predict(checkpoint, images, out, nproc: int, *extra: str,
             program: tuple[str, ...] = ("-m", "rd")) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rd", "predict"]
    if nproc > 1:
        command = [*TORCHRUN, str(nproc), *program, "predict"]
    env = {**os.environ, "RD_RUNTIME": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, "--checkpoint", str(checkpoint), str(images), "--jsonl",
                           str(out), "--device", "cpu", "--batch-size", "2", "--workers", "0",
                           *extra], env=env, capture_output=True, text=True, timeout=600)


def test_two_ranks_write_one_ordered_output_equal_to_one_process(setup, tmp_path):
    checkpoint, images = setup
    single, merged = tmp_path / "single.jsonl", tmp_path / "merged.jsonl"
    assert _predict(checkpoint, images, single, 1).returncode == 0
    result = _predict(checkpoint, images, merged, 2)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = read_rows(single, "jsonl"), read_rows(merged, "jsonl")
    assert [r["path"] for r in got] == collect_inputs([images]).paths == [
        r["path"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["error"] == b["error"] and a["verdict"] == b["verdict"]
        if a["score"] is not None:
            assert abs(a["score"] - b["score"]) <= 1e-5
    assert not list(tmp_path.glob(".merged.jsonl.part*"))  # parts merged and removed
    assert "scored 10 images (1 unreadable" in result.stderr


def test_two_ranks_resume_a_partial_output(setup, tmp_path):
    checkpoint, images = setup
    full = tmp_path / "full.jsonl"
    assert _predict(checkpoint, images, full, 1).returncode == 0
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:4]) + lines[4][:10])  # torn last line
    result = _predict(checkpoint, images, partial, 2, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["path"] for r in read_rows(partial, "jsonl")] == [
        r["path"] for r in read_rows(full, "jsonl")]


def test_each_rank_leaves_the_process_group_before_exiting(setup, tmp_path):
    """A gloo group left to interpreter shutdown can abort a rank (SIGABRT), failing a run
    whose rows were all written: ``predict`` leaves it itself, also after an error."""
    checkpoint, images = setup
    program = tmp_path / "predict_then_report.py"
    program.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "import torch.distributed as dist\n"
        "from rd.cli import main\n"
        "code = main(sys.argv[1:])\n"
        # one write per rank: the ranks share stdout, and print can write the text and its
        # newline apart (seen: two ranks' lines merged into one, then an empty line)
        "line = f'rank {os.environ[\"RANK\"]} code {code} joined {dist.is_initialized()}\\n'\n"
        "os.write(1, line.encode())\n")
    result = _predict(checkpoint, images, tmp_path / "rows.jsonl", 2, program=(str(program),))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(result.stdout.splitlines()) == [
        "rank 0 code 0 joined False", "rank 1 code 0 joined False"]
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.png", "b.png"):
        (unreadable / name).write_bytes(b"no image")
    failed = _predict(checkpoint, unreadable, tmp_path / "none.jsonl", 2,
                      program=(str(program),))
    assert sorted(failed.stdout.splitlines()) == [  # "no image could be read", after joining
        "rank 0 code 2 joined False", "rank 1 code 2 joined False"]
