"""Manifests: where trained checkpoints are listed, so the app and the CLI find them.

Two manifests are read: the project's own ``checkpoints/manifest.json`` (students shipped for the
built-in dataset: read-only) and the user's (``<data home>/models/manifest.json``, where training
jobs register theirs). Each entry names its file relative to the manifest, with the file's
SHA-256: a missing or modified file is reported, never used.

Models are versioned: every registration is a new entry with its own id, name and date, so a
quick training run never replaces a shipped model or an earlier one. Registration never
overwrites a file or an entry, and every name that becomes part of a path is checked before
anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from rd.errors import RDError
from rd.files import atomic_write, data_home, file_sha256

MANIFEST_VERSION = 2
PROJECT_MANIFEST = Path(__file__).resolve().parents[1] / "checkpoints" / "manifest.json"
SHIPPED_PREFIX = "shipped:"
USER_PREFIX = "user:"
MAX_NAME = 60
# Dataset, category and backbone names become folder names: one safe path component each.
_SAFE_NAME = re.compile(r"^[\w][\w.+-]{0,99}$")


class ManifestError(RDError, ValueError):
    """A manifest or one of its files cannot be used."""


def validate_name(value: Any, what: str) -> str:
    """``value`` if it can be one folder name (no separators, no ``..``, not absolute), else a
    ManifestError naming ``what``."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise ManifestError(f"invalid {what} {value!r}: use letters, digits, '_', '-', '.' or "
                            "'+' (one folder name, no '/', no '..')")
    return value


