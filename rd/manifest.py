"""Manifests: where trained checkpoints are listed, so the app and the CLI find them.

Two manifests are read: the project's own ``checkpoints/manifest.json`` (students committed for
the built-in dataset) and the user's (``<data home>/models/manifest.json``, where training jobs
register theirs). Each entry names its file relative to the manifest, with the file's SHA-256:
a missing or modified file is reported, never used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rd.backbones import file_sha256
from rd.checkpoints import atomic_write
from rd.paths import data_home

MANIFEST_VERSION = 1
PROJECT_MANIFEST = Path(__file__).resolve().parents[1] / "checkpoints" / "manifest.json"


class ManifestError(ValueError):
    """A manifest or one of its files cannot be used."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered checkpoint: which data it learned, and how it was made."""

    dataset: str  # "builtin", "mvtec_subset", or a user's dataset name
    category: str
    backbone: str
    file: str  # relative to the manifest's folder
    sha256: str
    command: str = ""
    report: dict[str, Any] = field(default_factory=dict)  # headline metrics
    manifest: Path | None = field(default=None, compare=False)

    @property
    def path(self) -> Path:
        return (self.manifest.parent if self.manifest else Path()) / self.file

    def verify(self) -> Path:
        """The checkpoint's path, after checking it exists and is unmodified."""
        if not self.path.is_file():
            raise ManifestError(f"{self.path} is listed in {self.manifest} but missing")
        if file_sha256(self.path) != self.sha256:
            raise ManifestError(f"{self.path} does not match its SHA-256 in {self.manifest}: "
                                "modified or corrupt; restore it or retrain")
        return self.path


def read_manifest(path: Path) -> list[ModelEntry]:
    """Entries of one manifest; a missing manifest is an empty one."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
        return [ModelEntry(**entry, manifest=path) for entry in payload["models"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ManifestError(f"{path} is not a valid manifest: {error}") from None


def user_manifest() -> Path:
    return data_home() / "models" / "manifest.json"


def all_models(manifests: list[Path] | None = None) -> list[ModelEntry]:
    """Entries of the project's and the user's manifests (later ones win on equal keys)."""
    entries: dict[tuple[str, str, str], ModelEntry] = {}
    for manifest in manifests if manifests is not None else [PROJECT_MANIFEST, user_manifest()]:
        for entry in read_manifest(manifest):
            entries[(entry.dataset, entry.category, entry.backbone)] = entry
    return list(entries.values())


def find_model(dataset: str, category: str, backbone: str,
               manifests: list[Path] | None = None) -> ModelEntry | None:
    for entry in all_models(manifests):
        if (entry.dataset, entry.category, entry.backbone) == (dataset, category, backbone):
            return entry
    return None


def register(manifest: Path, checkpoint: Path, dataset: str, category: str, backbone: str,
             command: str = "", report: Mapping[str, Any] | None = None) -> ModelEntry:
    """Add or replace the entry for (dataset, category, backbone); the file must sit beside
    or below the manifest. The manifest is rewritten atomically."""
    manifest, checkpoint = Path(manifest), Path(checkpoint)
    try:
        relative = checkpoint.resolve().relative_to(manifest.resolve().parent)
    except ValueError:
        raise ManifestError(f"{checkpoint} must lie under {manifest.parent} to be registered") \
            from None
    entry = ModelEntry(dataset, category, backbone, relative.as_posix(), file_sha256(checkpoint),
                       command, dict(report or {}))
    others = [e for e in read_manifest(manifest)
              if (e.dataset, e.category, e.backbone) != (dataset, category, backbone)]
    models = [_plain(e) for e in [*others, entry]]
    models.sort(key=lambda e: (e["dataset"], e["category"], e["backbone"]))
    text = json.dumps({"version": MANIFEST_VERSION, "models": models}, indent=1)
    atomic_write(manifest, lambda tmp: tmp.write_text(text + "\n"))
    return ModelEntry(**_plain(entry), manifest=manifest)


def _plain(entry: ModelEntry) -> dict[str, Any]:
    data = asdict(entry)
    data.pop("manifest")
    return data
