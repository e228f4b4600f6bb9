"""Where datasets come from: the built-in generated one, the shared MVTec subset, the user's.

A source is a named MVTec-layout root. The name is what manifests record, so a checkpoint is
matched to the data it learned, wherever that data lies on a given machine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rd.errors import RDError
from rd.files import data_home

BUILTIN = "builtin"
SHARED_SUBSET = "mvtec_subset"
MVTEC_ENV = "RD_MVTEC_ROOT"
MVTEC = "mvtec"
RESERVED = (BUILTIN, SHARED_SUBSET, MVTEC)
# Folders a user may add as data sources lie under these (os.pathsep-separated) roots.
ROOTS_ENV = "RD_DATA_ROOTS"
_SOURCE_NAME = re.compile(r"^[\w][\w.+-]{0,99}$")
# ../shared/data/mvtec_subset beside the checkout, when the project's shared folder is there.
SHARED_SUBSET_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvtec_subset"


@dataclass(frozen=True)
class DataSource:
    name: str
    root: Path
    description: str


def builtin_source(categories: Iterable[str] | None = None) -> DataSource:
    """The built-in generated data; ``categories``: generate only those now (None: all)."""
    from rd.data.synthetic import ensure_builtin_dataset

    return DataSource(BUILTIN, ensure_builtin_dataset(categories=categories),
                      "built-in generated parts (offline)")


def available_sources(extra_roots: dict[str, Path] | None = None,
                      builtin_categories: Iterable[str] | None = None) -> list[DataSource]:
    """The built-in source first, then the shared subset, $RD_MVTEC_ROOT and ``extra_roots``."""
    sources = [builtin_source(builtin_categories)]
    if SHARED_SUBSET_ROOT.is_dir():
        sources.append(DataSource(SHARED_SUBSET, SHARED_SUBSET_ROOT,
                                  "real MVTec AD subset (CC BY-NC-SA 4.0)"))
    env_root = os.environ.get(MVTEC_ENV)
    if env_root and Path(env_root).is_dir():
        sources.append(DataSource(MVTEC, Path(env_root), f"MVTec AD from ${MVTEC_ENV}"))
    taken = {s.name.casefold() for s in sources} | {name.casefold() for name in RESERVED}
    for name, root in (extra_roots or {}).items():
        if name.casefold() not in taken and _SOURCE_NAME.match(name) and ".." not in name:
            taken.add(name.casefold())
            sources.append(DataSource(name, Path(root), "a folder you chose"))
    return sources


class SourceError(RDError, ValueError):
    """A folder cannot be added as a data source."""


def allowed_roots(configured: Iterable[str] | None = None) -> list[Path]:
    """Where added folders may lie: ``$RD_DATA_ROOTS``, else the configured roots (the app's
    settings), else the home folder and the data home."""
    env = os.environ.get(ROOTS_ENV)
    chosen = [p for p in env.split(os.pathsep) if p] if env else list(configured or [])
    roots = [Path(p).expanduser() for p in chosen] or [Path.home(), data_home()]
    return [root.resolve() for root in roots if root.is_absolute()]


def check_user_folder(folder: str | Path, taken: Iterable[str], roots: Sequence[Path]
                      ) -> tuple[str, Path]:
    """The source name and absolute path of a folder a user adds, after checking it lies under
    one of ``roots`` and that its name is new (not ``builtin``, ``mvtec_subset``, ``mvtec``, nor
    one in ``taken``)."""
    text = str(folder).strip()
    path = Path(text).expanduser()
    if not text or not path.is_absolute():
        raise SourceError(f"give the folder's absolute path (got {text!r})")
    path = path.resolve()
    if not path.is_dir():
        raise SourceError(f"{path} is not a folder")
    if not any(path.is_relative_to(root) for root in roots):
        raise SourceError(f"{path} is outside the folders data may come from ("
                          f"{', '.join(map(str, roots)) or 'none'}); set ${ROOTS_ENV} to "
                          "allow others")
    name = path.name
    if not _SOURCE_NAME.match(name) or ".." in name:
        raise SourceError(f"the folder name {name!r} cannot name a data source: use letters, "
                          "digits, '_', '-', '.' or '+'")
    if name.casefold() in {t.casefold() for t in [*RESERVED, *taken]}:
        raise SourceError(f"a data source named {name!r} exists already: rename the folder "
                          "(or link it under another name) to add it")
    return name, path