def _validate_file(value: Any, manifest: Path) -> str:
    """A manifest's file entry: a relative POSIX path below the manifest, without ``..``."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{manifest}: an entry has no file")
    path = PurePosixPath(value)
    if path.is_absolute() or "\\" in value or ".." in path.parts or value.startswith("~"):
        raise ManifestError(f"{manifest}: the file {value!r} must be a path relative to the "
                            "manifest's folder, without '..'")
    return path.as_posix()


@dataclass(frozen=True)
class ModelEntry:
    """One registered checkpoint: which data it learned, how and when it was made."""

    dataset: str  # "builtin", "mvtec_subset", or a user's dataset name
    category: str
    backbone: str
    file: str  # relative to the manifest's folder
    sha256: str
    command: str = ""
    report: dict[str, Any] = field(default_factory=dict)  # headline metrics
    id: str = ""
    name: str = ""
    created: str = ""  # ISO 8601, UTC
    epochs: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the training recipe
    manifest: Path | None = field(default=None, compare=False)

    @property
    def path(self) -> Path:
        return (self.manifest.parent if self.manifest else Path()) / self.file

    @property
    def shipped(self) -> bool:
        """Shipped with the project: read-only, never replaced, renamed or deleted."""
        return self.manifest is not None and self.manifest.resolve() == PROJECT_MANIFEST

    @property
    def image_auroc(self) -> float | None:
        value = self.report.get("image_auroc")
        return float(value) if isinstance(value, int | float) else None

    @property
    def report_path(self) -> Path:
        """The full evaluation report written beside the checkpoint (``<name>.report.json``)."""
        return self.path.with_name(self.path.name.removesuffix(".safetensors") + ".report.json")

    @property
    def label(self) -> str:
        """How pickers show the entry: name, date, image AUROC, and whether it is shipped."""
        parts = [self.name or Path(self.file).stem, self.backbone]
        if self.created:
            parts.append(self.created[:16].replace("T", " "))
        if self.epochs:
            parts.append(f"{self.epochs} epochs")
        if self.image_auroc is not None:
            parts.append(f"image AUROC {100 * self.image_auroc:.1f}")
        if self.shipped:
            parts.append("shipped")
        return " · ".join(parts)

    def verify(self) -> Path:
        """The checkpoint's path, after checking it lies under its manifest's folder, exists
        and is unmodified."""
        if self.manifest is not None:
            folder = self.manifest.resolve().parent
            if not self.path.resolve().is_relative_to(folder):
                raise ManifestError(f"{self.file} in {self.manifest} lies outside {folder}")
        if not self.path.is_file():
            raise ManifestError(f"{self.path} is listed in {self.manifest} but missing")
        if file_sha256(self.path) != self.sha256:
            raise ManifestError(f"{self.path} does not match its SHA-256 in {self.manifest}: "
                                "modified or corrupt; restore it or retrain")
        return self.path


_FIELDS = {f.name for f in fields(ModelEntry)} - {"manifest"}


def _entry(raw: Any, manifest: Path) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{manifest}: an entry is not an object")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ManifestError(f"{manifest}: unknown entry field(s) {sorted(unknown)}")
    for key in ("dataset", "category", "backbone"):
        validate_name(raw.get(key), f"{key} in {manifest}")
    file = _validate_file(raw.get("file"), manifest)
    if not isinstance(raw.get("sha256"), str):
        raise ManifestError(f"{manifest}: the entry for {file} has no sha256")
    for key, kind in (("report", dict), ("options", dict), ("command", str), ("name", str),
                      ("created", str), ("id", str)):
        if key in raw and not isinstance(raw[key], kind):
            raise ManifestError(f"{manifest}: the field {key!r} of {file} must be a "
                                f"{kind.__name__}")
    if raw.get("epochs") is not None and not isinstance(raw["epochs"], int):
        raise ManifestError(f"{manifest}: the field 'epochs' of {file} must be an integer")
    shipped = manifest.resolve() == PROJECT_MANIFEST
    entry = ModelEntry(**{**raw, "file": file}, manifest=manifest)
    if not entry.id:  # entries written before models were versioned
        stem = file.removesuffix(".safetensors")
        entry = replace(entry, id=(SHIPPED_PREFIX if shipped else USER_PREFIX) + stem)
    if not entry.epochs and isinstance(entry.report.get("epochs"), int):
        entry = replace(entry, epochs=entry.report["epochs"])
    return entry


def read_manifest(path: Path) -> list[ModelEntry]:
    """Entries of one manifest; a missing manifest is an empty one."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
        models = payload["models"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not a valid manifest: {error}") from None
    except RecursionError:
        raise ManifestError(f"{path} is not a valid manifest: nested too deeply") from None
    if not isinstance(models, list):
        raise ManifestError(f"{path} is not a valid manifest: 'models' is not a list")
    return [_entry(raw, path) for raw in models]


def user_manifest() -> Path:
    return data_home() / "models" / "manifest.json"


def all_models(manifests: list[Path] | None = None) -> list[ModelEntry]:
    """Every entry of the project's and the user's manifests, shipped ones first."""
    seen: dict[str, ModelEntry] = {}
    for manifest in manifests if manifests is not None else [PROJECT_MANIFEST, user_manifest()]:
        for entry in read_manifest(manifest):
            seen.setdefault(entry.id, entry)
    return list(seen.values())


def _best_first(entries: list[ModelEntry]) -> list[ModelEntry]:
    """Highest image AUROC first; then shipped ones; then the newest."""
    newest = sorted(entries, key=lambda e: e.created, reverse=True)
    return sorted(newest, key=lambda e: (-(e.image_auroc if e.image_auroc is not None else -1.0),
                                         not e.shipped))


def models_for(dataset: str, category: str, backbone: str | None = None,
               manifests: list[Path] | None = None) -> list[ModelEntry]:
    """The models of one dataset and category (of one backbone if given), best first."""
    return _best_first([e for e in all_models(manifests)
                        if (e.dataset, e.category) == (dataset, category)
                        and backbone in (None, e.backbone)])


def find_model(dataset: str, category: str, backbone: str,
               manifests: list[Path] | None = None) -> ModelEntry | None:
    """The default model of a dataset, category and backbone: the best by image AUROC."""
    found = models_for(dataset, category, backbone, manifests)
    return found[0] if found else None


def get_model(model_id: str, manifests: list[Path] | None = None) -> ModelEntry | None:
    return next((e for e in all_models(manifests) if e.id == model_id), None)


@contextlib.contextmanager
def _lock(manifest: Path) -> Iterator[None]:
    """One writer at a time per manifest (jobs, app sessions and the CLI may all register):
    an exclusive ``flock`` on ``<manifest>.lock``, released when the holder exits or dies."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.with_name(manifest.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(manifest: Path, entries: list[ModelEntry]) -> None:
    models = [_plain(e) for e in entries]
    text = json.dumps({"version": MANIFEST_VERSION, "models": models}, indent=1)
    atomic_write(manifest, lambda tmp: tmp.write_text(text + "\n"))


def _refuse_shipped(manifest: Path) -> None:
    if manifest.resolve() == PROJECT_MANIFEST:
        raise ManifestError("shipped models are read-only: register, rename and delete work "
                            "on your own models only")


def _copy_new(source: Path, folder: Path, stem: str, suffix: str) -> Path:
    """Copy ``source`` into ``folder`` under a name that does not exist yet (``stem``,
    ``stem-2``...): written to a temporary file, then linked into place, which fails rather
    than replace a file another writer created meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".copy.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.chmod(temporary, 0o644)
        for attempt in range(1, 1000):
            target = folder / (f"{stem}{suffix}" if attempt == 1 else f"{stem}-{attempt}{suffix}")
            try:
                os.link(temporary, target)
                return target
            except FileExistsError:
                continue
        raise ManifestError(f"no free file name for {stem}{suffix} in {folder}")
    finally:
        Path(temporary).unlink(missing_ok=True)


def register(manifest: Path, checkpoint: Path, dataset: str, category: str, backbone: str,
             command: str = "", report: Mapping[str, Any] | None = None, *, name: str = "",
             copy: bool = False, metadata: Mapping[str, Any] | None = None) -> ModelEntry:
    """Add a new entry for ``checkpoint``; an existing entry or file is never replaced.

    Names are checked before anything is written. The file must lie under the manifest's
    folder, unless ``copy``: it is then copied into ``<dataset>/<category>/`` under a new name
    (its ``.report.json`` too). ``metadata`` (the checkpoint's) supplies the date, the epochs
    and the recipe. The manifest is rewritten atomically under a lock.
    """
    manifest, checkpoint = Path(manifest), Path(checkpoint)
    for value, what in ((dataset, "dataset"), (category, "category"), (backbone, "backbone")):
        validate_name(value, what)
    name = _validate_label(name)
    if report is not None and not isinstance(report, Mapping):
        raise ManifestError("the checkpoint's metrics must be an object")
    _refuse_shipped(manifest)
    if not checkpoint.is_file():
        raise ManifestError(f"{checkpoint} does not exist")
    folder = manifest.resolve().parent
    inside = checkpoint.resolve().is_relative_to(folder)
    if not inside and not copy:
        raise ManifestError(f"{checkpoint} must lie under {manifest.parent} to be registered")
    meta = dict(metadata or {})
    created = str(meta.get("created_utc") or datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    epochs = meta.get("epochs_trained")
    options = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    with _lock(manifest):
        entries = read_manifest(manifest)
        if inside:
            target = checkpoint
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            target = _copy_new(checkpoint, manifest.parent / dataset / category,
                               f"{backbone}-{stamp}", ".safetensors")
            source_report = checkpoint.with_name(
                checkpoint.name.removesuffix(".safetensors") + ".report.json")
            if source_report.is_file():
                wanted = target.name.removesuffix(".safetensors") + ".report.json"
                if not (target.parent / wanted).exists():
                    report_copy = _copy_new(source_report, target.parent,
                                            wanted.removesuffix(".json"), ".json")
                    if report_copy.name != wanted:  # lost a race: keep names paired or none
                        report_copy.unlink()
        relative = target.resolve().relative_to(folder).as_posix()
        if any(e.file == relative for e in entries):
            raise ManifestError(f"{relative} is already registered in {manifest}; a model is "
                                "never replaced: train or copy it under a new name")
        entry = ModelEntry(dataset, category, backbone, relative, file_sha256(target), command,
                           dict(report or {}), USER_PREFIX + relative.removesuffix(".safetensors"),
                           name, created, epochs if isinstance(epochs, int) else None,
                           dict(options), manifest)
        _write(manifest, [*entries, entry])
    return entry


def _validate_label(name: Any) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
        raise ManifestError(f"a model name is printable text of at most {MAX_NAME} characters")
    return name.strip()


def _user_entry(model_id: str, manifest: Path | None) -> tuple[Path, list[ModelEntry], int]:
    manifest = Path(manifest) if manifest is not None else user_manifest()
    _refuse_shipped(manifest)
    entries = read_manifest(manifest)
    for index, entry in enumerate(entries):
        if entry.id == model_id:
            return manifest, entries, index
    if model_id.startswith(SHIPPED_PREFIX):
        _refuse_shipped(PROJECT_MANIFEST)
    raise ManifestError(f"no model {model_id!r} in {manifest}")


def rename_model(model_id: str, name: str, manifest: Path | None = None) -> ModelEntry:
    """Give one of the user's models a new display name (files stay where they are)."""
    name = _validate_label(name)
    manifest = Path(manifest) if manifest is not None else user_manifest()
    with _lock(manifest):
        manifest, entries, index = _user_entry(model_id, manifest)
        entries[index] = replace(entries[index], name=name)
        _write(manifest, entries)
    return entries[index]


def delete_model(model_id: str, manifest: Path | None = None) -> ModelEntry:
    """Remove one of the user's models from the manifest, and its files when no other entry
    uses them."""
    manifest = Path(manifest) if manifest is not None else user_manifest()
    with _lock(manifest):
        manifest, entries, index = _user_entry(model_id, manifest)
        entry = entries.pop(index)
        _write(manifest, entries)
        if not any(e.file == entry.file for e in entries):
            entry.path.unlink(missing_ok=True)
            entry.report_path.unlink(missing_ok=True)
    return entry


def _plain(entry: ModelEntry) -> dict[str, Any]:
    data = asdict(entry)
    data.pop("manifest")
    return data
