"""Malformed inputs of every kind end in one clear line, never a traceback (issue 13).

Generated from a fixed seed: images, masks, checkpoints and their metadata, manifests, job
folders and archives -- each broken in a different way -- are given to the command line (run
in-process, ``rd.cli.main``) and to the loaders the app calls. Each case must end in exit code
2 with exactly one ``error: ...`` line (a loader: an ``RDError``), or be accepted / skipped with
a reason; never an unexpected exception, never a hang (each case has a time limit), and never a
change to any file outside the case's own output (a sentinel folder and the inputs are
compared byte for byte).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rd.errors import RDError

SEED = 13
CASE_SECONDS = 20
RNG = random.Random(SEED)


class Hang(BaseException):
    """A case ran past its time limit (a BaseException: no handler may swallow it)."""


@dataclass
class Case:
    kind: str
    name: str
    run: Callable[[Path], str]  # does the case in its folder; returns how it ended


# ------------------------------------------------------------------------------- helpers


def _cli(*argv: object) -> str:
    """Run the command line in-process; one-line error or success, else the test fails."""
    from rd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    lines = err.getvalue().strip().splitlines()
    if code == 0:
        return "accepted"
    assert code == 2, f"exit {code}: {err.getvalue()[-2000:]}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    return errors[0]


def _loader(call: Callable[[], object]) -> str:
    """Call a library loader: a result or an RDError with one line; anything else fails."""
    try:
        call()
    except RDError as error:
        message = str(error)
        assert message.strip() and "\n" not in message.strip(), repr(message)
        return f"refused: {message}"
    return "accepted"


def _png(width: int = 16, height: int = 16, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(SEED).integers(0, 255, (height, width, 3), np.uint8)
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(
        b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buffer, format=format, **options)
    return buffer.getvalue()


def _flip(data: bytes, count: int) -> bytes:
    mutable = bytearray(data)
    for _ in range(count):
        position = RNG.randrange(8, len(mutable))  # past the signature: still "an image"
        mutable[position] ^= 1 << RNG.randrange(8)
    return bytes(mutable)


def _image_bytes() -> list[tuple[str, str, bytes]]:
    """(name, suffix, bytes) of broken or unusual image files."""
    png, jpeg = _png(), _encoded("JPEG")
    cases = [("empty", ".png", b""), ("text", ".png", b"not an image\n"),
             ("html", ".jpg", b"<html><body>hi</body></html>"),
             ("png-signature-only", ".png", png[:8]),
             ("huge-claimed", ".png", _png_claiming(100_000, 100_000)),
             ("tall-claimed", ".png", _png_claiming(1, 200_000_000)),
             ("zero-width", ".png", _png_claiming(0, 16)),
             ("79-megapixels", ".png", _png_claiming(10_000, 7_900)),
             ("jpeg-truncated", ".jpg", jpeg[: len(jpeg) // 3]),
             ("gif", ".png", _encoded("GIF")), ("bmp-as-png", ".png", _encoded("BMP")),
             ("tiff", ".tif", _encoded("TIFF")), ("webp", ".webp", _encoded("WEBP")),
             ("cmyk-jpeg", ".jpg", _cmyk_jpeg()), ("png-1x1", ".png", _png(1, 1)),
             ("png-grey-alpha", ".png", _png(16, 16, "LA")),
             ("png-palette", ".png", _png(16, 16, "P")),
             ("float-tiff-nan", ".tif", _float_tiff(np.nan)),
             ("float-tiff-range", ".tif", _float_tiff(7.0))]
    cases += [(f"random-{n}", ".png", RNG.randbytes(n)) for n in (1, 7, 100, 5000)]
    cases += [(f"png-cut-{n}", ".png", png[:n]) for n in (16, 33, 50, len(png) - 12)]
    cases += [(f"png-flip-{i}", ".png", _flip(png, 1 + i % 3)) for i in range(30)]
    cases += [(f"jpeg-flip-{i}", ".jpg", _flip(jpeg, 4 + i)) for i in range(8)]
    return cases


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (10, 20, 30, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _float_tiff(value: float) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid random-student checkpoint (64 px) and a valid image, read only by the cases."""
    from rd.checkpoints import save_checkpoint
    from rd.data import Preprocess
    from rd.model import build_model

    folder = tmp_path_factory.mktemp("fuzz-base")
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0")
    checkpoint = folder / "valid.safetensors"
    save_checkpoint(model, checkpoint, {"preprocess": Preprocess(64).to_dict(),
                                        "fusion": "sum", "category": "widget"})
    image = folder / "image.png"
    image.write_bytes(_png(64, 64))
    return folder, checkpoint, image


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if not p.is_fifo()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A fresh data home, jobs folder and a sentinel folder no case may touch."""
    monkeypatch.setenv("RD_HOME", str(tmp_path / "home"))
    from rd import jobs

    monkeypatch.setenv(jobs.ROOT_ENV, str(tmp_path / "jobs"))
    for variable in jobs.SLOTS_ENV.values():  # queued jobs never start: nothing trains
        monkeypatch.setenv(variable, "0")
    monkeypatch.setenv("RD_OFFLINE", "1")
    sentinel = tmp_path / "elsewhere"
    (sentinel / "keep").mkdir(parents=True)
    (sentinel / "keep" / "notes.txt").write_text("mine")
    (sentinel / "model.safetensors").write_bytes(b"precious")
    return tmp_path, sentinel


def _timed(run: Callable[[], str]) -> str:
    def expire(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(CASE_SECONDS)
    try:
        return run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run_cases(cases: list[Case], world) -> dict[str, str]:
    tmp_path, sentinel = world
    before = _tree(sentinel)
    outcomes, failures = {}, []
    for index, case in enumerate(cases):
        label = f"{case.kind}/{case.name}"
        folder = tmp_path / f"{case.kind}-{index}"
        folder.mkdir()
        try:
            outcomes[label] = _timed(lambda c=case, f=folder: c.run(f))
        except Hang:
            failures.append(f"{label}: no answer within {CASE_SECONDS} s")
        except AssertionError as error:
            failures.append(f"{label}: {str(error)[:600]}")
        except Exception as error:  # any other exception is the bug this test looks for
            failures.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
        if _tree(sentinel) != before:
            failures.append(f"{label} changed {sentinel}")
            before = _tree(sentinel)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    return outcomes


# --------------------------------------------------------------------------------- images


def _image_case(name: str, suffix: str, data: bytes) -> Case:
    def run(folder: Path) -> str:
        normal = folder / "normal"
        normal.mkdir()
        path = normal / f"{name}{suffix}"
        path.write_bytes(data)
        upload = _loader(lambda: __import__("rd.data", fromlist=["x"]).read_image_bytes(
            data, path.name))
        from rd.data import read_image

        direct = _loader(lambda: read_image(path))
        # the teacher weights do not exist: an image that reads fine fails there, before any
        # training, so every case answers in milliseconds
        line = _cli("train", "--normal", normal, "--out", folder / "m.safetensors",
                    "--teacher-weights", folder / "missing.pth", "--image-size", "64",
                    "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--quiet")
        if direct.startswith("refused"):
            assert path.name in line, (direct, line)
        else:
            assert "missing.pth" in line, line
        assert path.read_bytes() == data
        return f"{upload} | {line}"

    return Case("image", name, run)


def _special_image_cases() -> list[Case]:
    """Things in an image folder that are not image files: each is skipped with a reason."""
    def fifo(folder: Path) -> str:
        normal = folder / "normal"
        normal.mkdir()
        os.mkfifo(normal / "pipe.png")  # opening it would block forever
        return _cli("train", "--normal", normal, "--out", folder / "m.safetensors",
                    "--device", "cpu", "--quiet")

    def directory(folder: Path) -> str:
        (folder / "normal" / "dir.png").mkdir(parents=True)
        return _cli("train", "--normal", folder / "normal", "--out", folder / "m.safetensors",
                    "--device", "cpu", "--quiet")

    def dangling(folder: Path) -> str:
        (folder / "normal").mkdir()
        (folder / "normal" / "gone.png").symlink_to(folder / "nowhere.png")
        return _cli("train", "--normal", folder / "normal", "--out", folder / "m.safetensors",
                    "--device", "cpu", "--quiet")

    return [Case("image", "fifo", fifo), Case("image", "folder-named-png", directory),
            Case("image", "dangling-link", dangling)]


# ---------------------------------------------------------------------------------- masks


def _mask_cases(base) -> list[Case]:
    _, _, image = base

    def make(name: str, data: bytes) -> Case:
        def run(folder: Path) -> str:
            from rd.data import ImageDataset, Preprocess, Sample, read_mask

            mask = folder / f"{name}_mask.png"
            mask.write_bytes(data)
            first = _loader(lambda: read_mask(mask))
            sample = Sample(image, 1, "crack", mask)
            second = _loader(lambda: ImageDataset([sample], Preprocess(64)).check())
            assert mask.read_bytes() == data
            return f"{first} | {second}"

        return Case("mask", name, run)

    grey = io.BytesIO()
    Image.new("L", (64, 64), 255).save(grey, format="PNG")
    masks = [("empty", b""), ("text", b"mask"), ("wrong-size", _png(32, 32, "L")),
             ("rgb", _png(64, 64)), ("huge-claimed", _png_claiming(90_000, 90_000)),
             ("one-pixel", _png(1, 1, "L")), ("float-nan", _float_tiff(np.nan)),
             ("valid", grey.getvalue())]
    masks += [(f"random-{n}", RNG.randbytes(n)) for n in (3, 64, 999)]
    masks += [(f"cut-{n}", grey.getvalue()[:n]) for n in (10, 40, 70)]
    masks += [(f"flip-{i}", _flip(grey.getvalue(), 1 + i)) for i in range(12)]
    return [make(name, data) for name, data in masks]


# ---------------------------------------------------------------------------- checkpoints


def _with_metadata(base, change: Callable[[dict], object]) -> Callable[[Path], Path]:
    """A copy of the valid checkpoint whose rd metadata ``change`` edited (in place)."""
    def make(folder: Path) -> Path:
        from safetensors import safe_open

        _, valid, _ = base
        with safe_open(str(valid), framework="pt") as handle:
            meta = json.loads(handle.metadata()["rd"])
        result = change(meta)
        text = result if isinstance(result, str) else json.dumps(meta)
        path = folder / "model.safetensors"
        save_file(load_file(str(valid)), str(path), metadata={"rd": text})
        return path

    return make


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        *parents, last = path.split(".")
        target = meta
        for key in parents:
            target = target.setdefault(key, {}) if isinstance(target, dict) else target
        target[last] = value

    return change


def _deep(levels: int) -> Callable[[dict], str]:
    return lambda meta: "[" * levels + "]" * levels


def _bytes_file(data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "model.safetensors"
        path.write_bytes(data)
        return path

    return make


def _tensors_changed(base, change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        from safetensors import safe_open

        _, valid, _ = base
        with safe_open(str(valid), framework="pt") as handle:
            header = handle.metadata()
        tensors = load_file(str(valid))
        change(tensors)
        path = folder / "model.safetensors"
        save_file(tensors, str(path), metadata=header)
        return path

    return make


def _checkpoint_cases(base) -> list[Case]:
    _, valid, image = base
    raw = valid.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    files: list[tuple[str, Callable[[Path], Path], bool]] = [  # (name, maker, loads model)
        ("empty", _bytes_file(b""), False), ("text", _bytes_file(b"hello"), False),
        ("random", _bytes_file(RNG.randbytes(4096)), False),
        ("huge-header-length", _bytes_file(struct.pack("<Q", 1 << 60) + b"{}"), False),
        ("header-not-json", _bytes_file(struct.pack("<Q", 8) + b"{nope!!}"), False),
        ("pickle", _bytes_file(b"\x80\x04\x95" + RNG.randbytes(64)), False),
        ("no-rd-metadata", _bytes_file(_safetensors_without_rd()), False),
        ("rd-not-json", _with_metadata(base, lambda meta: "{not json"), False),
        ("rd-a-list", _with_metadata(base, lambda meta: "[1, 2, 3]"), False),
        ("rd-deep-nesting", _with_metadata(base, _deep(100_000)), False),
        ("rd-deep-object", _with_metadata(base, lambda m: '{"a":' * 50_000 + "1" + "}" * 50_000),
         False),
        ("format-other", _with_metadata(base, _set("format", "other")), False),
        ("format-version-99", _with_metadata(base, _set("format_version", 99)), False),
        ("format-version-string", _with_metadata(base, _set("format_version", "1")), False),
        ("size-list", _with_metadata(base, _set("preprocess.size", [1, 2, 3])), False),
        ("size-1e9", _with_metadata(base, _set("preprocess.size", 1e9)), False),
        ("size-huge-int", _with_metadata(base, _set("preprocess.size", 10 ** 9)), False),
        ("size-string", _with_metadata(base, _set("preprocess.size", "64")), False),
        ("size-negative", _with_metadata(base, _set("preprocess.size", -64)), False),
        ("size-100", _with_metadata(base, _set("preprocess.size", 100)), False),
        ("mean-short", _with_metadata(base, _set("preprocess.mean", [0.5])), False),
        ("std-zero", _with_metadata(base, _set("preprocess.std", [0, 0, 0])), False),
        ("std-strings", _with_metadata(base, _set("preprocess.std", ["a", "b", "c"])), False),
        ("preprocess-null", _with_metadata(base, _set("preprocess", None)), False),
        ("backbone-unknown", _with_metadata(base, _set("backbone", "banana")), False),
        ("backbone-list", _with_metadata(base, _set("backbone", ["resnet18"])), False),
        ("fusion-unknown", _with_metadata(base, _set("fusion", "median")), False),
        ("metrics-list", _with_metadata(base, _set("metrics", [1, 2])), False),
        ("threshold-string", _with_metadata(base, _set("metrics.thresholds", {"f1": "high"})),
         False),
        ("threshold-nan", _with_metadata(base, _set("metrics.thresholds", {"f1": "NaN"})), False),
        ("normal-scores-string", _with_metadata(base, _set("normal_scores", "many")), False),
        ("category-escape", _with_metadata(base, _set("category", "../../..")), False),
        ("teacher-weights-other", _with_metadata(base, _set("teacher_weights", "x")), True),
        ("missing-tensor", _tensors_changed(base, lambda t: t.pop(next(iter(t)))), True),
        ("wrong-shape", _tensors_changed(base, _reshape_first), True),
        ("nan-weights", _tensors_changed(base, _nan_all), True),
        ("extra-tensor", _tensors_changed(base, lambda t: t.__setitem__("x", torch.ones(1))),
         True),
        ("truncated-header", _bytes_file(raw[: 8 + header // 2]), False),
        ("truncated-tensors", _bytes_file(raw[: len(raw) // 2]), False),
        ("truncated-tail", _bytes_file(raw[:-7]), False),
    ]
    cases = []
    for name, make, loads in files:
        def run(folder: Path, make=make, loads=loads) -> str:
            from rd.checkpoints import read_metadata

            path = make(folder)
            data = path.read_bytes()
            metadata = _loader(lambda: read_metadata(path))  # the app's model list reads it
            info = _cli("info", path)
            outcome = f"{metadata} | {info}"
            if loads or metadata == "accepted":
                predicted = _cli("predict", "--checkpoint", path, image, "--device", "cpu")
                assert "nan" not in predicted.lower() or predicted.startswith("error:")
                outcome += f" | {predicted}"
            assert path.read_bytes() == data
            return outcome

        cases.append(Case("checkpoint", name, run))
    return cases


def _safetensors_without_rd() -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(2)}, metadata={"other": "1"})


def _reshape_first(tensors: dict) -> None:
    key = next(k for k, v in tensors.items() if v.ndim >= 2)
    tensors[key] = torch.zeros(3, 3)


def _nan_all(tensors: dict) -> None:
    for key, value in tensors.items():
        if value.is_floating_point():
            tensors[key] = torch.full_like(value, float("nan"))


# ------------------------------------------------------------------------------ manifests


def _manifest_cases(base) -> list[Case]:
    _, valid, _ = base
    entry = {"dataset": "mine", "category": "widget", "backbone": "efficientnet_lite0",
             "file": "mine/widget/efficientnet_lite0.safetensors", "sha256": "0" * 64}
    payloads: list[tuple[str, str]] = [
        ("empty", ""), ("not-json", "{models: nope"), ("a-list", "[]"), ("null", "null"),
        ("models-object", json.dumps({"models": {}})),
        ("models-string", json.dumps({"models": "all"})),
        ("entry-number", json.dumps({"models": [1]})),
        ("deep", '{"models":' + "[" * 100_000 + "]" * 100_000 + "}"),
    ]
    for field, value in [("file", "/etc/passwd"), ("file", "../../outside.safetensors"),
                         ("file", "~/x.safetensors"), ("file", 5), ("file", ""),
                         ("dataset", "../.."), ("dataset", "/abs"), ("category", ["a"]),
                         ("backbone", None), ("sha256", 1), ("report", []),
                         ("epochs", "ten"), ("unknown_field", 1), ("name", {"x": 1})]:
        payloads.append((f"{field}={value!r}"[:40], json.dumps({"models": [{**entry,
                                                                             field: value}]})))

    def make(name: str, text: str) -> Case:
        def run(folder: Path) -> str:
            from rd.manifest import read_manifest

            manifest = folder / "models" / "manifest.json"
            manifest.parent.mkdir()
            manifest.write_text(text)
            read = _loader(lambda: read_manifest(manifest))
            line = _cli("register", valid, "--dataset", "fuzz", "--category", "widget",
                        "--manifest", manifest)
            if read.startswith("refused"):
                assert manifest.read_text() == text and line.startswith("error:"), line
            return f"{read} | {line}"

        return Case("manifest", name, run)

    return [make(name, text) for name, text in payloads]


# ------------------------------------------------------------------------------- archives


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buffer.getvalue()


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "",
            size: int | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.REGTYPE:
        info.size = len(data) if size is None else size
        return info, data
    return info, None


def _archive_cases() -> list[Case]:
    escape = "../../elsewhere/keep/notes.txt"
    good = [_member("train/a/0.png", _png(8, 8)), _member("test/a/0.png", _png(8, 8))]
    sets = {
        "escape-dotdot": [*good, _member(escape, b"overwritten")],
        "escape-absolute": [_member("/tmp/rd-fuzz-absolute.txt")],
        "symlink-out": [_member("train/a/link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")],
        "symlink-dotdot": [_member("train/link", kind=tarfile.SYMTYPE, link="../../elsewhere")],
        "hardlink-out": [_member("train/a/hard.png", kind=tarfile.LNKTYPE, link=escape)],
        "device": [_member("train/a/tty.png", kind=tarfile.CHRTYPE)],
        "fifo": [_member("train/a/fifo.png", kind=tarfile.FIFOTYPE)],
        "zeros-bomb": [_member("train/a/zeros.png", bytes(12 << 20))],  # over the 8 MB floor
        "file-as-train": [_member("train", b"not a folder")],
        "only-train": good[:1],
        "one-class": good,
        "broken-images": [_member("train/a/0.png", b"junk"), _member("test/a/0.png", b"junk"),
                          _member("train/b/0.png", b"junk"), _member("test/b/0.png", b"junk")],
        "empty": [],
    }
    cases = []
    for name, members in sets.items():
        for mode, suffix in (("w:gz", ".tar.gz"), ("w:xz", ".tar.xz")):
            data = _tar(members, mode)
            cases.append(_archive_case(f"{name}{suffix}", suffix, data))
    for name, data in [("random", RNG.randbytes(3000)), ("truncated", _tar(good, "w:gz")[:60]),
                       ("zip", b"PK\x03\x04" + RNG.randbytes(100)), ("zero-bytes", b"")]:
        cases.append(_archive_case(f"{name}.tar.gz", ".tar.gz", data))
        cases.append(_archive_case(f"{name}.tar.xz", ".tar.xz", data))
    return cases


def _archive_case(name: str, suffix: str, data: bytes) -> Case:
    def run(folder: Path) -> str:
        archive = folder / f"bottle{suffix}"
        archive.write_bytes(data)
        if suffix == ".tar.gz":  # novelty reads class folders from a .tar.gz
            line = _cli("novelty", "--dataset", "folders", "--root", archive, "--out",
                        folder / "out", "--epochs", "1", "--image-size", "32", "--batch-size",
                        "2", "--device", "cpu", "--quiet")
        else:  # download unpacks an MVTec archive given by hand
            line = _cli("download", "mvtec", "--archive", archive, "--root", folder / "root",
                        "--quiet")
        assert archive.read_bytes() == data
        assert not Path("/tmp/rd-fuzz-absolute.txt").exists()
        return line

    return Case("archive", name, run)


# ----------------------------------------------------------------------------- job folders


def _job_cases(tiny_mvtec) -> list[Case]:
    """A jobs folder holding one good queued job and one damaged folder."""
    statuses = ["{}", "[]", "null", '"queued"', "{", '{"state": "queued"}',
                '{"state": "running"}', '{"state": "running", "pid": "12"}',
                '{"state": "running", "pid": 999999999, "process": "x"}',
                '{"state": "exploded"}', '{"state": ["queued"]}', '{"state": "queued", '
                '"queued_at": "soon"}', '{"state": "failed", "attempts": "many"}',
                "[" * 50_000 + "]" * 50_000, '{"state": "queued", "queued_at": 1e999}']
    specs = ["{}", "[]", "{", '{"submitted": "yesterday"}', '{"id": "x", "epochs": -1}',
             "[" * 50_000 + "]" * 50_000]
    damages: list[tuple[str, Callable[[Path], None]]] = []
    for index, text in enumerate(statuses):
        damages.append((f"status-{index}", lambda f, t=text: (f / "status.json").write_text(t)))
    for index, text in enumerate(specs):
        damages.append((f"spec-{index}", lambda f, t=text: (f / "spec.json").write_text(t)))
    damages += [
        ("status-binary", lambda f: (f / "status.json").write_bytes(RNG.randbytes(300))),
        ("spec-missing", lambda f: (f / "spec.json").unlink()),
        ("status-a-folder", lambda f: ((f / "status.json").unlink(),
                                       (f / "status.json").mkdir())),
        ("log-binary", lambda f: (f / "model.log.jsonl").write_bytes(RNG.randbytes(500))),
        ("log-odd-records", lambda f: (f / "model.log.jsonl").write_text(
            '[1]\n{"epoch": "x", "loss": "y", "seconds": 1}\n{"epoch": 1}\n')),
        ("job-log-a-folder", lambda f: (f / "job.log").mkdir()),
        ("job-log-a-fifo", lambda f: os.mkfifo(f / "job.log")),
        ("empty-folder", lambda f: [p.unlink() for p in f.iterdir()]),
    ]

    def make(name: str, damage: Callable[[Path], None]) -> Case:
        def run(folder: Path) -> str:
            from rd import jobs
            from rd.training import TrainConfig

            root = folder / "jobs"
            config = TrainConfig(image_size=64, batch_size=4, epochs=1, device="cpu")
            good = jobs.submit(config, tiny_mvtec.root, tiny_mvtec.category, name="good",
                               root=root)
            bad = jobs.submit(config, tiny_mvtec.root, tiny_mvtec.category, name="bad",
                              root=root)
            damage(bad.folder)
            listed = jobs.list_jobs(root)  # what the Train page reads
            assert good.id in {job.id for job in listed}, "a damaged job hid another"
            for job in listed:  # what the page shows of each
                job.progress(), job.metrics(), job.log_tail(), job.command
            line = _cli("jobs", "list", "--root", root)
            shown = _cli("jobs", "show", bad.id, "--root", root)
            assert good.id in [j.id for j in jobs.schedule(root)]
            return f"{line} | {shown}"

        return Case("job", name, run)

    return [make(name, damage) for name, damage in damages]


# --------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def all_cases(base, tiny_mvtec) -> list[Case]:
    cases = [_image_case(*case) for case in _image_bytes()]
    cases += _special_image_cases() + _mask_cases(base) + _checkpoint_cases(base)
    cases += _manifest_cases(base) + _archive_cases() + _job_cases(tiny_mvtec)
    return cases


def test_at_least_two_hundred_cases(all_cases):
    assert len(all_cases) >= 200


@pytest.mark.parametrize("kind", ["image", "mask", "checkpoint", "manifest", "archive",
                                  "job"])
def test_malformed_inputs_end_in_one_line(all_cases, world, kind):
    cases = [case for case in all_cases if case.kind == kind]
    outcomes = _run_cases(cases, world)
    assert len(outcomes) == len(cases)
