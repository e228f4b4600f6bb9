"""Names and modules resolved on first use, so ``import rd`` and the studio's first page stay free
of torch and scipy (PEP 562 for packages; ``lazy_module`` for a module's own heavy imports)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]
                    ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps a public name to the
    module that defines it; the module is imported when the name is first asked for."""

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        vars(sys.modules[package])[name] = value  # asked once: later lookups are plain
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when an attribute is first asked for:
    ``ndimage = lazy_module("scipy.ndimage")`` costs nothing until ``ndimage.label(...)``."""

    class Deferred:
        def __getattr__(self, attribute: str) -> Any:
            return getattr(importlib.import_module(name), attribute)

        def __repr__(self) -> str:
            return f"<deferred module {name!r}>"

    return Deferred()
