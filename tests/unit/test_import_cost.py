"""The studio's first page lists images, draws thumbnails and shows stored scores: none of that
needs torch, whose import costs 5-15 s on a busy 2-core machine. These checks run in a fresh
interpreter, since this test process has long imported torch."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "sklearn", "scipy", "pandas")  # 5-15 s, 2 s, 0.25 s, 0.3 s


def _imported_after(statement: str) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.split()


@pytest.mark.parametrize("statement", [
    "import rd",
    "import rd.data, rd.data.sources, rd.results, rd.manifest, rd.decision",
    "import app.state, app.views.detail, app.views.images  # the Inspect page's imports",
    "import rd.data.synthetic; rd.data.synthetic.SYNTHETIC_CATEGORIES  # a built-in listing",
    "import app.sidebar; import rd.devices; rd.devices.device_choices()",
    "import rd.backbones; rd.backbones.list_backbones(); rd.backbones.get_backbone('resnet18')",
    "import rd.foreground  # each job's watcher process, and the studio's every click",
])
def test_first_page_data_path_does_not_import_torch_scipy_or_pandas(statement):
    assert _imported_after(statement) == []


def test_a_deferred_module_imports_on_first_use():
    code = ("import sys\nfrom rd.lazy import lazy_module\nndimage = lazy_module('scipy.ndimage')\n"
            "before = 'scipy.ndimage' in sys.modules\n"
            "import numpy as np\nlabels, count = ndimage.label(np.eye(3))\n"
            "print(before, 'scipy.ndimage' in sys.modules, count)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["False", "True", "3"]  # a diagonal: 3 pieces, 4-connected


def test_lazy_public_names_still_resolve():
    import rd
    import rd.data
    from rd.decision import ImageDetection

    assert rd.ImageDetection is ImageDetection
    assert rd.list_backbones() and rd.DEFAULT_BACKBONE in rd.list_backbones()
    assert rd.data.Preprocess().size > 0
    assert rd.data.ImageDataset.__module__ == "rd.data.dataset"
    with pytest.raises(AttributeError):
        rd.no_such_name  # noqa: B018


def test_device_choices_agree_with_torch():
    """Asked before torch is imported (the CUDA driver) and after (torch): the same list."""
    import torch

    from rd.devices import device_choices

    expected = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    assert device_choices() == expected
    code = "import rd.devices; print(rd.devices.device_choices())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == str(expected)


def test_resnet_weight_file_names_match_torchvision():
    import torchvision.models

    from rd.backbones import get_backbone

    for name in ("resnet18", "resnet50", "wide_resnet50_2"):
        url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        assert get_backbone(name).weights_file == url.rsplit("/", 1)[-1]


def test_device_choices_while_another_thread_imports_torch(monkeypatch):
    """The sidebar asked a half-imported torch (a model loading in the background) and failed
    with "partially initialized module 'torch' has no attribute 'cuda'"."""
    import types

    from rd.devices import device_choices

    half = types.ModuleType("torch")  # what sys.modules holds while torch/__init__.py runs
    monkeypatch.setitem(sys.modules, "torch", half)
    assert device_choices()[0] == "cpu"
    half.__spec__ = types.SimpleNamespace(_initializing=True)
    assert device_choices()[0] == "cpu"
