"""What a command may write: never over an existing file unless asked, never over its input.

Every command that writes files checks its planned outputs here before any work: an existing
output is refused without ``--overwrite``, an output that is one of the command's inputs (the
checkpoint, an image, a weights file) is refused always, and two outputs of one run never share
a name (``mirrored_outputs`` keeps each input's path relative to the inputs' common folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from rd.errors import RDError


class OutputError(RDError, ValueError):
    """An output would replace a file the user did not ask to replace."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path | None] = (),
                  overwrite: bool = False, advice: str = "pass --overwrite to replace it"
                  ) -> None:
    """Refuse outputs that exist (unless ``overwrite``), or that are one of ``inputs``."""
    given = [Path(p) for p in inputs if p is not None]
    for output in map(Path, outputs):
        for source in given:
            if _same_file(output, source):
                raise OutputError(f"{output} is also an input ({source}): write the output "
                                  "somewhere else")
        if output.is_dir() and not output.is_symlink():
            raise OutputError(f"{output} is a folder: give a file name")
        if (output.exists() or output.is_symlink()) and not overwrite:
            raise OutputError(f"{output} exists: {advice}, or choose another name")


def mirrored_outputs(inputs: Sequence[str | Path], folder: str | Path,
                     suffixes: Sequence[str]) -> list[dict[str, Path]]:
    """For each input, ``folder/<its path relative to the inputs' common folder>`` with each of
    ``suffixes`` in place of its own: ``test/crack/000.png`` and ``test/cut/000.png`` give
    ``folder/crack/000.png`` and ``folder/cut/000.png``. Two inputs that would still share an
    output (``a.png`` and ``a.jpg``) are refused."""
    folder = Path(folder)
    resolved = [Path(os.path.abspath(p)) for p in inputs]
    if not resolved:
        return []
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    planned: list[dict[str, Path]] = []
    claimed: dict[Path, Path] = {}
    for source, absolute in zip(inputs, resolved, strict=True):
        relative = absolute.relative_to(common)
        paths = {suffix: folder / relative.with_suffix(suffix) for suffix in suffixes}
        for path in paths.values():
            if path in claimed:
                raise OutputError(f"{claimed[path]} and {source} would both write {path}: give "
                                  "them in separate runs or rename one")
            claimed[path] = Path(source)
        planned.append(paths)
    return planned
