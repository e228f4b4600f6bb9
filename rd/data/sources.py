"""Where datasets come from: the built-in generated one, the shared MVTec subset, the user's.

A source is a named MVTec-layout root. The name is what manifests record, so a checkpoint is
matched to the data it learned, wherever that data lies on a given machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BUILTIN = "builtin"
SHARED_SUBSET = "mvtec_subset"
MVTEC_ENV = "RD_MVTEC_ROOT"
# ../shared/data/mvtec_subset beside the checkout, when the project's shared folder is there.
SHARED_SUBSET_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvtec_subset"


@dataclass(frozen=True)
class DataSource:
    name: str
    root: Path
    description: str


def builtin_source() -> DataSource:
    from rd.data.synthetic import ensure_builtin_dataset

    return DataSource(BUILTIN, ensure_builtin_dataset(), "built-in generated parts (offline)")


def available_sources(extra_roots: dict[str, Path] | None = None) -> list[DataSource]:
    """The built-in source first, then the shared subset, $RD_MVTEC_ROOT and ``extra_roots``."""
    sources = [builtin_source()]
    if SHARED_SUBSET_ROOT.is_dir():
        sources.append(DataSource(SHARED_SUBSET, SHARED_SUBSET_ROOT,
                                  "real MVTec AD subset (CC BY-NC-SA 4.0)"))
    env_root = os.environ.get(MVTEC_ENV)
    if env_root and Path(env_root).is_dir():
        sources.append(DataSource("mvtec", Path(env_root), f"MVTec AD from ${MVTEC_ENV}"))
    for name, root in (extra_roots or {}).items():
        sources.append(DataSource(name, Path(root), "a folder you chose"))
    return sources
