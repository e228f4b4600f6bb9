"""Shared fixtures: a generated tiny MVTec-format dataset and the optional real data subset."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see rd/__init__.py
# Commands and the app run the torch runtime in tests: the default (auto) would export every
# tiny model to ONNX first (tens of seconds each). tests/unit/test_runtime.py covers that path.
os.environ.setdefault("RD_RUNTIME", "torch")
# No test writes the developer's own data home (models, results store, built-in data): a test
# that needs a particular one sets RD_HOME itself.
os.environ.setdefault("RD_HOME", tempfile.mkdtemp(prefix="rd-tests-home-"))

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rd.files import proc_stat

SHARED_MVTEC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_subset"


@dataclass(frozen=True)
class FakeMVTec:
    """Where make_fake_mvtec wrote its dataset and what it holds."""

    root: Path
    category: str = "widget"
    n_train: int = 12
    n_good: int = 4
    n_defect: int = 3
    size: int = 64


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour pattern (coarse noise upsampled), kept mid-grey so defects stand out."""
    coarse = rng.uniform(70, 180, size=(8, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _normal(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = base.astype(np.float64) + rng.normal(0.0, 4.0, size=base.shape)
    return np.clip(noisy, 40, 215).astype(np.uint8)


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    """A bright 2-pixel-thick horizontal line."""
    mask = np.zeros((size, size), dtype=bool)
    row = int(rng.integers(size // 4, 3 * size // 4))
    start = int(rng.integers(2, size // 4))
    mask[row : row + 2, start : start + size // 2] = True
    return mask


def _hole(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark disc."""
    radius = max(2, size // 10)
    cy, cx = (int(v) for v in rng.integers(radius + 1, size - radius - 1, size=2))
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def make_fake_mvtec(
    root: Path,
    category: str = "widget",
    n_train: int = 12,
    n_good: int = 4,
    n_defect: int = 3,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a deterministic MVTec-format category under root and return root.

    Defects: test/scratch (bright line, masks saved in mode "1") and test/hole (dark disc, masks
    saved as L 0/255); each ground_truth/<defect>/<stem>_mask.png covers exactly its defect.
    """
    rng = np.random.default_rng(seed)
    base = _texture(rng, size)
    folder = Path(root) / category

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(_normal(base, rng), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(_normal(base, rng), folder / "test" / "good" / f"{i:03d}.png")
    for defect, draw, value, mask_mode in (
        ("scratch", _scratch, 255, "1"),
        ("hole", _hole, 0, "L"),
    ):
        for i in range(n_defect):
            image = _normal(base, rng)
            mask = draw(rng, size)
            image[mask] = value
            save(image, folder / "test" / defect / f"{i:03d}.png")
            mask_path = folder / "ground_truth" / defect / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).convert(mask_mode).save(mask_path)
    return Path(root)


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> FakeMVTec:
    """A generated 64×64 MVTec-format dataset with one category ("widget"), shared read-only."""
    return FakeMVTec(make_fake_mvtec(tmp_path_factory.mktemp("tiny_mvtec")))


@pytest.fixture(scope="session")
def shared_mvtec() -> Path:
    """The real MVTec subset in ../shared/data, or a skip where it is absent."""
    if not SHARED_MVTEC.is_dir():
        pytest.skip("../shared/data/mvtec_subset not present")
    return SHARED_MVTEC


@dataclass(frozen=True)
class Studio:
    """A user data folder for the app: data sources with registered tiny models."""

    home: Path
    dataset: str  # source name of the generated data, with masks
    bare_dataset: str  # the same images without ground_truth/, as another source
    category: str
    root: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def studio_home(tmp_path_factory: pytest.TempPathFactory) -> Studio:
    """Generated data and a 1-epoch 64 px efficientnet_lite0 student registered in a user
    manifest (also under the name resnet18, so backbones can be compared: only lite0's weights
    are available offline), the data roots remembered in the app's settings; under a fresh
    RD_HOME, where the built-in dataset is generated on first use."""
    import json
    import shutil

    from rd.data import MVTecCategory
    from rd.manifest import register
    from rd.training import TrainConfig, train

    base = tmp_path_factory.mktemp("studio")
    home, root = base / "home", base / "fakeparts"
    make_fake_mvtec(root, category="widget")
    bare = shutil.copytree(root, base / "fakeparts_nomasks")
    shutil.rmtree(bare / "widget" / "ground_truth")
    models = home / "models"
    checkpoint = models / "fakeparts" / "widget.safetensors"
    train(MVTecCategory(root, "widget").train_samples(),
          TrainConfig(epochs=1, image_size=64, batch_size=4, device="cpu"), checkpoint,
          {"category": "widget"}, progress=False)
    manifest = models / "manifest.json"
    register(manifest, checkpoint, "fakeparts", "widget", "efficientnet_lite0")
    twin = shutil.copy(checkpoint, models / "fakeparts" / "widget-twin.safetensors")
    register(manifest, twin, "fakeparts", "widget", "resnet18")
    copy = shutil.copy(checkpoint, models / "fakeparts" / "widget-bare.safetensors")
    register(manifest, copy, "fakeparts_nomasks", "widget", "efficientnet_lite0")
    (home / "app_settings.json").write_text(json.dumps(
        {"mvtec_roots": {"fakeparts": str(root), "fakeparts_nomasks": str(bare)}}))
    return Studio(home, "fakeparts", "fakeparts_nomasks", "widget", root, checkpoint)


@pytest.fixture
def studio(studio_home: Studio, monkeypatch: pytest.MonkeyPatch) -> Studio:
    """``studio_home`` as the current user's data folder (RD_HOME) for one test."""
    monkeypatch.setenv("RD_HOME", str(studio_home.home))
    return studio_home


@pytest.fixture
def jobs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh jobs folder (job processes inherit the environment); any job still running at
    the end of the test is killed with its process group."""
    import contextlib
    import signal

    from rd import jobs

    monkeypatch.setenv(jobs.ROOT_ENV, str(tmp_path / "jobs"))
    yield tmp_path / "jobs"
    for job in jobs.list_jobs():
        if job.state == "running":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.status["pid"], signal.SIGKILL)


def save_seeded_checkpoint(path: Path, size: int, threshold: float | None = None, seed: int = 0,
                           **metadata: object) -> Path:
    """An efficientnet_lite0 checkpoint with a seeded (untrained) student at ``size`` px, an
    optional F1 threshold and extra metadata: for tests of inference plumbing, where training
    would only cost time."""
    import torch

    from rd.checkpoints import save_checkpoint
    from rd.data import HALF, Preprocess
    from rd.model import build_model

    torch.manual_seed(seed)
    meta = {"preprocess": Preprocess(size, HALF, HALF).to_dict(), "fusion": "sum", **metadata}
    if threshold is not None:
        meta |= {"category": "tiny", "metrics": {"thresholds": {"f1": threshold}}}
    save_checkpoint(build_model("efficientnet_lite0"), path, meta)
    return path


def scheduling_policy(pid: int) -> int:
    """A Linux process's scheduling policy (field 41 of /proc/PID/stat; os.SCHED_IDLE is 5)."""
    return int(proc_stat(pid)[38])


def process_state(pid: int) -> str:
    """A Linux process's state letter ("T": stopped, e.g. paused by rd.foreground)."""
    return proc_stat(pid)[0]
